"""Pipeline configs: strict typed loading, --set overrides, the resolved TOML, CLI errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vqgen.config import PipelineConfig, config_to_toml, load_config
from vqgen.configtools import from_dict, loads_toml
from vqgen.errors import ConfigError

PIPELINES = sorted((Path(__file__).parents[1] / "pipelines").glob("*.toml"))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_every_shipped_pipeline_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig) and cfg.run.name


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["vqvae.train.lr=3e-4", "prior.top.model.shape=[8, 8]", "data.kind=npz",
                             "data.root=images.npz", "run.name=x", "sample.top.temperature=0"])
    assert cfg.vqvae.train.lr == 3e-4
    assert cfg.prior.top.model.shape == (8, 8)
    assert cfg.data.kind == "npz" and cfg.data.root == "images.npz"
    assert cfg.sample.top.temperature == 0.0 and isinstance(cfg.sample.top.temperature, float)


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("vqvae.train.lr=fast", "vqvae.train.lr", "expected float"),
        ("vqvae.train.steps=1.5", "vqvae.train.steps", "expected int"),
        ("vqvae.train.stepz=10", "vqvae.train.stepz", "unknown key"),
        ("vqvae.model.decay=1.5", "vqvae.model.decay", "(0, 1)"),
        ("data.kind=imagenet", "data.kind", "expected one of"),
        ("prior.top.model.kernel_size=4", "prior.top.model.kernel_size", "odd"),
        ("data.image_size=30", "data.image_size", "multiple of 8"),
        ("sample.top.top_p=2", "sample.top.top_p", ""),
        ("colour=blue", "colour", "unknown key"),
    ],
)
def test_bad_values_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(key + ":"), str(err.value)
    assert words in str(err.value)


def test_resolved_config_round_trips():
    cfg = load_config(PIPELINES[0], ["vqvae.train.lr=0.002"])
    again = from_dict(PipelineConfig, loads_toml(config_to_toml(cfg)))
    assert again == cfg


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[vqvae.train]\nlearning_rate = 1e-3\n")
    result = subprocess.run([sys.executable, "-m", "vqgen.cli", "config", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "vqvae.train.learning_rate: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    missing = subprocess.run([sys.executable, "-m", "vqgen.cli", "config", str(tmp_path / "nope.toml")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr
