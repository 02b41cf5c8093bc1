"""Model exports: ``NAME.safetensors`` (weights) + ``NAME.json`` (architecture), loadable without pickle.

The JSON names the model class and holds every constructor argument (the config, and a prior's
layout), so a later stage rebuilds exactly the trained architecture without the training config
(unlike a bare ``VQVAE()``), and the weights' checksum, so a later stage can record which export it
used. Exports of an older format version are upgraded on load by their model module's
``upgrade_export_config``.
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
from vqgen.utils import atomic_replace, atomic_write_json, sha256_file, storage_errors

FORMAT = "vqgen-model"
FORMAT_VERSION = 2
"""2: constructor arguments under their own names (1: one flat ``config``)."""

# class name -> (module, model class, {constructor argument: its config class}); the model keeps
# each argument as an attribute of the same name. Imported on use to keep start-up light.
MODEL_CLASSES = {
    "VQVAE2": ("vqgen.models.vqvae2", "VQVAE2", {"config": "VQVAEConfig"}),
    "GatedPixelCNN": ("vqgen.models.pixelcnn", "GatedPixelCNN", {"config": "PriorConfig", "layout": "PriorLayout"}),
    "ResNetClassifier": ("vqgen.models.classifier", "ResNetClassifier",
                         {"config": "ClassifierConfig", "layout": "ClassifierLayout"}),
}


def _classes(name: str):
    """``(module, model class, {argument: config class})`` of the model class called ``name``."""
    if name not in MODEL_CLASSES:
        raise CheckpointError(f"unknown model class {name!r} (known: {', '.join(MODEL_CLASSES)})")
    module, model_cls, arg_classes = MODEL_CLASSES[name]
    mod = importlib.import_module(module)
    return mod, getattr(mod, model_cls), {arg: getattr(mod, cls) for arg, cls in arg_classes.items()}


def save_weights(model: torch.nn.Module, path: Path, what: str) -> None:
    """``model``'s state dict as safetensors at ``path``, written to a temporary name and renamed
    (a reader sees the old file or the whole new one); a full or read-only disk is a StorageError
    naming ``what``."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # save_file writes by name: no second in-memory copy of a large model's bytes.
    with atomic_replace(path, what) as tmp:
        save_file(state, str(tmp))


def export_model(model: torch.nn.Module, directory: Path, name: str = "model") -> str:
    """Write ``directory/name.safetensors`` and ``directory/name.json``; return the weights' sha256.

    The weights are written to a temporary name and renamed, then the JSON (which carries the
    checksum) is written atomically, so a reader never pairs a JSON with other weights.
    """
    class_name = type(model).__name__
    _, _, arg_classes = _classes(class_name)  # refuses a class that could not be loaded back
    args = {arg: asdict(getattr(model, arg)) for arg in arg_classes}
    with storage_errors(directory, f"model export {directory / name}"):
        directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{name}.safetensors"
    save_weights(model, weights, f"model export {weights}")
    checksum = sha256_file(weights)
    atomic_write_json(
        directory / f"{name}.json",
        {"format": FORMAT, "version": FORMAT_VERSION, "class": class_name, **args, "sha256": checksum},
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


def read_export_config(directory: Path, name: str = "model"):
    """The config of the model exported in ``directory`` (its architecture), without its weights."""
    info = read_export_info(directory, name)
    module, _, arg_classes = _classes(info.get("class"))
    return _constructor_args(info, module, arg_classes, directory / f"{name}.json")["config"]


def load_model(directory: Path, name: str = "model", device: str | torch.device = "cpu", verify: bool = True,
               *, json_name: str | None = None):
    """Rebuild a model from its export: ``NAME.json`` beside ``NAME.safetensors`` (``json_name``:
    another JSON file name, e.g. the Hub's ``config.json``). Returns ``(model in eval mode, config,
    sha256)``."""
    json_stem = json_name.removesuffix(".json") if json_name else name
    info = read_export_info(directory, json_stem)
    config_path = directory / f"{json_stem}.json"
    module, model_cls, arg_classes = _classes(info.get("class"))
    args = _constructor_args(info, module, arg_classes, config_path)
    weights = directory / f"{name}.safetensors"
    if not weights.exists():
        raise CheckpointError(f"{weights} is missing (its JSON is there): re-run the stage that exports it")
    checksum = sha256_file(weights)
    if verify and checksum != info["sha256"]:
        raise CheckpointError(f"{weights} does not match the sha256 in {config_path.name}: the file is truncated, "
                              "damaged or was replaced")
    try:
        state = load_file(str(weights))  # on the CPU; the model moves as a whole below
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} could not be read ({err})") from None
    model = model_cls(**args)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{weights} does not fit the architecture in {config_path.name}: {err}") from None
    return model.to(device).eval(), model.config, checksum


def _constructor_args(info: dict, module, arg_classes: dict, path: Path) -> dict:
    """The model's constructor arguments from its export JSON, upgraded from an older version."""
    version = info.get("version")
    if version not in range(1, FORMAT_VERSION + 1):
        raise CheckpointError(f"{path}: export format version {version!r}; this vqgen reads 1 to {FORMAT_VERSION}")
    upgrade = getattr(module, "upgrade_export_config", None)
    if version == 1 and upgrade is None:  # a class that came after version 1 has no such exports
        raise CheckpointError(f"{path}: export format version 1 never held a {info.get('class')}")
    raw = upgrade(info.get("config", {})) if version == 1 else info
    args = {}
    for arg, cls in arg_classes.items():
        try:
            args[arg] = from_dict(cls, raw.get(arg, {}), prefix=f"{path.name}:{arg}")
        except ConfigError as err:
            raise CheckpointError(f"{path}: {err}") from None
    return args


