"""Priors learn: trained briefly on the codes of a tiny VQ-VAE, they beat the uniform code model."""

from __future__ import annotations

import math

import pytest
from vqgen.config import load_config
from vqgen.data.code_inspection import inspect_store
from vqgen.manifest import read_manifest
from vqgen.pipeline import run_single_stage

TINY = """
[run]
name = "tiny"
out_dir = "{out}"
tracker = "none"
[data]
num_eval = 256
image_size = 16
[data.procedural]
size = 4096
[vqvae.model]
hidden_channels = 32
res_channels = 16
num_res_blocks = 1
[vqvae.model.quantizer]
num_codes = 32
code_dim = 16
restart_every = 20
[vqvae.train]
steps = 200
batch_size = 32
lr = 5e-4
eval_every = 0
image_every = 0
checkpoint_every = 0
[prior.{level}]
class_conditional = true
[prior.{level}.model]
channels = 32
num_layers = 3
kernel_size = 3
attention_every = {attention}
num_heads = 2
dropout = 0.0
condition_channels = 32
condition_res_blocks = {cond_blocks}
[prior.{level}.train]
steps = 300
batch_size = 32
lr = 3e-3
eval_every = 0
image_every = 0
checkpoint_every = 0
"""


@pytest.fixture(scope="module")
def codes_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("priors")
    path = out / "tiny.toml"
    path.write_text(TINY.format(out=out, level="top", attention=3, cond_blocks=0))
    cfg = load_config(path)
    run_single_stage(cfg, "train-vqvae")
    run_single_stage(cfg, "extract-codes")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("level, attention, cond_blocks", [("top", 3, 0), ("bottom", 0, 1)])
def test_prior_beats_uniform_and_unigram(codes_run, level, attention, cond_blocks):
    path = codes_run / f"{level}.toml"
    path.write_text(TINY.format(out=codes_run, level=level, attention=attention, cond_blocks=cond_blocks))
    run_dir = codes_run / "tiny"
    info = {lvl["name"]: lvl for lvl in inspect_store(run_dir / "codes" / "eval.lmdb")["levels"]}
    # The codes must be diverse for the test to mean anything.
    unigram_bits = math.log2(info[level]["perplexity"])
    assert unigram_bits > 2.0, f"{level} codes too collapsed to test a prior ({unigram_bits:.2f} bits)"
    run_single_stage(load_config(path), f"train-prior-{level}")
    bpd = read_manifest(run_dir / f"prior-{level}")["metrics"]["val_bits_per_dim"]
    assert bpd < 0.75 * math.log2(32), f"{level}: {bpd:.3f} bits/dim is not clearly below uniform (5 bits)"
    assert bpd < unigram_bits, f"{level}: {bpd:.3f} bits/dim does not beat code frequencies ({unigram_bits:.3f})"
