"""The Docker image's base torch (and the torchvision and triton that come with it) meets pyproject.toml.

No Docker engine or network in CI: the base image's versions are read from the Dockerfile's ``FROM``
tag, and its companions come from the table below, taken from the wheels' metadata (torch 2.11.0
``Requires-Dist: triton==3.6.0``; torchvision 0.26.0 ``Requires-Dist: torch==2.11.0``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).parents[1]

COMPANIONS = {"2.11.0": {"torchvision": "0.26.0", "triton": "3.6.0"}}
"""torch release -> the torchvision built against it and the triton it pins. Bumping the base image
means adding its row here, from the new wheels' metadata."""


def _requirements(specs: list[str]) -> dict[str, Requirement]:
    return {req.name: req for req in map(Requirement, specs)}


def _base_torch() -> str:
    (tag,) = re.findall(r"^FROM\s+pytorch/pytorch:(\S+)", (ROOT / "Dockerfile").read_text(), flags=re.M)
    match = re.fullmatch(r"(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-(runtime|devel)", tag)
    assert match, f"not a CUDA pytorch/pytorch tag: {tag}"
    return match.group(1)


@pytest.fixture(scope="module")
def project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def test_the_base_image_is_a_release_with_known_companions():
    assert _base_torch() in COMPANIONS, "add the new torch's torchvision and triton to COMPANIONS"


def test_pyproject_admits_the_base_images_torch_torchvision_and_triton(project):
    torch = _base_torch()
    versions = {"torch": torch, **COMPANIONS[torch]}
    runtime = _requirements(project["dependencies"])
    gpu = _requirements(project["optional-dependencies"]["gpu"])
    for name in ("torch", "torchvision"):
        assert runtime[name].specifier.contains(Version(versions[name])), (name, str(runtime[name].specifier))
    assert gpu["triton"].specifier.contains(Version(versions["triton"])), str(gpu["triton"].specifier)


def test_the_old_base_would_not_resolve(project):
    # The reason for the move: torch 2.6.0 pins triton 3.2.0, which `.[gpu]` refuses.
    assert not _requirements(project["optional-dependencies"]["gpu"])["triton"].specifier.contains(Version("3.2.0"))


def test_scipy_is_for_the_tests_only(project):
    assert "scipy" not in _requirements(project["dependencies"])
    assert "scipy" in _requirements(project["optional-dependencies"]["test"])
