"""Samples files: round trip, and a named DataError (never a traceback) for every kind of bad file."""

from pathlib import Path

import numpy as np
import pytest
import torch

from vqgen.cli import main
from vqgen.data.samples import load_samples, save_samples
from vqgen.errors import DataError

CONFIG = Path(__file__).resolve().parents[1] / "pipelines" / "demo.toml"


def _images(n=4, channels=3):
    return np.random.default_rng(0).integers(0, 256, (n, channels, 8, 8), dtype=np.uint8)


def test_round_trip_with_and_without_labels(tmp_path):
    images = _images()
    save_samples(tmp_path / "s.npz", images, np.array([0, 3, -1, 2], np.int32))
    got, labels = load_samples(tmp_path / "s.npz")
    assert np.array_equal(got, images) and labels.dtype == np.int64 and labels.tolist() == [0, 3, -1, 2]
    save_samples(tmp_path / "grey.npz", torch.from_numpy(_images(channels=1)))  # a tensor, no labels
    got, labels = load_samples(tmp_path / "grey.npz")
    assert got.shape == (4, 1, 8, 8) and labels is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.npz", "s.npz"]  # no temporary files left


def test_save_refuses_what_load_would_refuse(tmp_path):
    with pytest.raises(DataError, match="'images' must be uint8"):
        save_samples(tmp_path / "f.npz", _images().astype(np.float32))
    with pytest.raises(DataError, match=r"'labels' must have shape \(4,\)"):
        save_samples(tmp_path / "f.npz", _images(), np.zeros(3, np.int64))
    assert not (tmp_path / "f.npz").exists()


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"pictures": _images()}, r"no 'images' array \(arrays found: \['pictures'\]\)"),
        ({"images": _images().astype(np.float32)}, "'images' must be uint8, got dtype float32"),
        ({"images": _images().transpose(0, 2, 3, 1)}, r"\[N, C, H, W\].*shape \(4, 8, 8, 3\)"),
        ({"images": _images(), "labels": np.zeros(4, np.float32)}, "'labels' must be integers"),
        ({"images": _images(), "labels": np.zeros((4, 1), np.int64)}, r"'labels' must have shape \(4,\)"),
        ({"images": np.array([_images()[0], None], dtype=object)}, "'images' holds Python objects .dtype object."),
        ({"images": _images(), "labels": np.array([1, None, 2, 3], dtype=object)}, "'labels' holds Python objects"),
    ],
)
def test_bad_arrays_are_named(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=match) as info:
        load_samples(path)
    assert str(path) in str(info.value) and "allow_pickle" not in str(info.value)


def test_files_that_are_not_npz_are_named(tmp_path):
    text = tmp_path / "not-an-npz.txt"
    text.write_text("images, please")
    with pytest.raises(DataError, match=f"{text} is not an .npz file"):
        load_samples(text)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 not a zip archive")
    with pytest.raises(DataError, match=f"{broken} is not an .npz file"):
        load_samples(broken)
    with pytest.raises(DataError, match="samples file not found"):
        load_samples(tmp_path / "none.npz")


def test_fid_command_names_a_bad_samples_file_before_needing_weights(tmp_path, capsys):
    # Weights that do not exist: the samples file must be refused first, with its own message.
    no_weights = ["--set", f"evaluate.inception_weights={tmp_path / 'no-weights.pth'}"]
    text = tmp_path / "not-an-npz.txt"
    text.write_text("images, please")
    np.savez(tmp_path / "other.npz", pictures=_images())
    cases = [(tmp_path / "none.npz", "samples file not found"), (text, f"{text} is not an .npz file"),
             (tmp_path / "other.npz", "no 'images' array (arrays found: ['pictures'])")]
    for path, words in cases:
        assert main(["fid", str(CONFIG), str(path), *no_weights]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vqgen: error: ") and words in err and "Traceback" not in err
