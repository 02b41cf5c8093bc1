"""The pipeline config: one typed section per stage, loaded from ``pipelines/NAME.toml``.

Each model module owns its architecture config (``VQVAEConfig``, ``PriorConfig``); this module only
composes them into stage sections. A stage is handed its own section (plus the data section where
it reads images), never the whole pipeline config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vqgen.configtools import (
    added_field, apply_overrides, from_dict, load_toml, location_field, schedule_field, switch_field, to_dict, to_toml,
)
from vqgen.data.datasets import DataConfig
from vqgen.errors import ConfigError
from vqgen.models.classifier import ClassifierConfig
from vqgen.models.pixelcnn import PriorConfig
from vqgen.models.vqvae2 import VQVAEConfig
from vqgen.rejection import RejectionConfig
from vqgen.sampling import SamplerConfig
from vqgen.tracking import TrackerKind
from vqgen.train import TrainConfig


@dataclass(kw_only=True)
class RunConfig:
    """Where the run lives and how its processes are set up."""

    name: str = location_field("demo")
    out_dir: str = location_field("runs")
    """Runs are written to ``out_dir/name`` (relative paths are relative to the working directory)."""
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """"auto": bf16 where the hardware computes in it (CUDA GPUs with bf16; CPUs with AVX512-BF16 or
    AMX), float32 elsewhere; "no" forces float32. Under bf16 the losses, logits' softmax, vector
    quantisation and the metrics stay in float32."""
    tracker: TrackerKind = schedule_field("csv")
    """Where metrics go: "csv" (``metrics.csv`` in each stage folder), "none", or any tracker Accelerate
    knows by name ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", ...), which
    logs next to ``metrics.csv``. Its package must be installed: a missing one is an error when the
    run starts."""

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ConfigError("name", f"must be a non-empty folder name, got {self.name!r}")


@dataclass(kw_only=True)
class VQVAEStageConfig:
    """train-vqvae: the VQ-VAE-2 architecture and its optimisation."""

    model: VQVAEConfig = field(default_factory=VQVAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    num_recon_images: int = schedule_field(16)
    """Images in ``recon.png`` (originals above their reconstructions)."""
    eval_batches: int = 8
    """Validation batches for recon MSE / PSNR / codebook usage during training."""


@dataclass(kw_only=True)
class CodesStageConfig:
    """extract-codes: encode the dataset into ``codes/codes.lmdb``."""

    batch_size: int = schedule_field(128)
    include_eval: bool = True
    """Also encode the evaluation split (``codes/eval.lmdb``), for the priors' validation bits/dim."""
    commit_every: int = schedule_field(1024)
    """Records per LMDB write transaction."""
    num_workers: int = added_field(0, schedule=True)
    """DataLoader worker processes that read (decode, transform) the images while the VQ-VAE
    encodes; 0: read in the encoding process."""
    hflip: bool = added_field(False)
    """Also store the codes of every training image flipped left to right (records ``N`` to
    ``2N - 1`` for the ``N`` images): twice the priors' training data where images are few. The
    encoder is not equivariant to flips, so these are the codes of the flipped image, not the
    codes flipped. The evaluation split is stored once, unflipped."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError("batch_size", "must be >= 1")
        if self.commit_every < 1:
            raise ConfigError("commit_every", "must be >= 1")
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0, got {self.num_workers}")


@dataclass(kw_only=True)
class PriorStageConfig:
    """train-prior for one level.

    ``model`` is the prior's architecture; what it models (codebook size, map shapes, classes) comes
    from the code store's metadata, as a :class:`~vqgen.models.pixelcnn.PriorLayout`.
    """

    model: PriorConfig = field(default_factory=PriorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    class_conditional: bool = False
    """Condition on the dataset's class labels (the store must hold labels)."""
    num_sample_images: int = schedule_field(16)
    """Decoded samples in ``samples.png``, written every ``train.image_every`` steps."""
    eval_batches: int = 16
    """Validation batches of held-out codes for bits/dim (0: use the whole eval store)."""


@dataclass(kw_only=True)
class ClassifierStageConfig:
    """train-classifier: the image classifier that scores samples for rejection sampling
    (``sample.rejection``), trained on the labelled training split."""

    enabled: bool = switch_field(False)
    """True: the pipeline trains it (off by default: only rejection sampling reads it). Neither
    defines nor schedules the stage: a classifier trained while switched off stays up to date."""
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hflip: bool = False
    """Random horizontal flips of the training images (the classifier's own: ``data.hflip`` is the
    VQ-VAE's)."""
    max_shift: int = 0
    """Random translations of the training images by up to this many pixels each way (the image
    padded by reflection, then cropped back; 0: off)."""
    eval_batches: int = 0
    """Validation batches for accuracy and loss during training (0: the whole eval split; the
    export's figures are always over the whole split)."""

    def __post_init__(self):
        for name in ("max_shift", "eval_batches"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")


@dataclass(kw_only=True)
class SampleStageConfig:
    """sample: ancestral sampling of each level's codes from the top down, then decoding."""

    num_samples: int = 64
    batch_size: int = 32
    top: SamplerConfig = field(default_factory=SamplerConfig)
    bottom: SamplerConfig = field(default_factory=SamplerConfig)
    middle: dict[str, SamplerConfig] = field(default_factory=dict)
    """Sampling of the levels between the top and the bottom (in a hierarchy of more than two), by
    level name (``[sample.middle.NAME]``); a level not named gets the defaults."""
    cached: bool = schedule_field(True)
    """Incremental sampling with activation caches (False: full recomputation, the slow reference)."""
    cuda_graphs: bool = schedule_field(False)
    """On a GPU, replay each cached sampling step as a CUDA graph (one launch per step instead of
    one per kernel; same codes). Off by default until it has been measured on hardware: see NOTES.md."""
    label: int = -1
    """Class to sample when the priors are class-conditional; -1 draws labels uniformly."""
    seed: int = 0
    grid_size: int = schedule_field(64)
    """Samples shown in ``samples/grid.png``."""
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    """Classifier-based rejection sampling, scored by the train-classifier stage's classifier
    (which must then be switched on or have finished): ``mode`` "threshold" or "keep_fraction"."""

    def __post_init__(self):
        if self.num_samples < 1 or self.batch_size < 1:
            raise ConfigError("num_samples" if self.num_samples < 1 else "batch_size", "must be >= 1")


@dataclass(kw_only=True)
class EvaluateStageConfig:
    """evaluate: sample metrics (FID, KID, IS, precision/recall), reconstructions, bits/dim, report."""

    enabled: bool = True
    """False: the pipeline skips this stage (and says so when the run starts)."""
    reference: str = "eval"
    """What the samples are compared with: "eval" (the evaluation split), "train" (the training
    split), or the path of a statistics file in pytorch-fid's ``.npz`` format (``mu``, ``sigma``),
    such as the statistics published papers use (FID only: KID and precision/recall need images)."""
    inception_weights: str = schedule_field("")
    """Path of the FID Inception weights; empty: the torch hub cache, downloaded there once if missing."""
    inception_url: str = schedule_field("")
    """Where to download the weights from; empty: ``$VQGEN_INCEPTION_URL`` or the standard URL."""
    download_weights: bool = schedule_field(True)
    """Download the weights when they are missing (False: a missing file is an error at start-up)."""
    resize: Literal["torch", "tf1"] = "torch"
    """How images reach the Inception's 299x299 input: "torch" (PyTorch's bilinear, as pytorch-fid
    and torchmetrics do) or "tf1" (TensorFlow 1's bilinear, as the original TF FID code and
    torch-fidelity do). Small images' FIDs differ between the two; ``metrics.json`` records which."""
    num_real: int = 0
    """Real images for the reference (0: the whole reference split)."""
    num_recon: int = 0
    """Images reconstructed for PSNR and rFID (0: as many as ``num_real``)."""
    kid_subsets: int = 100
    """KID: number of random subsets its mean and standard deviation are taken over."""
    kid_subset_size: int = 1000
    """KID: images per subset (capped at the smaller of the two image counts)."""
    pr_k: int = 3
    """Precision / recall: the k of the k-nearest-neighbour manifolds (Kynkäänniemi et al. 2019)."""
    batch_size: int = schedule_field(50)
    stats_cache: str = schedule_field("")
    """Folder for cached reference features and statistics; empty: ``out_dir/fid-stats``."""

    def __post_init__(self):
        for name in ("num_real", "num_recon"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must be >= 0")
        for name in ("batch_size", "kid_subsets", "kid_subset_size", "pr_k"):
            if getattr(self, name) < 1:
                raise ConfigError(name, "must be >= 1")
        if self.reference not in ("eval", "train") and not self.reference.endswith(".npz"):
            raise ConfigError("reference", f'must be "eval", "train" or the path of a .npz statistics file, got {self.reference!r}')

    @property
    def reference_split(self) -> str | None:
        """The dataset split the reference is drawn from; None for a statistics file."""
        return self.reference if self.reference in ("eval", "train") else None


@dataclass(kw_only=True)
class PipelineConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vqvae: VQVAEStageConfig = field(default_factory=VQVAEStageConfig)
    codes: CodesStageConfig = field(default_factory=CodesStageConfig)
    prior: dict[str, PriorStageConfig] = field(default_factory=dict)
    """One section per level of ``vqvae.model`` (``[prior.top]``, ``[prior.bottom]``, ...); a level
    without one gets the defaults."""
    classifier: ClassifierStageConfig = field(default_factory=ClassifierStageConfig)
    sample: SampleStageConfig = field(default_factory=SampleStageConfig)
    evaluate: EvaluateStageConfig = field(default_factory=EvaluateStageConfig)

    def __post_init__(self):
        factor = self.vqvae.model.downsample
        if self.data.image_size % factor:
            raise ConfigError("data.image_size", f"must be a multiple of {factor}, the top level's downsampling "
                                                 f"(vqvae.model.levels), got {self.data.image_size}")
        levels = self.vqvae.model.level_names
        for name in self.prior:
            if name not in levels:
                raise ConfigError(f"prior.{name}", f"names no level of the VQ-VAE (vqvae.model levels: "
                                                   f"{', '.join(levels)})")
        self.prior = {name: self.prior.get(name) or PriorStageConfig() for name in levels}
        for name in self.sample.middle:
            if name not in levels[1:-1]:
                raise ConfigError(f"sample.middle.{name}", f"names no level between the top and the bottom "
                                                           f"(vqvae.model levels: {', '.join(levels)}); the top "
                                                           "and bottom levels have sample.top and sample.bottom")

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


def shipped_pipelines() -> dict[str, Path]:
    """The pipelines installed with vqgen, by name (``demo`` → ``.../vqgen/pipelines/demo.toml``)."""
    from importlib.resources import files

    folder = Path(str(files("vqgen.pipelines")))
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


def resolve_pipeline(path: str | Path) -> Path:
    """``path`` itself when it exists (or looks like a path), else the shipped pipeline of that name,
    so ``vqgen run demo`` works from any folder after a plain install."""
    path = Path(path)
    if path.is_file() or path.suffix or len(path.parts) > 1:
        return path
    shipped = shipped_pipelines()
    if str(path) in shipped:  # a bare name; a folder of that name here (often a run's) is no config
        return shipped[str(path)]
    if path.exists():
        return path  # load_toml names what it is
    raise ConfigError("", f"no config file {path} here, and no shipped pipeline of that name "
                          f"(shipped: {', '.join(shipped)})")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> PipelineConfig:
    """Load a pipeline TOML (a path, or the name of a shipped pipeline; the defaults when ``path``
    is None) and apply ``--set`` overrides."""
    raw = load_toml(str(resolve_pipeline(path))) if path is not None else {}
    return from_dict(PipelineConfig, apply_overrides(raw, list(overrides)))


def config_to_toml(cfg: PipelineConfig) -> str:
    """The resolved config with every default written out (``run_dir/config.toml``)."""
    return "# resolved vqgen config: every value, defaults included\n" + to_toml(to_dict(cfg))
