"""Tiny priors for tests from one flat settings dict: the dict is split by field name into the
user's architecture (:class:`PriorConfig`) and the sizes the code store dictates (:class:`PriorLayout`).
A module of its own, not conftest: test modules import it by name."""

from __future__ import annotations

from dataclasses import fields

from vqgen.models.pixelcnn import GatedPixelCNN, PriorConfig, PriorLayout

LAYOUT_FIELDS = frozenset(f.name for f in fields(PriorLayout))
CONFIG_FIELDS = frozenset(f.name for f in fields(PriorConfig))


def split_settings(settings: dict) -> tuple[PriorConfig, PriorLayout]:
    """``(PriorConfig, PriorLayout)`` from one dict holding the fields of both."""
    unknown = set(settings) - LAYOUT_FIELDS - CONFIG_FIELDS
    if unknown:
        raise TypeError(f"not a PriorConfig or PriorLayout field: {sorted(unknown)}")
    layout = PriorLayout(**{k: v for k, v in settings.items() if k in LAYOUT_FIELDS})
    config = PriorConfig(**{k: v for k, v in settings.items() if k in CONFIG_FIELDS})
    return config, layout


def tiny_prior(settings: dict) -> GatedPixelCNN:
    """The prior that ``settings`` (PriorConfig and PriorLayout fields together) describe."""
    return GatedPixelCNN(*split_settings(settings))
