"""Model exports load without pickle and refuse damaged or mismatched files by name."""

from __future__ import annotations

import json

import pytest
import torch

from vqgen.errors import CheckpointError
from vqgen.models.export import export_model, load_model
from vqgen.models.pixelcnn import GatedPixelCNN, PriorConfig
from vqgen.models.vqvae2 import VQVAE2, VQVAEConfig


def test_round_trip_rebuilds_a_non_default_architecture(tmp_path):
    cfg = PriorConfig(num_codes=16, shape=(4, 4), channels=16, num_layers=2, attention_every=1, num_heads=2,
                      num_classes=3, dropout=0.0)
    model = GatedPixelCNN(cfg).eval()
    checksum = export_model(model, cfg, tmp_path, "prior")
    loaded, loaded_cfg, loaded_sum = load_model(tmp_path, "prior")
    assert loaded_cfg == cfg and loaded_sum == checksum
    codes = torch.randint(16, (2, 4, 4))
    labels = torch.tensor([0, 2])
    torch.testing.assert_close(loaded(codes, labels=labels), model(codes, labels=labels))


def test_damaged_exports_are_clear_errors(tmp_path):
    cfg = VQVAEConfig(hidden_channels=8, res_channels=4, num_res_blocks=1, num_codes=8, code_dim=4)
    export_model(VQVAE2(cfg), cfg, tmp_path)
    weights = tmp_path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="does not match the checksum"):
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
