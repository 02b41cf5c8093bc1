"""Classifier-based rejection sampling (Razavi et al. 2019, section 4): drawn images are scored by
a classifier's probability of the class they were drawn for, and only the likely ones are kept.
Fewer images are accepted as the rule gets stricter; the kept ones are closer to their class
(precision, Inception Score) at the cost of diversity (recall).

The unit is one output batch of a :class:`~vqgen.generate.SamplePlan`: its ``n`` positions have
their intended classes (drawn or given as without rejection), and candidates are drawn for them in
rounds ``r = 0, 1, 2, ...``, each round from a generator of its own seeded from ``(seed, batch, r)``
(:func:`round_generator`; round 0 is the batch's generator without rejection). Everything a batch
keeps depends on its own rounds only, so the images do not depend on which process draws the
batch, nor on how many processes there are. Two rules (:class:`RejectionConfig`):

- ``threshold``: a candidate is kept when its probability is ``>= threshold``; each round draws a
  candidate for every position still open (for its class), until every position is filled. Each
  kept image is an exact draw from the model's distribution of its class restricted to the
  accepted images.
- ``keep_fraction``: the batch draws ``ceil(n / keep_fraction)`` candidates (rounds of ``n``, for
  positions ``0, 1, ...``; the last round partial) and keeps, for each class, the best of that
  class's candidates by probability, as many as the batch has positions of the class. The
  acceptance rate is ``n / ceil(n / keep_fraction)``, and each class keeps its share of the batch.

Either way position ``i`` ends up with an image of its intended class, and the batch records how
many candidates it drew (the acceptance rate is kept / drawn) and the kept images' probabilities.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from vqgen.configtools import added_field
from vqgen.errors import ConfigError, VQGenError

RejectionMode = Literal["off", "threshold", "keep_fraction"]


@dataclass(kw_only=True)
class RejectionConfig:
    """Classifier-based rejection sampling (``[sample.rejection]``; off by default)."""

    mode: RejectionMode = added_field("off")
    """"off"; "threshold": keep an image when the classifier's probability of its intended class is
    at least ``threshold``; "keep_fraction": keep the best ``keep_fraction`` of each batch's
    candidates, class by class."""
    threshold: float = added_field(0.5)
    keep_fraction: float = added_field(0.5)
    max_draw_factor: float = added_field(20.0, schedule=True)
    """Give up (an error naming the batch) when a batch would need more than this many times its
    images in candidates: it decides whether a run finishes, never which images it keeps."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError("threshold", f"must be in [0, 1], got {self.threshold}")
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ConfigError("keep_fraction", f"must be in (0, 1], got {self.keep_fraction}")
        if self.max_draw_factor < 1.0:
            raise ConfigError("max_draw_factor", f"must be >= 1, got {self.max_draw_factor}")
        if self.mode == "keep_fraction" and 1.0 / self.keep_fraction > self.max_draw_factor + 1e-9:
            raise ConfigError("keep_fraction", f"{self.keep_fraction} draws {1 / self.keep_fraction:.4g} "
                                               f"candidates per image, more than max_draw_factor "
                                               f"{self.max_draw_factor}: raise max_draw_factor")

    @property
    def active(self) -> bool:
        return self.mode != "off"

    def settings(self) -> dict:
        """What fixes the kept images (not ``max_draw_factor``), as plain data; empty when off."""
        if not self.active:
            return {}
        return {"mode": self.mode, self.mode: getattr(self, self.mode)}

    def candidates_per_batch(self, n: int) -> int:
        """``keep_fraction``: the candidates a batch of ``n`` images draws."""
        # The tolerance keeps a float quotient such as 3 / 0.1 = 30.000000000000004 at 30.
        return max(n, math.ceil(n / self.keep_fraction - 1e-9))

    def draw_limit(self, n: int) -> int:
        return math.floor(self.max_draw_factor * n + 1e-9)


class RejectionError(VQGenError):
    """A batch whose images the classifier accepts too rarely to finish within ``max_draw_factor``."""


class Kept(NamedTuple):
    """One batch's result: its images in position order, their scores, and what it took."""

    images: Tensor
    """uint8 ``[n, C, H, W]`` on the CPU; position ``i`` holds an image of ``labels[i]``."""
    scores: Tensor
    """float32 ``[n]``: the classifier's probability of each kept image's intended class."""
    drawn: int
    """Candidates drawn for the batch (``n`` of them kept)."""


DrawRound = Callable[[int, Tensor], Tensor]
"""``draw(round, positions) -> uint8 images [len(positions), C, H, W]``: one candidate for each of
``positions`` (indices into the batch), of its intended class, drawn from round ``round``'s generator."""
Score = Callable[[Tensor, Tensor], Tensor]
"""``score(images, labels) -> float [N]``: the probability of each image's intended class."""


def fill_batch(cfg: RejectionConfig, labels: Tensor, draw: DrawRound, score: Score, batch: int = 0) -> Kept:
    """The kept images of one batch whose positions have the intended classes ``labels [n]``
    (``batch`` only names it in errors); see the module docstring for the two rules."""
    if cfg.mode == "threshold":
        return _by_threshold(cfg, labels.cpu(), draw, score, batch)
    if cfg.mode == "keep_fraction":
        return _by_fraction(cfg, labels.cpu(), draw, score, batch)
    raise ValueError(f"rejection mode {cfg.mode!r} draws no candidates")


def _by_threshold(cfg: RejectionConfig, labels: Tensor, draw: DrawRound, score: Score, batch: int) -> Kept:
    n, limit = len(labels), cfg.draw_limit(len(labels))
    open_positions, images, scores = torch.arange(n), None, torch.zeros(n)
    drawn, round_ = 0, 0
    while len(open_positions):
        if drawn + len(open_positions) > limit:
            raise _too_rare(cfg, batch, n, drawn, n - len(open_positions))
        candidates = draw(round_, open_positions)
        probability = score(candidates, labels[open_positions]).float().cpu()
        if images is None:
            images = torch.empty((n, *candidates.shape[1:]), dtype=candidates.dtype)
        accepted = probability >= cfg.threshold
        images[open_positions[accepted]] = candidates[accepted]
        scores[open_positions[accepted]] = probability[accepted]
        open_positions = open_positions[~accepted]
        drawn, round_ = drawn + len(candidates), round_ + 1
    return Kept(images, scores, drawn)


def _by_fraction(cfg: RejectionConfig, labels: Tensor, draw: DrawRound, score: Score, batch: int) -> Kept:
    n = len(labels)
    total = cfg.candidates_per_batch(n)
    if total > cfg.draw_limit(n):
        raise _too_rare(cfg, batch, n, total, 0)
    rounds = [torch.arange(min(n, total - start)) for start in range(0, total, n)]
    drawn_images, probabilities = [], []
    for round_, positions in enumerate(rounds):
        candidates = draw(round_, positions)
        drawn_images.append(candidates)
        probabilities.append(score(candidates, labels[positions]).float().cpu())
    candidates, probability = torch.cat(drawn_images), torch.cat(probabilities)
    candidate_labels = labels[torch.cat(rounds)]
    images = torch.empty((n, *candidates.shape[1:]), dtype=candidates.dtype)
    scores = torch.zeros(n)
    for label in labels.unique():
        positions = (labels == label).nonzero().squeeze(1)
        mine = (candidate_labels == label).nonzero().squeeze(1)
        # Stable: of equal probabilities the earlier candidate wins; the kept ones fill the class's
        # positions in the order they were drawn.
        order = torch.sort(probability[mine], descending=True, stable=True).indices
        best = mine[order[: len(positions)]].sort().values
        images[positions], scores[positions] = candidates[best], probability[best]
    return Kept(images, scores, total)


def _too_rare(cfg: RejectionConfig, batch: int, n: int, drawn: int, kept: int) -> RejectionError:
    rule = f"threshold {cfg.threshold}" if cfg.mode == "threshold" else f"keep_fraction {cfg.keep_fraction}"
    rate = f"{kept / drawn:.2%}" if drawn else "n/a"
    return RejectionError(
        f"rejection sampling gave up on batch {batch}: {drawn} candidates drawn for {n} images, {kept} "
        f"accepted (acceptance {rate}) with {rule}; another round would draw more than max_draw_factor "
        f"= {cfg.max_draw_factor:g} times the batch. Loosen the rule or raise max_draw_factor "
        "(sample.rejection.max_draw_factor; --max-draw-factor for `vqgen sample`)")


def round_generator(seed: int, batch: int, round_: int) -> torch.Generator:
    """The CPU generator of candidate round ``round_ >= 1`` of batch ``batch`` (round 0 is the
    batch's own generator): seeded from a hash of the three, so no two rounds of any batches share
    a stream, on every platform."""
    digest = hashlib.sha256(f"vqgen-rejection:{seed}:{batch}:{round_}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@torch.no_grad()
def intended_probability(classifier: torch.nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    """float32 ``[N]`` on the CPU: the classifier's softmax probability of ``labels [N]`` for uint8
    ``images [N, C, H, W]`` (scaled to [-1, 1], as vqgen's models read images)."""
    device = next((p.device for p in classifier.parameters()), torch.device("cpu"))
    x = images.to(device, torch.float32) / 127.5 - 1.0
    probabilities = torch.softmax(classifier(x).float(), dim=1)
    return probabilities.gather(1, labels.to(device).long().view(-1, 1)).squeeze(1).cpu()


def acceptance_summary(kept: int, drawn: int, score_sum: float) -> dict[str, float | int]:
    """The figures a sampling run reports: acceptance rate (kept / drawn) and the mean
    probability of the kept images' intended classes."""
    return {"acceptance_rate": kept / drawn if drawn else 0.0, "candidates_drawn": drawn, "accepted": kept,
            "mean_intended_probability": score_sum / kept if kept else 0.0}


def rejection_rule(threshold: float | None = None, keep_fraction: float | None = None,
                   max_draw_factor: float | None = None) -> RejectionConfig:
    """The :class:`RejectionConfig` of the API's and the CLI's arguments: ``threshold`` or
    ``keep_fraction`` (not both; neither: off)."""
    if threshold is not None and keep_fraction is not None:
        raise ConfigError("rejection", "give threshold or keep_fraction, not both")
    limit = {} if max_draw_factor is None else {"max_draw_factor": float(max_draw_factor)}
    if threshold is not None:
        return RejectionConfig(mode="threshold", threshold=float(threshold), **limit)
    if keep_fraction is not None:
        return RejectionConfig(mode="keep_fraction", keep_fraction=float(keep_fraction), **limit)
    return RejectionConfig(**limit)
