"""Train a tiny prior with checkpoints on a tmpfs that fills up, then is made bigger, then read-only.

Run as root inside ``unshare -m`` (the mounts stay in that namespace):
``python full_disk_train.py MOUNT_DIR REFERENCE_DIR``. Exits 0 and prints "ok" when every check holds.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import torch

from vqgen.errors import StorageError
from vqgen.evaluation import prior_loss_fn
from vqgen.models.export import export_model, load_model
from vqgen.models.pixelcnn import GatedPixelCNN
from vqgen.train import TrainConfig, _save_weights, fit, make_accelerator
from vqgen.utils import atomic_write_bytes, read_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_resume import LAYOUT, PRIOR, Codes  # noqa: E402  (the same tiny prior and code maps)

torch.set_num_threads(1)
PAGE = 4096


def train(stage_dir: Path, steps: int) -> GatedPixelCNN:
    cfg = TrainConfig(steps=steps, batch_size=8, checkpoint_every=2, log_every=1, eval_every=0, image_every=0)
    torch.manual_seed(0)
    model = GatedPixelCNN(PRIOR, LAYOUT)
    fit(model, Codes(), cfg, make_accelerator(stage_dir, tracker="none", seed=0), stage_dir, prior_loss_fn("top", False))
    return model


def pages(path: Path) -> int:
    return math.ceil(path.stat().st_size / PAGE)


def mount(mnt: Path, options: str, remount: bool = False) -> None:
    cmd = ["mount", "-o", f"remount,{options}", str(mnt)] if remount else ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)]
    subprocess.run(cmd, check=True)


def expect_storage_error(fn, *words: str) -> str:
    try:
        fn()
    except StorageError as err:
        assert all(w in str(err) for w in words), f"{err} lacks {words}"
        return str(err)
    raise AssertionError(f"no StorageError (expected {words})")


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith(".") or ".tmp" in p.name)


def fill(mnt: Path) -> None:
    with open(mnt / "filler", "wb", buffering=0) as f:
        for size in (1 << 16, PAGE, 1):
            try:
                while True:
                    f.write(bytes(size))
            except OSError:
                pass


def main(mnt: Path, ref_dir: Path) -> None:
    reference = train(ref_dir / "stage", 6)
    # Room for one checkpoint and latest.json, then the next one's weights and half its optimizer
    # state: the second checkpoint fails inside torch.save (a RuntimeError that names no errno).
    first = sorted((ref_dir / "stage" / "checkpoints").glob("step-*"))[0]
    size = sum(pages(p) for p in first.iterdir()) + 1 + pages(first / "model.safetensors") + pages(first / "optimizer.bin") // 2
    mount(mnt, f"size={size * PAGE // 1024}k")
    stage = mnt / "stage"
    message = expect_storage_error(lambda: train(stage, 6), "no space left on device while writing checkpoint",
                                   "step-00000004", f"MiB free on {mnt}", "resumes from its last finished checkpoint")
    checkpoints = stage / "checkpoints"
    assert read_json(checkpoints / "latest.json")["name"] == "step-00000002", message
    assert leftovers(stage) == [], leftovers(stage)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest.json", "step-00000002"]

    mount(mnt, "size=4m", remount=True)  # space freed: the stage resumes from step 2
    resumed = train(stage, 6)
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key

    # The other writes of a stage, on a full disk: the old files stay, no temporary files are left.
    export_model(resumed, mnt / "export")
    _save_weights(resumed, mnt / "best.safetensors")
    best = (mnt / "best.safetensors").read_bytes()
    atomic_write_bytes(mnt / "note.txt", b"old")
    fill(mnt)
    expect_storage_error(lambda: export_model(reference, mnt / "export"), "no space left", "model export")
    expect_storage_error(lambda: _save_weights(reference, mnt / "best.safetensors"), "no space left", "best weights")
    expect_storage_error(lambda: atomic_write_bytes(mnt / "note.txt", b"new" * 5000), "no space left", "note.txt")
    assert leftovers(mnt) == [], leftovers(mnt)
    loaded, _, _ = load_model(mnt / "export")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in resumed.state_dict().items())
    assert (mnt / "best.safetensors").read_bytes() == best and (mnt / "note.txt").read_bytes() == b"old"

    (mnt / "filler").unlink()
    mount(mnt, "ro", remount=True)
    expect_storage_error(lambda: train(stage, 8), "cannot write checkpoint", "step-00000008", "read-only")
    expect_storage_error(lambda: atomic_write_bytes(mnt / "note.txt", b"new"), "read-only", "note.txt")
    assert read_json(checkpoints / "latest.json")["name"] == "step-00000006"
    print("ok")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
