"""The command as installed: `python -m vqgen`, `--version`, shipped pipelines by name from any folder."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

from vqgen.config import load_config, shipped_pipelines


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vqgen", *args], capture_output=True, text=True, cwd=cwd)


def test_python_dash_m_and_version():
    done = run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"vqgen {version('vqgen')}"


def test_shipped_pipelines_load_by_name_from_any_folder(tmp_path):
    (tmp_path / "demo").mkdir()  # a folder of the same name (a run's output, say) is not the config
    assert {"demo", "fashion-mnist", "cifar10", "imagenet256"} <= set(shipped_pipelines())
    done = run("config", "demo", "--set", "run.name=elsewhere", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert 'name = "elsewhere"' in done.stdout and "size = 60000" in done.stdout
    assert load_config("demo") == load_config(shipped_pipelines()["demo"])
    unknown = run("config", "no-such-pipeline", cwd=tmp_path)
    assert unknown.returncode == 2 and "shipped: " in unknown.stderr and "demo" in unknown.stderr


def test_allocator_tuning_applies_on_glibc_and_steps_aside(monkeypatch):
    """The CLI keeps freed memory for the next step (glibc's mallopt), unless told not to or the
    user tuned glibc's allocator themselves."""
    import platform

    from vqgen.utils import keep_freed_memory

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("VQGEN_MALLOC_TUNING", raising=False)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert keep_freed_memory()
    monkeypatch.setenv("VQGEN_MALLOC_TUNING", "0")
    assert not keep_freed_memory()
    monkeypatch.delenv("VQGEN_MALLOC_TUNING")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert not keep_freed_memory()
