"""Where a trained generator's models come from: a run folder, a model bundle, or a Hub repo.

A bundle is the exports of a run in one folder (``vqgen export RUN OUT``), the VQ-VAE and one prior
per level, laid out as a Hugging Face Hub model repository, so it can be pushed as it is::

    BUNDLE/
      config.json     format "vqgen-bundle": image size, channels, normalisation, class names,
                      each component's class and sha256
      README.md       model card: data, training steps, metrics (RUN/eval/metrics.json)
      vqvae/          config.json (the model export's JSON) + model.safetensors
      prior-top/      the same, one folder per level (prior-middle/ in a three-level model)
      prior-bottom/   the same
      classifier/     the same, when the run trained one (train-classifier): the scorer of
                      rejection sampling (``vqgen sample --threshold``, ``--keep-fraction``)

Loading reads JSON and safetensors only: nothing in the files is executed or unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from vqgen.errors import CheckpointError, VQGenError
from vqgen.models.export import load_model, read_export_info
from vqgen.utils import atomic_write_json, atomic_write_text, storage_errors

VQVAE = "vqvae"
CLASSIFIER = "classifier"
"""The optional component: the classifier that scores samples for rejection sampling."""
FORMAT = "vqgen-bundle"
FORMAT_VERSION = 1
NORMALIZATION = {"range": [-1.0, 1.0], "from_uint8": "x / 127.5 - 1", "to_uint8": "round((x + 1) / 2 * 255)"}
# Only what a bundle holds: a Hub repository may also carry pickled checkpoints, never fetched.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.md"]


@dataclass
class ModelInfo:
    """Where a generator's models were loaded from, and what they were trained on."""

    source: str
    """The run folder, bundle folder or Hub repo id given to ``from_pretrained``."""
    sha256: dict[str, str] = field(default_factory=dict)
    """Each component's weights checksum."""
    read_class_names: Callable[[], tuple[str, ...]] = tuple
    """Reads the class names when first asked for (a run folder's come from its dataset)."""

    @cached_property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.read_class_names())


def resolve(path: str | Path) -> Path:
    """A local folder as it is; otherwise a Hub repo id, downloaded (when ``huggingface_hub`` is
    installed) into the Hub cache, bundle files only."""
    local = Path(path)
    if local.is_dir():
        return local
    if str(path).count("/") == 1 and not str(path).startswith((".", "~", "/")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise CheckpointError(f"{path}: no such folder (and huggingface_hub, which would fetch a Hub "
                                  "repo of that name, is not installed)") from None
        try:
            return Path(snapshot_download(repo_id=str(path), allow_patterns=HUB_PATTERNS))
        except Exception as err:  # the hub's errors have no common base below Exception
            raise CheckpointError(f"{path}: no such folder, and no Hub repo of that name could be "
                                  f"fetched ({type(err).__name__}: {err})") from None
    raise CheckpointError(f"{path}: no such folder (a run folder, a bundle from `vqgen export`, or a Hub repo id)")


def is_bundle(root: Path) -> bool:
    try:
        return json.loads((root / "config.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def prior_component(level: str) -> str:
    return f"prior-{level}"


def components_of(vqvae) -> tuple[str, ...]:
    """The VQ-VAE and one prior per level of its hierarchy, top first."""
    return level_components(vqvae.config.level_names)


def level_components(level_names: tuple[str, ...]) -> tuple[str, ...]:
    return (VQVAE, *(prior_component(name) for name in level_names))


def run_components(run_dir: Path) -> tuple[str, ...]:
    """:func:`components_of` the VQ-VAE a run exported (its JSON only: no weights are read)."""
    from vqgen.models.export import read_export_config

    return level_components(read_export_config(run_dir / VQVAE).level_names)


class Components(NamedTuple):
    """What :func:`load_components` loads."""

    vqvae: torch.nn.Module
    priors: tuple[torch.nn.Module, ...]
    """One per level, top first."""
    classifier: torch.nn.Module | None
    """The rejection-sampling classifier, when the run trained one (None otherwise)."""
    info: ModelInfo


def load_components(path: str | Path, device: str | torch.device = "cpu") -> Components:
    """The models of a run folder, a bundle or a Hub repo id (the classifier when there is one).

    The models are checked against each other (codebook sizes, code map shapes): a component from
    another run is a :class:`CheckpointError` naming it, as are a missing component and weights that
    do not match their recorded checksum (a truncated or replaced file).
    """
    root = resolve(path)
    if (root / "vqvae" / "model.json").exists():
        load = _load_run_component
        models, checksums = _load_checked(load, root, device)
        names = partial(run_class_names, root)
        has_classifier = (root / CLASSIFIER / "model.json").exists()
    elif is_bundle(root):
        load = _load_bundle_component
        models, checksums = _load_checked(load, root, device)
        meta = json.loads((root / "config.json").read_text())
        _check_bundle_config(meta, models[0], models[1], root)
        names = partial(tuple, meta.get("class_names", ()))
        has_classifier = CLASSIFIER in meta.get("components", {})
    else:
        raise CheckpointError(f"{root}: neither a run folder (no vqvae/model.json) nor a model bundle "
                              f"(no config.json of format {FORMAT!r}; make one with `vqgen export RUN OUT`)")
    classifier = None
    if has_classifier:
        classifier, checksums[CLASSIFIER] = load(root, CLASSIFIER, device)
    return Components(models[0], tuple(models[1:]), classifier, ModelInfo(str(path), checksums, names))


def _load_checked(load: Callable, root: Path, device) -> tuple[list[torch.nn.Module], dict[str, str]]:
    """The VQ-VAE and its priors by ``load(root, component, device) -> (model, sha256)``, checked
    to belong together; returns ``([vqvae, prior per level...], {component: sha256})``."""
    loaded = [load(root, VQVAE, device)]
    loaded += [load(root, c, device) for c in components_of(loaded[0][0])[1:]]
    models = [model for model, _ in loaded]
    check_compatible(models[0], models[1:], root)
    return models, {c: checksum for c, (_, checksum) in zip(components_of(models[0]), loaded)}


def _load_run_component(root: Path, component: str, device) -> tuple[torch.nn.Module, str]:
    model, _, checksum = load_model(root / component, device=device)
    return model, checksum


def _load_bundle_component(root: Path, component: str, device) -> tuple[torch.nn.Module, str]:
    """``(model in eval mode, sha256)`` of ``root/component``: its ``config.json`` (a model export's
    JSON, the Hub's name for it) and ``model.safetensors``."""
    folder = root / component
    for needed in (folder / "config.json", folder / "model.safetensors"):
        if not needed.is_file():
            raise CheckpointError(f"bundle {root}: component {component!r} is missing ({needed} not found)")
    model, _, checksum = load_model(folder, device=device, json_name="config.json")
    return model, checksum


def check_compatible(vqvae, priors, where: Path) -> None:
    """A CheckpointError naming the prior that does not fit the VQ-VAE's codebooks and code maps
    (``priors``: one per level, top first)."""
    levels = vqvae.config.hierarchy
    top = priors[0].layout
    problems = []
    for i, (level, prior) in enumerate(zip(levels, priors)):
        name, layout = prior_component(level.name), prior.layout
        shape = level_shape(top.shape, levels[0], level)
        expected_conditions = tuple((above.num_codes, level_shape(top.shape, levels[0], above)) for above in levels[:i])
        problems += [
            f"{name} has a codebook size of {layout.num_codes}, the VQ-VAE's {level.name} codebook {level.num_codes}"
            * (layout.num_codes != level.num_codes),
            f"{name}'s code map {list(layout.shape)} does not fit {prior_component(levels[0].name)}'s "
            f"{list(top.shape)} (expected {list(shape)})" * (tuple(layout.shape) != shape),
            f"{name} is conditioned on {[k for k, _ in layout.conditions]} codes of shapes "
            f"{[list(sh) for _, sh in layout.conditions]}, the VQ-VAE's levels above it have "
            f"{[k for k, _ in expected_conditions]} of {[list(sh) for _, sh in expected_conditions]}"
            * (layout.conditions != expected_conditions),
            f"{name} has {layout.num_classes} classes, {prior_component(levels[0].name)} {top.num_classes}"
            * (bool(layout.num_classes) and layout.num_classes != top.num_classes),
        ]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(f"{where}: the models do not belong together (mismatched codebook sizes or "
                              f"shapes): {'; '.join(problems)}")


def level_shape(top_shape, top_level, level) -> tuple[int, ...]:
    """The code map shape of ``level`` in a model whose top level's map is ``top_shape``."""
    ratio = top_level.downsample // level.downsample
    return tuple(ratio * s for s in top_shape)


def image_side(vqvae, prior_top) -> int:
    """The side of the images the generator makes."""
    return vqvae.config.downsample * prior_top.layout.shape[0]


def classifier_mismatch(classifier, vqvae, prior_top) -> str | None:
    """Why ``classifier`` cannot score the generator's images (other channels, size or classes),
    or None when it can."""
    layout, side = classifier.layout, image_side(vqvae, prior_top)
    classes = prior_top.layout.num_classes
    problems = [
        f"it reads {layout.in_channels}-channel images, the VQ-VAE makes {vqvae.config.in_channels}"
        * (layout.in_channels != vqvae.config.in_channels),
        f"it reads {layout.image_size}x{layout.image_size} images, the priors make {side}x{side}"
        * (layout.image_size != side),
        f"it has {layout.num_classes} classes, the priors {classes}"
        * (bool(classes) and layout.num_classes != classes),
    ]
    problems = [p for p in problems if p]
    return "; ".join(problems) if problems else None


def _check_bundle_config(meta: dict, vqvae, prior_top, root: Path) -> None:
    """The top-level config.json describes these models (it is what users read the images by)."""
    expected = describe(vqvae, prior_top)
    for key in ("image_size", "channels", "num_classes"):
        if meta.get(key) != expected[key]:
            raise CheckpointError(f"{root / 'config.json'}: {key} is {meta.get(key)!r}, but the models have {expected[key]!r}")
    names = meta.get("class_names", [])
    if names and len(names) != expected["num_classes"]:
        raise CheckpointError(f"{root / 'config.json'}: {len(names)} class_names for {expected['num_classes']} classes")


def run_class_names(run_dir: Path) -> tuple[str, ...]:
    """The class names of a run's dataset (from its ``config.toml``); empty when it has none or
    cannot be opened here."""
    from vqgen.config import load_config
    from vqgen.data.datasets import build_source

    try:
        data = load_config(run_dir / "config.toml").data
        return tuple(build_source(data, "train").class_names)
    except (VQGenError, OSError):
        return ()


# ----------------------------------------------------------------------------------------------
# Export


def export_bundle(run_dir: Path, out: Path) -> Path:
    """Write the bundle of ``run_dir`` to ``out`` (a new or empty folder, or an older bundle, which
    is replaced); the bundle is built beside ``out`` and renamed into place."""
    vqvae, priors, classifier, info = load_components(run_dir)
    top = priors[0]
    if not (run_dir / "vqvae" / "model.json").exists():
        raise CheckpointError(f"{run_dir}: export takes a run folder (this is already a bundle)")
    if classifier is not None and (problem := classifier_mismatch(classifier, vqvae, top)):
        raise CheckpointError(f"{run_dir / CLASSIFIER}: the classifier does not fit the generator ({problem}): "
                              "run train-classifier again, or move the folder away to export without it")
    components = (*components_of(vqvae), CLASSIFIER) if classifier is not None else components_of(vqvae)
    if out.exists() and any(out.iterdir()) and not is_bundle(out):
        raise VQGenError(f"{out}: a non-empty folder that is not a model bundle: export into a new folder")
    with storage_errors(out, f"bundle {out}"):
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        staging.chmod(0o777 & ~_umask())  # mkdtemp's 0o700 would hide the bundle from colleagues
    with storage_errors(out, f"bundle {out}", cleanup=lambda: shutil.rmtree(staging, ignore_errors=True)):
        for component in components:
            (staging / component).mkdir()
            shutil.copyfile(run_dir / component / "model.safetensors", staging / component / "model.safetensors")
            atomic_write_json(staging / component / "config.json", read_export_info(run_dir / component))
        meta = bundle_config(vqvae, top, info)
        atomic_write_json(staging / "config.json", meta)
        models = (vqvae, *priors, classifier) if classifier is not None else (vqvae, *priors)
        atomic_write_text(staging / "README.md", model_card(run_dir, meta, components, models))
        if out.exists():
            shutil.rmtree(out)
        staging.replace(out)
    return out


def describe(vqvae, prior_top) -> dict:
    """What the models make: image size, channels, pixel range, number of classes."""
    return {"image_size": image_side(vqvae, prior_top), "channels": vqvae.config.in_channels,
            "normalization": NORMALIZATION, "num_classes": prior_top.layout.num_classes}


def bundle_config(vqvae, prior_top, info: ModelInfo) -> dict:
    """The bundle's top-level ``config.json``: what a user needs to read its images."""
    names = info.class_names if len(info.class_names) == prior_top.layout.num_classes else ()
    return {"format": FORMAT, "version": FORMAT_VERSION, "library_name": "vqgen", **describe(vqvae, prior_top),
            "class_names": list(names),
            "components": {c: {"path": c, "sha256": info.sha256[c]}
                           for c in (*components_of(vqvae), CLASSIFIER) if c in info.sha256}}


def model_card(run_dir: Path, meta: dict, components: tuple[str, ...], models) -> str:
    """A Hub model card: data, training steps and parameters, metrics when the run evaluated."""
    from vqgen.config import load_config

    cfg = load_config(run_dir / "config.toml")
    data = cfg.data
    steps = {"vqvae": cfg.vqvae.train.steps, **{f"prior-{level}": prior.train.steps for level, prior in cfg.prior.items()},
             CLASSIFIER: cfg.classifier.train.steps}
    classes = ", ".join(meta["class_names"]) or (f"{meta['num_classes']} (unnamed)" if meta["num_classes"] else "none")
    lines = [
        "---", "library_name: vqgen", "tags: [image-generation, vq-vae-2, pixelcnn]", "---", "",
        f"# {cfg.run.name}: VQ-VAE-2 with gated PixelCNN priors", "",
        f"Generates {meta['image_size']}x{meta['image_size']} images with {meta['channels']} channel(s), "
        f"pixels in [-1, 1] (uint8 out of `sample`). Classes: {classes}.", "",
        "## Data", "",
        f"`data.kind = {data.kind!r}`" + (f", root `{Path(data.root).name}`" if data.root else "")
        + f", image size {data.image_size}, {data.channels} channel(s)"
        + (f", first {data.num_train} training images" if data.num_train else "") + ".", "",
        "## Training", "",
        "| component | steps | parameters | sha256 |", "|---|---|---|---|",
        *(f"| {c} | {steps[c]} | {sum(p.numel() for p in m.parameters()):,} | `{meta['components'][c]['sha256'][:16]}` |"
          for c, m in zip(components, models)),
        "", *_classifier_lines(run_dir / CLASSIFIER, CLASSIFIER in components),
        *_metrics_lines(run_dir / "eval" / "metrics.json"),
        "## Use", "", "```python", "from vqgen import VQGen", "",
        'gen = VQGen.from_pretrained("PATH_OR_REPO_ID")',
        "images, labels = gen.sample(16, seed=0)  # uint8 [16, C, H, W]", "```", "",
        "or `vqgen sample PATH_OR_REPO_ID --num 1000 --out samples/`.", "",
    ]
    return "\n".join(lines)


def _classifier_lines(folder: Path, included: bool) -> list[str]:
    """The model card's note on the bundled classifier: what it is for and its eval accuracy."""
    if not included:
        return []
    from vqgen.manifest import read_manifest

    accuracy = (read_manifest(folder) or {}).get("metrics", {}).get("val_accuracy")
    figure = f" Its accuracy on the evaluation split: {accuracy:.4f}." if isinstance(accuracy, float) else ""
    return ["The `classifier` component scores samples for classifier-based rejection sampling "
            f"(`vqgen sample PATH --threshold 0.9` or `--keep-fraction 0.5`).{figure}", ""]


def _metrics_lines(path: Path) -> list[str]:
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    rows = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(scalars.items())]
    return ["## Metrics", "", "From the run's evaluation (`eval/metrics.json`).", "",
            "| metric | value |", "|---|---|", *rows, ""]


def _umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
