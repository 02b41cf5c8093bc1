"""Finding, downloading and checking the FID Inception weights, without the internet: downloads
come from a loopback HTTP server, and the torch hub cache is a temporary TORCH_HOME."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vqgen.errors import CheckpointError
from vqgen.metrics import fid
from vqgen.metrics import inception_weights as iw

NOFC = Path("inception") / "pt_inception-2015-12-05-nofc.pth"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the server's folder; records each request, and can stall or cut a response short."""

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        time.sleep(self.server.delay)  # lets concurrent callers pile up on the lock
        if not self.server.truncate:
            return super().do_GET()
        body = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + 1000))
        self.end_headers()
        self.wfile.write(body)  # then the connection closes (HTTP/1.0), 1000 bytes short

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest's output clean


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder: Path):
        super().__init__(("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder)))
        self.requests: list[str] = []
        self.delay = 0.0
        self.truncate = False

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


@pytest.fixture
def served(tmp_path) -> Path:
    folder = tmp_path / "served"
    folder.mkdir()
    return folder


@pytest.fixture
def server(served) -> Iterator[_Server]:
    srv = _Server(served)
    # A short poll interval: shutdown() waits for one, 0.5 s by default, in every test's teardown.
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def hub(tmp_path, monkeypatch) -> Path:
    """A fresh torch hub cache (restored by monkeypatch); no URL override from the environment."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(iw.INCEPTION_URL_ENV, raising=False)
    checkpoints = tmp_path / "torch-home" / "hub" / "checkpoints"
    assert iw.hub_checkpoints_dir() == checkpoints  # torch.hub.set_dir was not called elsewhere
    return checkpoints


def _serve_verifiable(folder: Path, payload: bytes = b"not really an inception " * 64) -> str:
    """Put ``payload`` in ``folder`` under a torch hub name carrying its own sha256 prefix."""
    name = f"fake-inception-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    (folder / name).write_bytes(payload)
    return name


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket closes


def _leftovers(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.part")) if folder.is_dir() else []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_standard_url_names_the_standard_prefix():
    assert iw.expected_sha256_prefix(iw.INCEPTION_URL) == iw.INCEPTION_SHA256_PREFIX
    assert iw.default_inception_path().name == iw.INCEPTION_FILENAME
    assert fid.resolve_inception_weights is iw.resolve_inception_weights  # old import path kept


def test_download_is_verified_moved_into_the_cache_and_done_once(hub, served, server):
    name = _serve_verifiable(served)
    got = iw.resolve_inception_weights(None, url=server.url(name))
    assert got == hub / name and got.read_bytes() == (served / name).read_bytes()
    assert got.stat().st_mode & 0o777 == 0o644 & ~_umask()  # readable by the team, not mkstemp's 0600
    assert _leftovers(hub) == []
    assert iw.resolve_inception_weights(None, url=server.url(name)) == got
    assert server.requests == [f"/{name}"]


def test_a_checksum_mismatch_leaves_nothing_behind(hub, served, server):
    name = "fake-inception-00000000.pth"
    payload = b"bytes whose sha256 does not start with eight zeros"
    (served / name).write_bytes(payload)
    url = server.url(name)
    with pytest.raises(CheckpointError) as info:
        iw.resolve_inception_weights(None, url=url)
    message = str(info.value)
    assert url in message and "00000000" in message and hashlib.sha256(payload).hexdigest() in message
    assert not (hub / name).exists() and _leftovers(hub) == []


def test_a_short_transfer_is_an_error_and_leaves_nothing_behind(hub, served, server):
    name = _serve_verifiable(served)
    server.truncate = True
    with pytest.raises(CheckpointError, match="closed after"):
        iw.resolve_inception_weights(None, url=server.url(name))
    assert not (hub / name).exists() and _leftovers(hub) == []


def test_offline_says_where_to_put_the_file_and_where_to_get_it(hub):
    url = f"http://127.0.0.1:{_closed_port()}/{iw.INCEPTION_FILENAME}"
    with pytest.raises(CheckpointError) as info:
        iw.resolve_inception_weights(None, url=url)
    message = str(info.value)
    assert str(hub / iw.INCEPTION_FILENAME) in message and iw.INCEPTION_CONFIG_KEY in message
    assert url in message and "downloading it failed" in message
    assert not (hub / iw.INCEPTION_FILENAME).exists() and _leftovers(hub) == []


def test_download_switched_off_never_connects(hub, served, server, monkeypatch):
    monkeypatch.setenv(iw.INCEPTION_URL_ENV, server.url(_serve_verifiable(served)))
    with pytest.raises(CheckpointError) as info:
        iw.resolve_inception_weights(None, download=False)
    message = str(info.value)
    assert str(iw.default_inception_path()) in message and iw.INCEPTION_CONFIG_KEY in message
    assert "switched off" in message and server.url("") in message
    assert server.requests == []


def test_the_environment_overrides_the_default_url_and_the_config_overrides_both(hub, served, server,
                                                                                  monkeypatch):
    name = _serve_verifiable(served)
    monkeypatch.setenv(iw.INCEPTION_URL_ENV, server.url(name))
    assert iw.resolve_inception_weights(None) == hub / name
    (hub / name).unlink()
    other = _serve_verifiable(served, b"another mirror's file")
    assert iw.resolve_inception_weights(None, url=server.url(other)) == hub / other
    assert server.requests == [f"/{name}", f"/{other}"]


def test_an_explicit_path_is_never_downloaded(tmp_path, served, server, monkeypatch):
    monkeypatch.setenv(iw.INCEPTION_URL_ENV, server.url(_serve_verifiable(served)))
    missing = tmp_path / "nowhere" / iw.INCEPTION_FILENAME
    with pytest.raises(CheckpointError) as info:
        iw.resolve_inception_weights(missing)
    assert str(missing) in str(info.value) and iw.INCEPTION_CONFIG_KEY in str(info.value)
    assert not missing.exists() and server.requests == []
    missing.parent.mkdir()
    missing.write_bytes(b"x")
    assert iw.resolve_inception_weights(missing) == missing  # the values are checked when loaded


def test_a_url_without_a_checksum_in_its_name_is_refused_before_connecting(served, server):
    (served / "inception.pth").write_bytes(b"unverifiable")
    with pytest.raises(CheckpointError, match="carries no sha256 prefix"):
        iw.resolve_inception_weights(None, url=server.url("inception.pth"))
    assert server.requests == []


def test_concurrent_callers_download_once(hub, served, server):
    name = _serve_verifiable(served)
    server.delay = 0.3  # the first caller holds the lock while the others arrive
    barrier = threading.Barrier(4)
    results: list[Path | BaseException] = []

    def call() -> None:
        barrier.wait()
        try:
            results.append(iw.resolve_inception_weights(None, url=server.url(name)))
        except BaseException as err:  # reported by the assertion below
            results.append(err)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [hub / name] * 4 and server.requests == [f"/{name}"]


def test_torch_fidelitys_copy_is_used_when_it_is_the_standard_network(hub, shared_data, served, server):
    real = shared_data / NOFC
    if not real.is_file():
        pytest.skip(f"real FID Inception weights not found at {real}")
    hub.mkdir(parents=True)
    fidelity = hub / iw.TORCH_FIDELITY_FILENAME
    fidelity.symlink_to(real)  # same keys as ours (our network is torch-fidelity's class)
    url = server.url(_serve_verifiable(served))
    assert iw.resolve_inception_weights(None, url=url) == fidelity
    assert iw.check_inception_weights(None, url=url) == fidelity
    assert server.requests == []


def test_torch_fidelitys_copy_is_skipped_when_it_is_another_network(hub, served, server):
    hub.mkdir(parents=True)
    fidelity = hub / iw.TORCH_FIDELITY_FILENAME
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, fidelity)
    with pytest.warns(UserWarning, match="not using torch-fidelity's copy"), \
            pytest.raises(CheckpointError) as info:
        iw.resolve_inception_weights(None, download=False)
    assert str(fidelity) in str(info.value) and "not an FID Inception state dict" in str(info.value)
    name = _serve_verifiable(served)
    with pytest.warns(UserWarning, match="not using torch-fidelity's copy"):
        assert iw.resolve_inception_weights(None, url=server.url(name)) == hub / name


def test_the_preflight_checks_the_tensors_not_only_the_download(hub, served, server):
    name = _serve_verifiable(served)
    with pytest.raises(CheckpointError, match=f"{name}: cannot read FID Inception weights"):
        iw.check_inception_weights(None, url=server.url(name))
    assert (hub / name).is_file()  # fetched at the start; only its contents are wrong
