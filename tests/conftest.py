"""Shared test settings: small thread counts (CI has 2 cores) and the optional shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny models run faster on one thread than on two contending ones.
torch.set_num_threads(1)

SHARED_DATA = Path(os.environ.get("VQGEN_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """The folder of real test data (Fashion-MNIST, CIFAR-10 subset, Inception weights), if present."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set VQGEN_TEST_DATA)")
    return SHARED_DATA
