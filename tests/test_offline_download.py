"""``data.download = true`` without network: say the download failed, from where, and what to put where."""

from __future__ import annotations

from urllib.error import URLError

import pytest
import torchvision.datasets
import torchvision.datasets.mnist

from vqgen.data.datasets import DataConfig, build_dataset
from vqgen.errors import DataError

OFFLINE = URLError("[Errno -3] Temporary failure in name resolution")


def _offline(*args, **kwargs):
    raise OFFLINE


def _message(kind: str, root) -> str:
    with pytest.raises(DataError) as caught:
        build_dataset(DataConfig(kind=kind, root=str(root), download=True), "train")
    assert caught.value.__cause__ is not None  # torchvision's own error stays attached
    return str(caught.value)


def test_cifar_download_failure_names_the_url_and_the_files(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", _offline)
    message = _message("cifar10", tmp_path)
    assert "download = true" not in message  # it is true already
    assert "could not download CIFAR10 from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert "Temporary failure in name resolution" in message
    assert str(tmp_path / "cifar-10-python.tar.gz") in message and str(tmp_path / "cifar-10-batches-py") in message


@pytest.mark.parametrize("kind, class_name, host", [("mnist", "MNIST", "ossci-datasets.s3.amazonaws.com"),
                                                     ("fashion_mnist", "FashionMNIST", "fashion-mnist.s3")])
def test_mnist_kinds_name_their_mirrors_and_the_raw_folder(tmp_path, monkeypatch, kind, class_name, host):
    # torchvision tries each mirror, catching URLError, then gives up with a RuntimeError.
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", _offline)
    message = _message(kind, tmp_path)
    assert "download = true" not in message
    assert f"could not download {class_name} from http" in message and host in message
    assert "train-images-idx3-ubyte.gz, " in message and str(tmp_path / class_name / "raw") in message


def test_without_download_the_advice_is_still_to_turn_it_on(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", _offline)
    with pytest.raises(DataError, match="set data.download = true"):
        build_dataset(DataConfig(kind="cifar10", root=str(tmp_path), download=False), "train")
