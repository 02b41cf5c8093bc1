"""Model exports load without pickle and refuse damaged or mismatched files by name."""

from __future__ import annotations

import json

import pytest
import torch

from vqgen.errors import CheckpointError
from vqgen.models.export import export_model, load_model
from vqgen.models.pixelcnn import GatedPixelCNN, PriorConfig, PriorLayout
from vqgen.models.quantize import QuantizerConfig
from vqgen.models.vqvae2 import VQVAE2, VQVAEConfig

PRIOR_CONFIG = PriorConfig(channels=16, num_layers=2, attention_every=1, num_heads=2, dropout=0.0)
PRIOR_LAYOUT = PriorLayout(num_codes=16, shape=(4, 4), num_classes=3)


def test_round_trip_rebuilds_a_non_default_architecture(tmp_path):
    model = GatedPixelCNN(PRIOR_CONFIG, PRIOR_LAYOUT).eval()
    checksum = export_model(model, tmp_path, "prior")
    info = json.loads((tmp_path / "prior.json").read_text())
    assert info["version"] == 2 and info["class"] == "GatedPixelCNN"
    assert info["layout"]["num_codes"] == 16 and info["config"]["channels"] == 16
    loaded, loaded_cfg, loaded_sum = load_model(tmp_path, "prior")
    assert loaded_cfg == PRIOR_CONFIG and loaded.layout == PRIOR_LAYOUT and loaded_sum == checksum
    codes = torch.randint(16, (2, 4, 4))
    labels = torch.tensor([0, 2])
    torch.testing.assert_close(loaded(codes, labels=labels), model(codes, labels=labels))


def _rewrite_as_version_1(path, flat_config: dict) -> None:
    """Replace today's ``NAME.json`` by the one a version-1 export wrote: one flat ``config``."""
    info = json.loads(path.read_text())
    path.write_text(json.dumps({"format": "vqgen-model", "version": 1, "class": info["class"],
                                "config": flat_config, "sha256": info["sha256"]}))


def test_a_version_1_prior_export_loads_to_the_same_model(tmp_path):
    torch.manual_seed(0)
    model = GatedPixelCNN(PRIOR_CONFIG, PRIOR_LAYOUT).eval()
    checksum = export_model(model, tmp_path, "prior")
    # Layout and architecture in one dict, as PriorConfig held them before the layout had its own class.
    _rewrite_as_version_1(tmp_path / "prior.json", {
        "num_codes": 16, "shape": [4, 4], "channels": 16, "num_layers": 2, "kernel_size": 5,
        "attention_every": 1, "num_heads": 2, "dropout": 0.0, "num_classes": 3, "condition_num_codes": 0,
        "condition_shape": [], "condition_channels": 128, "condition_res_blocks": 0, "kernel_backend": "auto",
    })
    loaded, loaded_cfg, loaded_sum = load_model(tmp_path, "prior")
    assert loaded_cfg == PRIOR_CONFIG and loaded.layout == PRIOR_LAYOUT and loaded_sum == checksum
    codes = torch.randint(16, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(codes, labels=labels), model(codes, labels=labels), rtol=0, atol=0)


def test_a_version_1_vqvae_export_loads_to_the_same_model(tmp_path):
    torch.manual_seed(0)
    cfg = VQVAEConfig(hidden_channels=8, res_channels=4, num_res_blocks=1, bottom_num_codes=4,
                      latent_loss_weight=0.5,
                      quantizer=QuantizerConfig(num_codes=8, code_dim=4, decay=0.9, commitment_cost=0.5,
                                                restart_every=7, data_init=False, kernel_backend="torch"))
    model = VQVAE2(cfg).eval()
    checksum = export_model(model, tmp_path)
    # The quantizer's settings flat beside the rest, as VQVAEConfig held them before.
    _rewrite_as_version_1(tmp_path / "model.json", {
        "in_channels": 3, "hidden_channels": 8, "res_channels": 4, "num_res_blocks": 1, "num_codes": 8,
        "bottom_num_codes": 4, "code_dim": 4, "decay": 0.9, "eps": 1e-5, "commitment_cost": 0.5,
        "dead_code_threshold": 1.0, "restart_every": 7, "data_init": False, "kernel_backend": "torch",
        "latent_loss_weight": 0.5,
    })
    loaded, loaded_cfg, loaded_sum = load_model(tmp_path)
    assert loaded_cfg == cfg and loaded_sum == checksum
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    torch.testing.assert_close(got.recon, expected.recon, rtol=0, atol=0)
    assert all(torch.equal(got.codes[level], expected.codes[level]) for level in ("top", "bottom"))


def test_an_unknown_export_version_is_a_checkpoint_error_naming_it(tmp_path):
    export_model(GatedPixelCNN(PRIOR_CONFIG, PRIOR_LAYOUT), tmp_path, "prior")
    info = json.loads((tmp_path / "prior.json").read_text())
    info["version"] = 99
    (tmp_path / "prior.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"version 99\b"):
        load_model(tmp_path, "prior")


def test_damaged_exports_are_clear_errors(tmp_path):
    cfg = VQVAEConfig(hidden_channels=8, res_channels=4, num_res_blocks=1, quantizer=QuantizerConfig(num_codes=8, code_dim=4))
    export_model(VQVAE2(cfg), tmp_path)
    weights = tmp_path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="could not be read"):
        load_model(tmp_path, verify=False)
    weights.write_bytes(good)
    info = json.loads((tmp_path / "model.json").read_text())
    info["config"]["hidden_channels"] = 16
    (tmp_path / "model.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="does not fit the architecture"):
        load_model(tmp_path)
    info["config"]["hiden_channels"] = 16
    (tmp_path / "model.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="hiden_channels: unknown key"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="no model export"):
        load_model(tmp_path / "elsewhere")
