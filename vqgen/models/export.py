"""Model exports: ``NAME.safetensors`` (weights) + ``NAME.json`` (architecture), loadable without pickle.

The JSON names the model class and holds its full config, so a later stage rebuilds exactly the
trained architecture without the training config (unlike a bare ``VQVAE()``), and the weights'
checksum, so a later stage can record which export it used.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vqgen.configtools import from_dict
from vqgen.errors import CheckpointError, ConfigError
from vqgen.utils import atomic_write_json, sha256_file, storage_errors

FORMAT = "vqgen-model"
FORMAT_VERSION = 1

# class name -> (module, model class, config class); imported on use to keep start-up light.
MODEL_CLASSES = {
    "VQVAE2": ("vqgen.models.vqvae2", "VQVAE2", "VQVAEConfig"),
    "GatedPixelCNN": ("vqgen.models.pixelcnn", "GatedPixelCNN", "PriorConfig"),
}


def _classes(name: str):
    if name not in MODEL_CLASSES:
        raise CheckpointError(f"unknown model class {name!r} (known: {', '.join(MODEL_CLASSES)})")
    module, model_cls, config_cls = MODEL_CLASSES[name]
    mod = importlib.import_module(module)
    return getattr(mod, model_cls), getattr(mod, config_cls)


def save_weights(model: torch.nn.Module, path: Path, what: str) -> None:
    """``model``'s state dict as safetensors at ``path``, written to a temporary name and renamed
    (a reader sees the old file or the whole new one); a full or read-only disk is a StorageError
    naming ``what``."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    with storage_errors(path, what, cleanup=lambda: tmp.unlink(missing_ok=True)):
        save_file(state, str(tmp))
        tmp.replace(path)


def export_model(model: torch.nn.Module, config, directory: Path, name: str = "model") -> str:
    """Write ``directory/name.safetensors`` and ``directory/name.json``; return the weights' sha256.

    The weights are written to a temporary name and renamed, then the JSON (which carries the
    checksum) is written atomically, so a reader never pairs a JSON with other weights.
    """
    class_name = type(model).__name__
    _classes(class_name)  # refuse to export a class that could not be loaded back
    with storage_errors(directory, f"model export {directory / name}"):
        directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{name}.safetensors"
    save_weights(model, weights, f"model export {weights}")
    checksum = sha256_file(weights)
    atomic_write_json(
        directory / f"{name}.json",
        {"format": FORMAT, "version": FORMAT_VERSION, "class": class_name, "config": asdict(config), "sha256": checksum},
    )
    return checksum


def read_export_info(directory: Path, name: str = "model") -> dict:
    path = directory / f"{name}.json"
    if not path.exists():
        raise CheckpointError(f"no model export at {path}: run the stage that trains it first")
    try:
        info = json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vqgen model export")
    return info


def load_model(directory: Path, name: str = "model", device: str | torch.device = "cpu", verify: bool = True):
    """Rebuild a model from its export. Returns ``(model in eval mode, config, sha256)``."""
    info = read_export_info(directory, name)
    model_cls, config_cls = _classes(info["class"])
    try:
        config = from_dict(config_cls, info["config"], prefix=f"{name}.json:config")
    except ConfigError as err:
        raise CheckpointError(f"{directory / (name + '.json')}: {err}") from None
    weights = directory / f"{name}.safetensors"
    if not weights.exists():
        raise CheckpointError(f"{weights} is missing (its JSON is there): re-run the stage that exports it")
    checksum = sha256_file(weights)
    if verify and checksum != info["sha256"]:
        raise CheckpointError(f"{weights} does not match the checksum in {name}.json: the file is damaged or was replaced")
    try:
        state = load_file(str(weights))  # on the CPU; the model moves as a whole below
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} could not be read ({err})") from None
    model = model_cls(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{weights} does not fit the architecture in {name}.json: {err}") from None
    return model.to(device).eval(), config, checksum


