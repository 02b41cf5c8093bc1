"""Pipeline configs: strict typed loading, --set overrides, the resolved TOML, CLI errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vqgen.config import PipelineConfig, config_to_toml, load_config
from vqgen import cli, configtools
from vqgen.configtools import from_dict, load_toml, loads_toml
from vqgen.errors import ConfigError

PIPELINES = sorted((Path(__file__).parents[1] / "pipelines").glob("*.toml"))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_every_shipped_pipeline_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig) and cfg.run.name


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["vqvae.train.lr=3e-4", 'data.procedural.backgrounds=["solid"]', "data.kind=npz",
                             "data.root=images.npz", "run.name=x", "sample.top.temperature=0"])
    assert cfg.vqvae.train.lr == 3e-4
    assert cfg.data.procedural.backgrounds == ("solid",)
    assert cfg.data.kind == "npz" and cfg.data.root == "images.npz"
    assert cfg.sample.top.temperature == 0.0 and isinstance(cfg.sample.top.temperature, float)


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("vqvae.train.lr=fast", "vqvae.train.lr", "expected float"),
        ("vqvae.train.steps=1.5", "vqvae.train.steps", "expected int"),
        ("vqvae.train.stepz=10", "vqvae.train.stepz", "unknown key"),
        ("vqvae.model.quantizer.decay=1.5", "vqvae.model.quantizer.decay", "(0, 1)"),
        ("data.kind=imagenet", "data.kind", "expected one of"),
        ("prior.top.model.kernel_size=4", "prior.top.model.kernel_size", "odd"),
        ("data.image_size=30", "data.image_size", "multiple of 8"),
        ("sample.top.top_p=2", "sample.top.top_p", ""),
        ("colour=blue", "colour", "unknown key"),
        ("prior.middle.train.steps=3", "prior.middle", "names no level of the VQ-VAE (vqvae.model levels: top, bottom)"),
        ("sample.middle.top.temperature=0.5", "sample.middle.top", "names no level between the top and the bottom"),
        ('vqvae.model.levels=[{name="top", downsample=64}, {name="bottom", downsample=4}]', "data.image_size",
         "must be a multiple of 64"),
    ],
)
def test_bad_values_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(key + ":"), str(err.value)
    assert words in str(err.value)


@pytest.mark.parametrize("key", ["num_codes", "code_dim", "decay", "commitment_cost", "kernel_backend"])
def test_flat_quantizer_keys_name_their_new_place(key, tmp_path):
    path = tmp_path / "old.toml"
    path.write_text(f"[vqvae.model]\n{key} = 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"vqvae.model.{key}: has moved: it is now vqvae.model.quantizer.{key}"


@pytest.mark.parametrize("key, value", [("num_codes", "512"), ("shape", "[8, 8]"), ("num_classes", "10"),
                                        ("condition_shape", "[4, 4]")])
def test_store_derived_prior_sizes_are_not_config_keys(key, value):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"prior.bottom.model.{key}={value}"])
    assert str(err.value).startswith(f"prior.bottom.model.{key}: is set by the code store")


def test_resolved_config_round_trips():
    cfg = load_config(PIPELINES[0], ["vqvae.train.lr=0.002"])
    again = from_dict(PipelineConfig, loads_toml(config_to_toml(cfg)))
    assert again == cfg


def test_a_three_level_config_has_a_prior_section_per_level_and_round_trips():
    levels = '[{name="top", downsample=32}, {name="middle", downsample=16}, {name="bottom", downsample=8}]'
    cfg = load_config(None, [f"vqvae.model.levels={levels}", "data.image_size=64", "prior.middle.train.steps=7",
                             "sample.middle.middle.temperature=0.5"])
    assert list(cfg.prior) == ["top", "middle", "bottom"]
    assert cfg.prior["middle"].train.steps == 7 and cfg.prior["bottom"].train.steps == cfg.prior["top"].train.steps
    assert cfg.sample.middle["middle"].temperature == 0.5
    text = config_to_toml(cfg)
    assert "[[vqvae.model.levels]]" in text and "[prior.middle.train]" in text
    assert from_dict(PipelineConfig, loads_toml(text)) == cfg


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


def test_config_path_that_is_a_directory_names_it(tmp_path, capsys):
    with pytest.raises(ConfigError, match=f"config path is a directory, not a TOML file: {tmp_path}"):
        load_toml(str(tmp_path))
    assert cli.main(["config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vqgen: error: config path is a directory") and str(tmp_path) in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "error, words",
    [(PermissionError(13, "Permission denied"), "not readable .permission denied."),
     (OSError(5, "Input/output error"), "cannot read config file .*Input/output error")],
)
def test_unreadable_config_file_names_it(tmp_path, monkeypatch, error, words):
    path = tmp_path / "locked.toml"
    path.write_text("[run]\n")

    def refuse(*args, **kwargs):
        raise error

    # The module's own name `open` shadows the builtin, so only load_toml's open is refused.
    monkeypatch.setattr(configtools, "open", refuse, raising=False)
    with pytest.raises(ConfigError, match=words) as info:
        load_toml(str(path))
    assert str(path) in str(info.value)


def test_config_that_is_not_utf8_names_it(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="latin1.toml is not valid TOML .not UTF-8"):
        load_toml(str(path))


def test_fixed_length_tuple_fields_are_checked_item_by_item():
    from dataclasses import dataclass

    from vqgen.configtools import from_dict

    @dataclass(kw_only=True)
    class Shape:
        size: tuple[int, int] = (1, 1)

    assert from_dict(Shape, {"size": [3, 4]}).size == (3, 4)
    with pytest.raises(ConfigError, match=r"size\[1\]: expected int, got 'x'"):
        from_dict(Shape, {"size": [3, "x"]})
    with pytest.raises(ConfigError, match="expected 2 items, got 3"):
        from_dict(Shape, {"size": [1, 2, 3]})
