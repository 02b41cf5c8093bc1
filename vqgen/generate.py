"""A trained generator: the VQ-VAE-2 and its two priors, drawing images batch by batch.

:meth:`VQGen.draw` is the one place a batch is drawn (:meth:`VQGen.draw_batch` is its images):
the pipeline's sample stage, :meth:`VQGen.sample` and ``vqgen sample`` all call it, so the same
models, seed and settings give the same images everywhere. Batch ``b`` of a :class:`SamplePlan`
draws from its own CPU generator seeded from ``(seed, b)``, so its images depend neither on the
device nor on which process draws it. With rejection sampling (``plan.rejection``, scored by the
run's classifier) a batch draws candidate rounds of its own until its images are accepted
(:mod:`vqgen.rejection`): the same holds.

Long runs go through :func:`write_parts` (each finished batch saved at once as
``parts/batch-NNNNNN.npz``: memory is bounded by a batch, and an interrupted run resumes at the next
unfinished batch) and :func:`finish_parts` (the parts streamed into one ``samples.npz``, and a grid
of the first images). :func:`sample_to_folder` is ``vqgen sample``: those two, one PNG per image,
and a manifest.

    >>> gen = VQGen.from_pretrained("runs/demo")          # or a bundle folder, or a Hub repo id
    >>> images, labels = gen.sample(16, labels=["circle", "ring"], seed=0)
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from vqgen.bundle import CLASSIFIER, ModelInfo, classifier_mismatch, image_side, load_components
from vqgen.data.datasets import open_npz, read_npz_array, to_uint8
from vqgen.data.samples import concatenate_samples, first_images, save_samples
from vqgen.distributed import on_main_process, process_state, shard_indices
from vqgen.errors import ConfigError, DataError, VQGenError
from vqgen.rejection import (
    RejectionConfig, acceptance_summary, fill_batch, intended_probability, rejection_rule, round_generator,
)
from vqgen.sampling import SamplerConfig, sample
from vqgen.utils import atomic_write_json, read_json

SEED_STRIDE = 1_000_003
"""Batch ``b`` of seed ``s`` draws from a generator seeded ``s * SEED_STRIDE + b``."""


class Samples(NamedTuple):
    images: torch.Tensor
    """uint8 ``[N, C, H, W]`` on the CPU."""
    labels: torch.Tensor
    """int64 ``[N]``: each image's class, -1 when the priors are unconditional."""


class DrawnBatch(NamedTuple):
    """One batch as :meth:`VQGen.draw` makes it: its images and what rejection sampling took."""

    samples: Samples
    drawn: int
    """Candidate images drawn for it (its size without rejection sampling)."""
    scores: torch.Tensor | None
    """float32 ``[N]``: the classifier's probability of each image's intended class (None
    without rejection sampling)."""


@dataclass(frozen=True, kw_only=True)
class SamplePlan:
    """What fixes the images of a sampling run: with the same models, the same plan gives the same
    images, in whatever batches of processes they are drawn."""

    num_samples: int
    batch_size: int = 32
    seed: int = 0
    top: SamplerConfig = field(default_factory=SamplerConfig)
    bottom: SamplerConfig = field(default_factory=SamplerConfig)
    middle: dict[str, SamplerConfig] = field(default_factory=dict)
    """The levels between the top and the bottom, by name (a level not named: the defaults)."""
    labels: tuple[int, ...] = ()
    """Sample ``i`` gets ``labels[i % len(labels)]``; empty: each batch draws its labels uniformly
    (class-conditional priors; unconditional ones take no labels)."""
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    """Classifier-based rejection sampling (off by default); see :mod:`vqgen.rejection`."""

    def __post_init__(self) -> None:
        for name in ("num_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def batch_indices(self, batch: int) -> range:
        """The global indices of batch ``batch``'s samples."""
        return range(batch * self.batch_size, min((batch + 1) * self.batch_size, self.num_samples))

    def sampler(self, levels: tuple[str, ...], index: int) -> SamplerConfig:
        """The sampling settings of level ``levels[index]`` (``levels`` top first)."""
        if index == 0:
            return self.top
        if index == len(levels) - 1:
            return self.bottom
        return self.middle.get(levels[index], SamplerConfig())

    def generator(self, batch: int) -> torch.Generator:
        # On the CPU: every random number is drawn there and moved, so a seed gives the same
        # samples on any device.
        return torch.Generator(device="cpu").manual_seed(self.seed * SEED_STRIDE + batch)

    def settings(self) -> dict:
        """The plan as plain JSON data (manifests, resume checks): what fixes the images (the
        rejection rule only when one is on, so plans without one read as they always did)."""
        settings = {**asdict(self), "labels": list(self.labels)}
        settings.pop("rejection")
        for sampler in (settings["top"], settings["bottom"], *settings["middle"].values()):
            if sampler["precision"] == "fp32":  # the default: plans from before the option read as they did
                sampler.pop("precision")
        if not self.middle:  # two levels: the plan reads as it always did
            settings.pop("middle")
        return {**settings, "rejection": self.rejection.settings()} if self.rejection.active else settings


class VQGen:
    """A trained VQ-VAE-2 with one prior per level, top first (and the classifier of rejection
    sampling, when the run trained one): ``VQGen(vqvae, prior_top, prior_bottom)``.

    Args:
        classifier: scores images for rejection sampling (:mod:`vqgen.rejection`); None: none.
        bf16: run the VQ-VAE (decoding, encoding) under bf16 autocast where the device supports it.
            The priors stay in float32: the cached sampler's caches are float32 buffers.
        cached: sample with activation caches (False: full recomputation, the slow reference).
        cuda_graphs: replay each cached sampling step as a CUDA graph (on a GPU; same codes).
    """

    def __init__(self, vqvae, *priors, classifier=None, info: ModelInfo | None = None,
                 bf16: bool = False, cached: bool = True, cuda_graphs: bool = False):
        levels = vqvae.config.level_names
        if len(priors) != len(levels):
            raise ConfigError("priors", f"the VQ-VAE has {len(levels)} levels ({', '.join(levels)}), "
                                        f"got {len(priors)} priors")
        self.vqvae, self.priors = vqvae.eval(), tuple(prior.eval() for prior in priors)
        self.classifier = classifier.eval() if classifier is not None else None
        self.info = info or ModelInfo("")
        self.bf16, self.cached, self.cuda_graphs = bf16, cached, cuda_graphs

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu", bf16: bool = False,
                        cached: bool = True, cuda_graphs: bool = False) -> VQGen:
        """Load a run folder (``RUN/vqvae``, ``RUN/prior-top``, ``RUN/prior-bottom``, and
        ``RUN/classifier`` when there is one), a bundle from ``vqgen export``, or a Hub repo id of
        one; the options are the constructor's."""
        vqvae, priors, classifier, info = load_components(path, device=device)
        return cls(vqvae, *priors, classifier=classifier, info=info, bf16=bf16, cached=cached,
                   cuda_graphs=cuda_graphs)

    def to(self, device: str | torch.device) -> VQGen:
        for model in (self.vqvae, *self.priors, self.classifier):
            if model is not None:
                model.to(device)
        return self

    @property
    def prior_top(self):
        return self.priors[0]

    @property
    def prior_bottom(self):
        return self.priors[-1]

    @property
    def device(self) -> torch.device:
        return self.prior_top.embed.weight.device

    @property
    def num_classes(self) -> int:
        return self.prior_top.layout.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes' names, when the model's data has them (empty otherwise)."""
        names = self.info.class_names
        return names if len(names) == self.num_classes else ()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images."""
        side = image_side(self.vqvae, self.prior_top)
        return self.vqvae.config.in_channels, side, side

    def class_labels(self, labels: int | str | Sequence[int | str] | None) -> tuple[int, ...]:
        """Class indices of ``labels`` (indices or class names); a ConfigError for a label
        outside the classes, an unknown name, or labels for unconditional priors."""
        if labels is None:
            return ()
        items = [labels] if isinstance(labels, (int, str)) else list(labels)
        if items and not self.num_classes:
            raise ConfigError("labels", "these priors are unconditional: they take no class labels")
        return tuple(self._class_index(item) for item in items)

    def _class_index(self, label: int | str) -> int:
        if isinstance(label, str):
            if label not in self.class_names:
                known = ", ".join(self.class_names) or "none: this model's data has no class names, give indices"
                raise ConfigError("labels", f"unknown class name {label!r} (classes: {known})")
            return self.class_names.index(label)
        if not 0 <= int(label) < self.num_classes:
            raise ConfigError("labels", f"class {label} is outside this model's {self.num_classes} classes "
                                        f"(0 to {self.num_classes - 1})")
        return int(label)

    def plan(self, num: int, *, labels=None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             precision: str = "fp32", seed: int = 0, batch_size: int = 32, top: SamplerConfig | None = None,
             bottom: SamplerConfig | None = None, threshold: float | None = None,
             keep_fraction: float | None = None, max_draw_factor: float | None = None) -> SamplePlan:
        """The :class:`SamplePlan` of :meth:`sample`'s arguments (``vqgen sample`` builds its own so)."""
        both = SamplerConfig(temperature=temperature, top_k=top_k, top_p=top_p, precision=precision)
        middle = {name: both for name in self.vqvae.config.level_names[1:-1]}
        plan = SamplePlan(num_samples=num, batch_size=batch_size, seed=seed, top=top or both,
                          bottom=bottom or both, middle=middle, labels=self.class_labels(labels),
                          rejection=rejection_rule(threshold, keep_fraction, max_draw_factor))
        self.check_plan(plan)
        return plan

    def sample(self, num: int, *, labels: int | str | Sequence[int | str] | None = None, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, precision: str = "fp32", seed: int = 0,
               generator: torch.Generator | None = None,
               batch_size: int = 32, top: SamplerConfig | None = None, bottom: SamplerConfig | None = None,
               threshold: float | None = None, keep_fraction: float | None = None,
               max_draw_factor: float | None = None, progress: bool = False) -> Samples:
        """Draw ``num`` images: ``(images uint8 [num, C, H, W], labels int64 [num])``.

        Args:
            labels: None draws classes uniformly; a class (index or name) for all; a list: image
                ``i`` gets ``labels[i % len(labels)]`` (a list of ``num`` gives each image's).
            temperature, top_k, top_p, precision: every level's sampling (:class:`SamplerConfig`);
                ``top`` / ``bottom`` replace them for the top and the bottom level.
            seed: batch ``b`` draws from a generator seeded ``seed * 1_000_003 + b``, as the
                pipeline's sample stage does: its settings give its images.
            generator: draw every batch from this generator instead (reproducible from its state).
            threshold, keep_fraction: classifier-based rejection sampling with the model's
                classifier (one of them): keep an image when the classifier's probability of its
                class is at least ``threshold``, or keep the best ``keep_fraction`` of each batch's
                candidates (:mod:`vqgen.rejection`). ``max_draw_factor``: give up when a batch would
                draw more than this many times its images.
        """
        plan = self.plan(num, labels=labels, temperature=temperature, top_k=top_k, top_p=top_p,
                         precision=precision, seed=seed,
                         batch_size=batch_size, top=top, bottom=bottom, threshold=threshold,
                         keep_fraction=keep_fraction, max_draw_factor=max_draw_factor)
        batches = [self.draw_batch(plan, b, generator=generator, progress=progress) for b in range(plan.num_batches)]
        return Samples(torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches]))

    def check_plan(self, plan: SamplePlan) -> None:
        """A ConfigError when ``plan`` asks for rejection sampling that these models cannot do."""
        if not plan.rejection.active:
            return
        if self.classifier is None:
            where = f" ({self.info.source} has no {CLASSIFIER}/)" if self.info.source else ""
            raise ConfigError("rejection", f"rejection sampling needs a classifier{where}: train one with the "
                                           "train-classifier stage (classifier.enabled = true)")
        if not self.num_classes:
            raise ConfigError("rejection", "rejection sampling scores each image's intended class, and these "
                                           "priors are unconditional")
        if problem := classifier_mismatch(self.classifier, self.vqvae, self.prior_top):
            raise ConfigError("rejection", f"the classifier does not fit these models ({problem})")

    def draw_batch(self, plan: SamplePlan, batch: int, *, generator: torch.Generator | None = None,
                   progress: bool = False) -> Samples:
        """The images of batch ``batch`` of ``plan`` (:meth:`draw`)."""
        return self.draw(plan, batch, generator=generator, progress=progress).samples

    @torch.no_grad()
    def draw(self, plan: SamplePlan, batch: int, *, generator: torch.Generator | None = None,
             progress: bool = False) -> DrawnBatch:
        """Batch ``batch`` of ``plan``: its labels, each level's codes given those above, then the
        decoder; with rejection sampling, candidate rounds until the classifier accepts them."""
        indices = plan.batch_indices(batch)
        n = len(indices)
        first = generator or plan.generator(batch)
        labels = None
        if self.num_classes:
            # Uniform labels come first from the batch's generator, before any code is drawn.
            labels = (torch.tensor([plan.labels[i % len(plan.labels)] for i in indices]) if plan.labels
                      else torch.randint(self.num_classes, (n,), generator=first))
        if not plan.rejection.active:
            images = self._draw_images(plan, labels, n, first, progress)
            return DrawnBatch(Samples(images, labels if labels is not None else torch.full((n,), -1)), n, None)
        self.check_plan(plan)

        def candidates(round_: int, positions: torch.Tensor) -> torch.Tensor:
            # Round 0 is the batch without rejection; later rounds have generators of their own.
            rng = first if round_ == 0 or generator is not None else round_generator(plan.seed, batch, round_)
            return self._draw_images(plan, labels[positions], len(positions), rng, progress)

        kept = fill_batch(plan.rejection, labels, candidates, self.score, batch)
        return DrawnBatch(Samples(kept.images, labels), kept.drawn, kept.scores)

    def _draw_images(self, plan: SamplePlan, labels: torch.Tensor | None, n: int, generator: torch.Generator,
                     progress: bool) -> torch.Tensor:
        """uint8 images of ``n`` sets of code maps, drawn from ``generator`` for ``labels`` level by
        level from the top, each given the levels above it."""
        return self.decode(*self.draw_codes(plan, labels, n, generator, progress=progress))

    @torch.no_grad()
    def draw_codes(self, plan: SamplePlan, labels: torch.Tensor | None, n: int, generator: torch.Generator, *,
                   above: Sequence[torch.Tensor] = (), progress: bool = False) -> list[torch.Tensor]:
        """Every level's code maps, top first, for ``n`` images of ``labels``: ``above`` (the codes of
        the top ``len(above)`` levels, e.g. of real images) as given, the levels below drawn from
        ``generator`` one after the other, each given the levels above it."""
        if labels is not None:
            labels = labels.to(self.device)
        options = dict(generator=generator, cached=self.cached, cuda_graphs=self.cuda_graphs, progress=progress)
        levels, codes = self.vqvae.config.level_names, [c.to(self.device) for c in above]
        if len(codes) > len(self.priors):
            raise ValueError(f"{len(codes)} levels of codes given for a model of {len(self.priors)}")
        for index in range(len(codes), len(self.priors)):
            prior = self.priors[index]
            codes.append(sample(prior, n, labels=labels if prior.layout.num_classes else None,
                                condition=tuple(codes) or None, config=plan.sampler(levels, index), **options))
        return codes

    def score(self, images, labels) -> torch.Tensor:
        """float32 ``[N]``: the classifier's probability of ``labels`` for uint8 ``images``."""
        if self.classifier is None:
            raise ConfigError("rejection", "these models have no classifier")
        return intended_probability(self.classifier, torch.as_tensor(images), torch.as_tensor(labels))

    def _autocast(self):
        kind = self.device.type
        supported = kind == "cpu" or (kind == "cuda" and torch.cuda.is_bf16_supported())
        if not (self.bf16 and supported):
            return contextlib.nullcontext()
        return torch.autocast(kind, dtype=torch.bfloat16)

    @torch.no_grad()
    def encode(self, images) -> tuple[torch.Tensor, ...]:
        """Code maps of images, one per level, top first (``(top [N, H/8, W/8], bottom [N, H/4, W/4])``
        for two levels); images: uint8 ``[N, C, H, W]`` (a tensor or an array) or float in [-1, 1]."""
        with self._autocast():
            return self.vqvae.encode(self._as_input(images))

    @torch.no_grad()
    def decode(self, *codes: torch.Tensor) -> torch.Tensor:
        """uint8 images ``[N, C, H, W]`` (on the CPU) of code maps, one per level, top first."""
        with self._autocast():
            images = self.vqvae.decode_codes(*(c.to(self.device) for c in codes))
        return to_uint8(images.float()).cpu()

    def reconstruct(self, images) -> torch.Tensor:
        """uint8 reconstructions of images (as :meth:`encode` takes them)."""
        return self.decode(*self.encode(images))

    def _as_input(self, images) -> torch.Tensor:
        images = torch.as_tensor(images)
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise DataError(f"images: expected [N, {', '.join(map(str, self.image_shape))}], got {list(images.shape)}")
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1.0
        return images.to(self.device, torch.float32)


# ----------------------------------------------------------------------------------------------
# Long runs: one part file per batch, then one samples file


def part_path(parts: Path, batch: int) -> Path:
    return parts / f"batch-{batch:06d}.npz"


def unfinished_batches(parts: Path, plan: SamplePlan, rank: int, world: int) -> list[int]:
    """This process's batches (``rank, rank + world, ...``) that have no part file yet."""
    return [b for b in shard_indices(plan.num_batches, rank, world) if not part_path(parts, b).exists()]


def write_parts(parts: Path, batches: Sequence[int], draw: Callable[[int], DrawnBatch],
                progress: bool = False) -> tuple[int, float]:
    """Draw ``batches`` with ``draw``, saving each as its part file as soon as it is made (the part
    is what marks a batch finished; with rejection sampling it also holds the batch's candidate
    count and scores, so the acceptance figures survive a resume). Returns ``(images made, seconds)``."""
    start, made = time.perf_counter(), 0
    for b in tqdm(batches, desc="sample batches", disable=not progress):
        (images, labels), drawn, scores = draw(b)
        extra = None if scores is None else {"drawn": np.array([drawn], dtype=np.int64),
                                             "scores": scores.numpy().astype(np.float32)}
        save_samples(part_path(parts, b), images.numpy(), labels.numpy(), extra=extra)
        made += len(images)
    return made, time.perf_counter() - start


def finish_parts(parts: Path, plan: SamplePlan, out: Path, grid_size: int, npz: bool = True) -> str | None:
    """``out/samples.npz`` streamed from the parts (when ``npz``) and ``out/grid.png`` of the first
    ``grid_size`` images; returns the samples' fingerprint (see
    :func:`~vqgen.data.samples.concatenate_samples`), None without ``npz``."""
    from vqgen.pictures import save_grid

    paths = [part_path(parts, b) for b in range(plan.num_batches)]
    fingerprint = concatenate_samples(out / "samples.npz", paths) if npz else None
    save_grid(torch.from_numpy(first_images(paths, grid_size)), out / "grid.png")
    return fingerprint


def rejection_figures(parts: Path, plan: SamplePlan) -> dict:
    """The acceptance rate (kept / drawn over every batch) and the kept images' mean probability
    of their intended class, from the parts; empty without rejection sampling."""
    if not plan.rejection.active:
        return {}
    kept = drawn = 0
    score_sum = 0.0
    for b in range(plan.num_batches):
        path = part_path(parts, b)
        with open_npz(path) as arrays:
            if "drawn" not in arrays.files or "scores" not in arrays.files:
                raise DataError(f"{path}: a part of a rejection-sampling run without its figures (drawn, scores)")
            scores = read_npz_array(arrays, path, "scores").astype(np.float64)
            drawn += int(read_npz_array(arrays, path, "drawn")[0])
        kept += len(scores)
        score_sum += float(scores.sum())
    return acceptance_summary(kept, drawn, score_sum)


# ----------------------------------------------------------------------------------------------
# `vqgen sample`: a folder of images

FORMATS = ("png", "npz")
MANIFEST = "manifest.json"


def sample_to_folder(gen: VQGen, plan: SamplePlan, out: Path, *, formats: Sequence[str] = FORMATS,
                     grid_size: int = 64) -> dict:
    """Write ``plan``'s images into the new folder ``out``: ``images/NNNNNN.png`` per image (in
    ``images/<label>/`` when the priors are class-conditional), ``samples.npz``, ``grid.png`` and
    ``manifest.json`` (every setting, the models' sha256, throughput; with rejection sampling, the
    acceptance rate and the kept images' mean probability of their class). Returns the manifest.

    Under ``torchrun`` / ``accelerate launch`` the processes share the batches; the images do not
    depend on their number. A rerun into the same folder continues at the next unfinished batch, and
    refuses (a ConfigError naming the setting) if any setting differs from the first run's.
    """
    state = process_state()
    gen.check_plan(plan)
    # The classifier is one of the models only when it scores: without rejection sampling, a
    # classifier trained since an interrupted run does not change its images.
    models = {c: sha for c, sha in gen.info.sha256.items() if c != CLASSIFIER or plan.rejection.active}
    settings = {**plan.settings(), "format": sorted(set(formats)), "bf16": gen.bf16, "models": models}
    done, resumed = on_main_process(lambda: _prepare_folder(gen, plan, out, settings))
    if done is not None:
        return done
    start = time.perf_counter()
    parts = out / "parts"

    def draw(batch: int) -> DrawnBatch:
        drawn = gen.draw(plan, batch)
        if "png" in formats:
            _write_pngs(drawn.samples, plan.batch_indices(batch), out, conditional=gen.num_classes > 0)
        return drawn

    write_parts(parts, unfinished_batches(parts, plan, state.process_index, state.num_processes), draw,
                progress=state.is_main_process)
    state.wait_for_everyone()

    def finish() -> dict:
        finish_parts(parts, plan, out, grid_size, npz="npz" in formats)
        seconds = time.perf_counter() - start
        made = plan.num_samples - resumed
        manifest = {**read_json(out / MANIFEST), "finished": True, "count": plan.num_samples,
                    "made_now": made, "resumed_from_parts": resumed, "processes": state.num_processes,
                    "seconds": round(seconds, 3), "samples_per_sec": round(made / max(seconds, 1e-9), 2)}
        if plan.rejection.active:
            manifest["rejection"] = {**plan.rejection.settings(), **rejection_figures(parts, plan)}
        atomic_write_json(out / MANIFEST, manifest)
        shutil.rmtree(parts)  # after the manifest: a kill in between leaves a complete folder
        return manifest

    return on_main_process(finish)


def _prepare_folder(gen: VQGen, plan: SamplePlan, out: Path, settings: dict) -> tuple[dict | None, int]:
    """Check ``out`` and record the settings. Returns ``(the manifest if the folder is already
    complete, else None; images already made by an interrupted run)``."""
    if gen.info.source:
        _refuse_model_folder(Path(gen.info.source), out)
    manifest, parts = out / MANIFEST, out / "parts"
    if manifest.exists():
        previous = read_json(manifest)
        _check_same_settings(previous.get("settings", {}), settings, out)
        if previous.get("finished"):
            print(f"{out}: already complete ({plan.num_samples} images)")
            return previous, plan.num_samples
    elif out.exists() and any(out.iterdir()):
        raise VQGenError(f"--out {out}: a non-empty folder that `vqgen sample` did not make: give a new folder")
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest, {
        "finished": False, "settings": settings, "source": gen.info.source, "class_names": list(gen.class_names),
        "device": str(gen.device), "cached": gen.cached, "cuda_graphs": gen.cuda_graphs,
    })
    return None, sum(len(plan.batch_indices(b)) for b in range(plan.num_batches) if part_path(parts, b).exists())


def _refuse_model_folder(source: Path, out: Path) -> None:
    """Samples never go into the model's own folders (a run's ``samples/`` is the pipeline's)."""
    out = out.resolve()
    folders = [source / d for d in ("vqvae", CLASSIFIER, "samples", "codes", "eval")] + list(source.glob("prior-*"))
    inside = source.is_dir() and (out == source.resolve() or any(out.is_relative_to(d.resolve()) for d in folders))
    if inside or (out / "stage.json").exists():
        raise VQGenError(f"--out {out}: inside the model's folder {source} (its samples/ belongs to the "
                         "pipeline's sample stage): give a folder of its own")


def _check_same_settings(previous: dict, settings: dict, out: Path, prefix: str = "") -> None:
    """A ConfigError naming the first setting in which a rerun differs from the folder's first run."""
    for key in sorted(set(previous) | set(settings)):
        old, new = previous.get(key), settings.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            _check_same_settings(old, new, out, f"{prefix}{key}.")
        elif old != new:
            raise ConfigError(f"{prefix}{key}", f"{out} was started with {old!r}, this run asks for {new!r}: "
                                                "sample into a new --out folder, or delete this one to start over")


def _write_pngs(samples: Samples, indices: range, out: Path, conditional: bool) -> None:
    """``out/images/[label/]NNNNNN.png`` by global index: a folder of images only, which evaluation
    tools (and ``vqgen score``) read as it is. Not atomic, and need not be: the part file written
    after them marks the batch finished, and a batch cut short is drawn again, its PNGs rewritten."""
    from PIL import Image

    for i, image, label in zip(indices, samples.images.numpy(), samples.labels.tolist()):
        folder = out / "images" / str(label) if conditional else out / "images"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(folder / f"{i:06d}.png")
