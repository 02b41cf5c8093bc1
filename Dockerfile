# GPU image for cluster runs: CUDA PyTorch base, vqgen installed, `accelerate launch` as the entry.
#   docker build -t vqgen .
#   docker run --gpus all -v $PWD/runs:/work/runs -v /data:/data vqgen \
#       -m vqgen.cli run pipelines/cifar10.toml --set data.root=/data/cifar10
# The base must bring a torch whose own triton pin meets `.[gpu]`'s triton>=3.6, or pip cannot install
# vqgen over it: torch 2.11.0 requires triton==3.6.0 (its wheel's metadata) and ships torchvision
# 0.26.0 (2.6.0 pinned triton 3.2). CUDA 12.8 rather than 13.0: it runs on older cluster drivers and
# still builds for sm_90 and Blackwell. tests/test_packaging.py checks these versions against pyproject.toml.
FROM pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1

WORKDIR /opt/vqgen
COPY pyproject.toml README.md ./
COPY vqgen ./vqgen
COPY stages ./stages
COPY kernels ./kernels
# Installed as package data (`vqgen run demo` by name), and a copy to edit in the working folder.
COPY pipelines ./pipelines
COPY pipelines /work/pipelines
# Keep the base image's CUDA builds of torch, torchvision and triton: if a requirement ever stopped
# admitting them, pip would fetch a PyPI build over them; with them as constraints the build fails instead.
# (`pip list --format=freeze`, not `pip freeze`: it prints name==version for conda-style installs too.)
RUN pip list --format=freeze | grep -iE '^(torch|torchvision|triton)==' > /tmp/base-pins.txt \
    && pip install -c /tmp/base-pins.txt ".[gpu,tensorboard]" \
    && rm /tmp/base-pins.txt

WORKDIR /work
# FID weights: mount them and set evaluate.inception_weights, or place them in the torch hub cache
# ($TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth).
ENTRYPOINT ["accelerate", "launch"]
CMD ["-m", "vqgen.cli", "--help"]
