# GPU image for cluster runs: CUDA PyTorch base, vqgen installed, `accelerate launch` as the entry.
#   docker build -t vqgen .
#   docker run --gpus all -v $PWD/runs:/work/runs -v /data:/data vqgen \
#       -m vqgen.cli run pipelines/cifar10.toml --set data.root=/data/cifar10
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1

WORKDIR /opt/vqgen
COPY pyproject.toml README.md ./
COPY vqgen ./vqgen
COPY stages ./stages
COPY kernels ./kernels
COPY pipelines /work/pipelines
# The base image's torch satisfies the wide ranges in pyproject.toml; triton ships with it.
RUN pip install ".[gpu,tensorboard]"

WORKDIR /work
# FID weights: mount them and set evaluate.inception_weights, or place them in the torch hub cache
# ($TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth).
ENTRYPOINT ["accelerate", "launch"]
CMD ["-m", "vqgen.cli", "--help"]
