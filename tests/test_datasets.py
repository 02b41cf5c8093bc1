"""Image datasets: procedural shapes, npz, image folders, raw idx files, errors on bad input."""

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vqgen.data.datasets import (
    DataConfig,
    ImageTransform,
    build_dataset,
    denormalize,
    holdout_indices,
    read_idx,
    to_uint8,
)
from vqgen.data import procedural
from vqgen.data.procedural import PALETTE, SHADE, SHAPE_NAMES, ProceduralConfig
from vqgen.configtools import from_dict
from vqgen.errors import ConfigError, DataError



# --- procedural --------------------------------------------------------------------------------


def test_procedural_is_deterministic_per_index():
    cfg = DataConfig(procedural=ProceduralConfig(size=40, seed=3))
    first, again = build_dataset(cfg, "train"), build_dataset(cfg, "train")
    image, label = first[7]
    assert torch.equal(image, again[7][0]) and label == again[7][1]
    assert not torch.equal(image, first[8][0])
    assert not torch.equal(image, build_dataset(cfg, "eval")[7][0])  # eval is another stream
    assert not torch.equal(image, build_dataset(DataConfig(procedural=ProceduralConfig(size=40, seed=4)), "train")[7][0])


def test_procedural_shape_range_and_labels():
    ds = build_dataset(DataConfig(procedural=ProceduralConfig(size=200)), "train")
    assert len(ds) == 200 and ds.num_classes == len(SHAPE_NAMES)
    assert len(build_dataset(DataConfig(procedural=ProceduralConfig(size=200)), "eval")) == 50
    images, labels = zip(*(ds[i] for i in range(len(ds))))
    images = torch.stack(images)
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    # Every image has a visible shape on it, and every class is well represented.
    assert (images.flatten(1).std(dim=1) > 0.05).all()
    counts = np.bincount(labels, minlength=ds.num_classes)
    assert counts.min() >= 20, counts


def test_procedural_other_sizes_and_grey():
    grey = build_dataset(DataConfig(image_size=16, channels=1, procedural=ProceduralConfig(size=4)), "train")
    image, _ = grey[0]
    assert image.shape == (1, 16, 16)
    big, _ = build_dataset(DataConfig(image_size=64, procedural=ProceduralConfig(size=4)), "train")[0]
    assert big.shape == (3, 64, 64)


def test_procedural_palette_limits_the_colours():
    palette = PALETTE[:4]
    y, x = np.mgrid[0:32, 0:32].astype(np.float32) + 0.5
    for seed in range(40):
        rng = np.random.default_rng(seed)
        _, (first, second) = procedural._background(rng, x, y, 32, palette)
        assert any(np.array_equal(first, c) for c in palette)
        np.testing.assert_allclose(second, first * SHADE)
        shape_colour = procedural._contrasting_colour(rng, np.stack([first, second]), palette)
        assert any(np.array_equal(shape_colour, c) for c in palette)
    # The shape's colour is not always the same for a given background colour.
    rng = np.random.default_rng(0)
    colours = {tuple(procedural._contrasting_colour(rng, palette[:1], palette)) for _ in range(30)}
    assert len(colours) > 1
    # Wired through the config: a palette set differs from the plain one, bad sizes are refused.
    ds = build_dataset(DataConfig(procedural=ProceduralConfig(size=8, palette=4)), "train")
    assert not torch.equal(ds[0][0], build_dataset(DataConfig(procedural=ProceduralConfig(size=8)), "train")[0][0])
    with pytest.raises(ConfigError, match=r"^procedural\.palette:"):
        from_dict(DataConfig, {"procedural": {"palette": 1}})
    with pytest.raises(ConfigError, match=r"^procedural\.palette:"):
        from_dict(DataConfig, {"procedural": {"palette": len(PALETTE) + 1}})


def test_procedural_backgrounds_and_rotation_options():
    plain = build_dataset(DataConfig(procedural=ProceduralConfig(size=30)), "train")
    # The defaults name every background kind and rotate: the same images as the plain set.
    explicit = build_dataset(DataConfig(procedural=ProceduralConfig(size=30, backgrounds=procedural.BACKGROUNDS, rotate=True)), "train")
    assert all(torch.equal(plain[i][0], explicit[i][0]) for i in range(30))
    solid = build_dataset(DataConfig(procedural=ProceduralConfig(size=30, backgrounds=("solid",))), "train")
    for i in range(30):
        image = solid[i][0]
        # A solid background: the four corners (never covered by the shape) have one colour.
        corners = image[:, [0, 0, -1, -1], [0, -1, 0, -1]]
        assert torch.allclose(corners, corners[:, :1].expand(-1, 4), atol=1e-6), i
    # Upright shapes: an unrotated square is symmetric about its centre lines.
    y, x = np.mgrid[0:33, 0:33].astype(np.float32) - 16.0
    square = procedural.shape_sdf(SHAPE_NAMES.index("square"), x, y, 10.0, 0.0)
    assert np.allclose(square, square[::-1]) and np.allclose(square, square[:, ::-1])
    # Only the shape's angle changes: circles and rings are the same images, the others are not.
    upright = build_dataset(DataConfig(procedural=ProceduralConfig(size=30, rotate=False)), "train")
    round_shapes = {SHAPE_NAMES.index("circle"), SHAPE_NAMES.index("ring")}
    for i in range(30):
        same = torch.equal(plain[i][0], upright[i][0])
        assert same == (plain[i][1] in round_shapes), i
    with pytest.raises(ConfigError, match=r"^procedural\.backgrounds:"):
        from_dict(DataConfig, {"procedural": {"backgrounds": []}})


@pytest.mark.parametrize("old, new", [("procedural_size", "procedural.size"), ("procedural_palette", "procedural.palette"),
                                      ("procedural_rotate", "procedural.rotate"), ("seed", "procedural.seed")])
def test_flat_procedural_keys_name_their_new_place(old, new):
    with pytest.raises(ConfigError, match=rf"^{old}: has moved: it is now {new}$"):
        from_dict(DataConfig, {old: 4})


def test_num_train_takes_the_first_items():
    full = build_dataset(DataConfig(procedural=ProceduralConfig(size=30)), "train")
    part = build_dataset(DataConfig(num_train=5, procedural=ProceduralConfig(size=30)), "train")
    assert len(part) == 5 and torch.equal(part[4][0], full[4][0])
    with pytest.raises(IndexError):
        part[5]


def test_hflip_only_when_augmenting():
    cfg = DataConfig(hflip=True, procedural=ProceduralConfig(size=4))
    plain = build_dataset(cfg, "train")[0][0]
    assert all(torch.equal(build_dataset(cfg, "train")[0][0], plain) for _ in range(5))
    augmented = build_dataset(cfg, "train", augment=True)
    torch.manual_seed(0)
    views = [augmented[0][0] for _ in range(16)]
    assert any(torch.equal(v, plain.flip(-1)) for v in views)
    assert any(torch.equal(v, plain) for v in views)


def test_uint8_round_trip_and_denormalize():
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    x = ImageTransform(8, 3)(pixels)
    assert torch.equal(to_uint8(x), torch.from_numpy(pixels).permute(2, 0, 1))
    assert denormalize(torch.tensor([-1.5, -1.0, 0.0, 1.0])).tolist() == [0.0, 0.0, 0.5, 1.0]


def test_transform_resizes_shorter_side_and_center_crops():
    pixels = np.zeros((20, 40), dtype=np.uint8)
    pixels[:, 4:36] = 255  # black margins that a squashing resize would keep and the crop drops
    out = ImageTransform(8, 1)(pixels)
    assert out.shape == (1, 8, 8)
    assert torch.allclose(out, torch.ones_like(out), atol=0.02)


# --- config ------------------------------------------------------------------------------------


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="^root"):
        DataConfig(kind="npz")
    with pytest.raises(ConfigError, match="^image_size"):
        DataConfig(image_size=30)
    with pytest.raises(ConfigError, match="^channels"):
        DataConfig(channels=2)


# --- npz ---------------------------------------------------------------------------------------


def test_npz_train_and_test_keys(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)  # NHW: grey
    path = tmp_path / "data.npz"
    np.savez(path, train_images=train, train_labels=np.array([0, 1, 2, 0, 1, 2]), test_images=test,
             test_labels=np.array([4, 0, 1], dtype=np.uint8))
    cfg = DataConfig(kind="npz", root=str(path), image_size=8)
    ds = build_dataset(cfg, "train")
    assert len(ds) == 6 and ds.num_classes == 5  # the largest label of any split
    image, label = ds[1]
    assert label == 1 and torch.equal(to_uint8(image), torch.from_numpy(train[1]).permute(2, 0, 1))
    eval_ds = build_dataset(cfg, "eval")
    image, label = eval_ds[0]
    assert len(eval_ds) == 3 and label == 4
    assert image.shape == (3, 8, 8) and torch.equal(image[0], image[2])  # grey repeated to RGB


def test_npz_single_images_array_uses_holdout(tmp_path):
    images = np.arange(25, dtype=np.uint8)[:, None, None].repeat(8, 1).repeat(8, 2)  # image i is all i
    path = tmp_path / "one.npz"
    np.savez(path, images=images)
    cfg = DataConfig(kind="npz", root=str(path), image_size=8)
    train, held_out = build_dataset(cfg, "train"), build_dataset(cfg, "eval")
    ids = lambda ds: {int(to_uint8(ds[i][0])[0, 0, 0]) for i in range(len(ds))}  # noqa: E731
    assert ids(held_out) == {9, 19} and ids(train) == set(range(25)) - {9, 19}
    assert train[0][1] == -1 and train.num_classes == 0


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"train_images": np.zeros((2, 8, 8, 3), np.float32)}, "'train_images'.*uint8.*float32"),
        ({"pixels": np.zeros((2, 8, 8), np.uint8)}, "no 'train_images' or 'images'.*pixels"),
        ({"images": np.zeros((2, 8), np.uint8)}, "'images'.*shape"),
        ({"images": np.zeros((2, 8, 8, 4), np.uint8)}, "'images'.*4 channels"),
        ({"images": np.zeros((3, 8, 8), np.uint8), "labels": np.zeros(2, np.int64)}, "'labels'.*3 labels"),
    ],
)
def test_npz_bad_arrays_name_the_key(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=match):
        build_dataset(DataConfig(kind="npz", root=str(path), image_size=8), "train")


def test_npz_that_is_not_an_npz(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="junk.npz is not an .npz file") as info:
        build_dataset(DataConfig(kind="npz", root=str(path)), "train")
    assert "pickle" not in str(info.value)  # numpy's own message is about allow_pickle
    np.save(tmp_path / "one.npy", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError, match="one.npy is a .npy file .*not an .npz"):
        build_dataset(DataConfig(kind="npz", root=str(tmp_path / "one.npy")), "train")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 and no archive")
    with pytest.raises(DataError, match="broken.npz is not an .npz file"):
        build_dataset(DataConfig(kind="npz", root=str(tmp_path / "broken.npz")), "train")


@pytest.mark.parametrize("key", ["images", "labels"])
def test_npz_object_arrays_are_refused_naming_the_key(tmp_path, key):
    arrays = {"images": np.zeros((3, 8, 8), np.uint8), "labels": np.zeros(3, np.int64)}
    arrays[key] = np.array([arrays[key][0], None, None], dtype=object)
    path = tmp_path / "objects.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=f"objects.npz: array '{key}' holds Python objects .dtype object.") as info:
        build_dataset(DataConfig(kind="npz", root=str(path), image_size=8), "train")
    assert "run code" in str(info.value)
    assert "allow_pickle" not in str(info.value) and "unsafely" not in str(info.value)


def test_npz_damaged_member_names_the_key(tmp_path):
    path = tmp_path / "cut.npz"
    np.savez_compressed(path, images=np.random.default_rng(0).integers(0, 256, (50, 8, 8), dtype=np.uint8))
    data = path.read_bytes()
    start = data.index(b"images.npy") + 200  # inside the compressed data of the first member
    path.write_bytes(data[:start] + bytes(64) + data[start + 64:])
    with pytest.raises(DataError, match="cut.npz.*'images'"):
        build_dataset(DataConfig(kind="npz", root=str(path), image_size=8), "train")


def test_cifar10_subset_npz(shared_data):
    path = shared_data / "cifar10-subset" / "cifar10_subset.npz"
    if not path.is_file():
        pytest.skip("shared CIFAR-10 subset not available")
    ds = build_dataset(DataConfig(kind="npz", root=str(path), num_eval=8), "eval")
    assert len(ds) == 8 and ds.num_classes == 10
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10


# --- folder ------------------------------------------------------------------------------------


def _save(path: Path, value: int, size=(12, 10), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path, format=fmt)


def _noise_png_bytes(seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_nested_with_class_labels(tmp_path):
    _save(tmp_path / "dogs" / "a.png", 10)
    _save(tmp_path / "cats" / "deep" / "er" / "b.JPG", 20, fmt="JPEG")
    _save(tmp_path / "cats" / "c.bmp", 30)
    _save(tmp_path / "test" / "dogs" / "d.webp", 40, fmt="WEBP")
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    cfg = DataConfig(kind="folder", root=str(tmp_path), image_size=8)
    train = build_dataset(cfg, "train")
    assert train.class_names == ("cats", "dogs") and train.num_classes == 2
    labels = [train[i][1] for i in range(len(train))]
    assert labels == [0, 0, 1]  # sorted paths: cats/c.bmp, cats/deep/er/b.JPG, dogs/a.png
    assert train[0][0].shape == (3, 8, 8)
    assert abs(to_uint8(train[0][0]).float().mean().item() - 30) < 1
    held = build_dataset(cfg, "eval")  # the test/ folder, not a hold-out
    assert len(held) == 1 and held[0][1] == 1


def test_folder_without_subfolders_uses_holdout(tmp_path):
    for i in range(12):
        _save(tmp_path / f"{i:02d}.png", i)
    cfg = DataConfig(kind="folder", root=str(tmp_path), image_size=8)
    train, held = build_dataset(cfg, "train"), build_dataset(cfg, "eval")
    assert (len(train), len(held)) == (11, 1) and train.num_classes == 0 and train[0][1] == -1
    assert to_uint8(held[0][0])[0, 0, 0].item() == 9
    assert holdout_indices(5, "eval").tolist() == [4] and holdout_indices(5, "train").tolist() == [0, 1, 2, 3]


def test_folder_corrupt_files_name_the_file(tmp_path):
    _save(tmp_path / "good.png", 50)
    _save(tmp_path / "test" / "other.png", 60)  # an explicit eval split: every other file is train
    (tmp_path / "random.png").write_bytes(np.random.default_rng(0).bytes(300))
    data = _noise_png_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "truncated.png").write_bytes(data[: len(data) // 2])
    cfg = DataConfig(kind="folder", root=str(tmp_path), image_size=8, on_corrupt="error")
    with pytest.raises(DataError, match="random.png"):
        build_dataset(cfg, "train")
    (tmp_path / "random.png").unlink()
    with pytest.raises(DataError, match="truncated.png"):
        build_dataset(cfg, "train")


def test_folder_skip_mode_counts_corrupt_files(tmp_path):
    for i in range(10):
        _save(tmp_path / "a" / f"{i}.png", i)
    (tmp_path / "a" / "0bad.png").write_bytes(b"garbage")
    data = _noise_png_bytes()
    (tmp_path / "a" / "0trunc.png").write_bytes(data[: len(data) - 20])
    cfg = DataConfig(kind="folder", root=str(tmp_path), image_size=8, on_corrupt="skip")
    ds = build_dataset(cfg, "train")
    assert ds.num_skipped == 2 and {p.name for p in ds.skipped_files} == {"0bad.png", "0trunc.png"}
    assert len(ds) == 9 and all(ds[i][1] == 0 for i in range(len(ds)))
    first = build_dataset(DataConfig(kind="folder", root=str(tmp_path), image_size=8, on_corrupt="skip",
                                     num_train=2), "train")
    assert len(first) == 2 and first.num_skipped == 2  # sorted: 0.png, 0bad.png, 0trunc.png, 1.png


def _noise_image_bytes(fmt: str, seed=1) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _cut(data: bytes, fraction=0.9) -> bytes:
    return data[: int(len(data) * fraction)]


@pytest.mark.parametrize("fmt, suffix", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp"),
                                         ("GIF", "gif")])
def test_folder_truncated_file_is_caught_at_construction(tmp_path, fmt, suffix):
    # PIL's verify() alone passes a JPEG, BMP or GIF cut at 90%; they failed only when loaded.
    (tmp_path / f"cut.{suffix}").write_bytes(_cut(_noise_image_bytes(fmt)))
    _save(tmp_path / "ok.png", 1)
    _save(tmp_path / "test" / "held.png", 2)
    cfg = DataConfig(kind="folder", root=str(tmp_path), image_size=8)
    with pytest.raises(DataError, match=f"cut.{suffix}"):
        build_dataset(cfg, "train")
    ds = build_dataset(DataConfig(kind="folder", root=str(tmp_path), image_size=8, on_corrupt="skip"), "train")
    assert len(ds) == 1 and ds.num_skipped == 1 and ds.skipped_files[0].name == f"cut.{suffix}"
    assert ds.skipped_summary().startswith(f"skipped 1 corrupt image file (e.g. cut.{suffix}: ")


def test_folder_truncated_jpeg_reason_and_summary(tmp_path):
    whole = _noise_image_bytes("JPEG")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.jpg").write_bytes(_cut(whole))
    (tmp_path / "a" / "c.jpg").write_bytes(whole[:-1])  # only the last byte of the marker missing
    (tmp_path / "a" / "d.jpg").write_bytes(whole + b"\0" * 1000)  # bytes after the marker: still whole
    _save(tmp_path / "test" / "a" / "held.png", 2)
    cfg = DataConfig(kind="folder", root=str(tmp_path), image_size=8, on_corrupt="error")
    with pytest.raises(DataError, match=r"b.jpg \(truncated JPEG \(no end-of-image marker\)\)"):
        build_dataset(cfg, "train")
    ds = build_dataset(DataConfig(kind="folder", root=str(tmp_path), image_size=8, on_corrupt="skip"), "train")
    assert [p.name for p in ds.skipped_files] == ["b.jpg", "c.jpg"] and len(ds) == 1
    expected = "skipped 2 corrupt image files (e.g. a/b.jpg: truncated JPEG (no end-of-image marker))"
    assert ds.skipped_summary() == expected
    assert ds[0][0].shape == (3, 8, 8)
    assert build_dataset(DataConfig(kind="folder", root=str(tmp_path / "test"), image_size=8,
                                    on_corrupt="skip"), "eval").skipped_summary() is None


def test_folder_file_damaged_after_construction_fails_at_load_naming_it(tmp_path):
    whole = _noise_image_bytes("JPEG")
    (tmp_path / "cut.jpg").write_bytes(whole)
    _save(tmp_path / "ok.png", 1)
    _save(tmp_path / "test" / "held.png", 2)
    ds = build_dataset(DataConfig(kind="folder", root=str(tmp_path), image_size=8), "train")
    (tmp_path / "cut.jpg").write_bytes(_cut(whole))  # damaged while the dataset is in use
    with pytest.raises(DataError, match="cut.jpg"):
        ds[0]
    assert ds[1][0].shape == (3, 8, 8)
    # From a DataLoader worker the same error reaches the main process, still naming the file.
    with pytest.raises(DataError, match="cut.jpg"):
        list(DataLoader(ds, batch_size=1, num_workers=1))


def test_folder_skip_mode_epoch_completes_despite_damaged_files(tmp_path):
    for i in range(4):
        _save(tmp_path / f"{i}.png", 10 * i)
    (tmp_path / "1cut.jpg").write_bytes(_cut(_noise_image_bytes("JPEG")))
    (tmp_path / "2cut.png").write_bytes(_cut(_noise_png_bytes()))
    _save(tmp_path / "test" / "held.png", 2)
    ds = build_dataset(DataConfig(kind="folder", root=str(tmp_path), image_size=8, on_corrupt="skip"), "train")
    assert len(ds) == 4 and ds.num_skipped == 2
    assert [p.name for p in ds.skipped_files] == ["1cut.jpg", "2cut.png"]
    (tmp_path / "1.png").write_bytes(b"damaged later")  # fails only in load()
    with pytest.warns(RuntimeWarning, match="1.png") as caught:
        first, again = ds[1], ds[1]
    assert len(caught) == 1  # once per file, not once per access
    assert torch.equal(first[0], ds[2][0]) and torch.equal(again[0], first[0])  # the next file, 2.png
    batches = list(DataLoader(ds, batch_size=2, num_workers=0))
    assert sum(len(labels) for _, labels in batches) == 4
    assert sum(len(b[1]) for b in DataLoader(ds, batch_size=2, num_workers=1)) == 4  # and in a worker


# --- raw idx (MNIST-style) ---------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray, magic: int, cut: int = 0):
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(data[: len(data) - cut])


def _fake_mnist(raw: Path, n=5, side=16):
    rng = np.random.default_rng(0)
    images = {p: rng.integers(0, 256, (n, side, side), dtype=np.uint8) for p in ("train", "t10k")}
    labels = {p: rng.integers(0, 10, n).astype(np.uint8) for p in ("train", "t10k")}
    for p in ("train", "t10k"):
        _write_idx(raw / f"{p}-images-idx3-ubyte.gz", images[p], 2051)
        _write_idx(raw / f"{p}-labels-idx1-ubyte.gz", labels[p], 2049)
    return images, labels


@pytest.mark.parametrize("layout", ["FashionMNIST/raw", "raw"])
def test_idx_gz_only_root_is_read_directly(tmp_path, layout):
    images, labels = _fake_mnist(tmp_path / layout)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cfg = DataConfig(kind="fashion_mnist", root=str(tmp_path), image_size=16)
    for split, prefix in (("train", "train"), ("eval", "t10k")):
        ds = build_dataset(cfg, split)
        assert len(ds) == 5 and ds.num_classes == 10
        image, label = ds[3]
        assert label == labels[prefix][3]
        assert image.shape == (3, 16, 16) and torch.equal(to_uint8(image[1]), torch.from_numpy(images[prefix][3]))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written to root


def test_idx_errors_name_the_file(tmp_path):
    _write_idx(tmp_path / "short.gz", np.zeros((4, 3, 3)), 2051, cut=5)
    with pytest.raises(DataError, match="short.gz.*shape"):
        read_idx(tmp_path / "short.gz", 2051)
    _write_idx(tmp_path / "labels.gz", np.zeros(4), 2049)
    with pytest.raises(DataError, match="labels.gz.*magic number 2049, expected 2051"):
        read_idx(tmp_path / "labels.gz", 2051)
    (tmp_path / "broken.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="broken.gz"):
        read_idx(tmp_path / "broken.gz", 2051)


def test_mnist_missing_files_say_what_was_looked_for(tmp_path):
    _write_idx(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz", np.zeros(3), 2049)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*download = true"):
        build_dataset(DataConfig(kind="mnist", root=str(tmp_path)), "train")


def test_shared_fashion_mnist_test_split(shared_data):
    root = shared_data / "fashion-mnist"
    if not (root / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("shared Fashion-MNIST not available")
    ds = build_dataset(DataConfig(kind="fashion_mnist", root=str(root), num_eval=10, channels=1), "eval")
    assert [ds[i][1] for i in range(10)] == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert ds[0][0].shape == (1, 32, 32)


def test_shared_mnist_partial_root(shared_data):
    root = shared_data / "mnist"
    if not (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("shared MNIST not available")
    cfg = DataConfig(kind="mnist", root=str(root), num_eval=3)
    assert len(build_dataset(cfg, "eval")) == 3
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file():
        with pytest.raises(DataError, match="train-images-idx3-ubyte"):
            build_dataset(cfg, "train")


# --- missing roots -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cifar10", "mnist", "fashion_mnist", "npz", "folder"])
def test_missing_root_is_a_data_error(tmp_path, kind):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere"):
        build_dataset(DataConfig(kind=kind, root=str(missing)), "train")


def test_empty_cifar_root_suggests_download(tmp_path):
    with pytest.raises(DataError, match="CIFAR-10.*download = true"):
        build_dataset(DataConfig(kind="cifar10", root=str(tmp_path)), "train")
