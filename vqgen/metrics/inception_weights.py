"""The FID Inception weights: finding them, fetching them once, and checking them.

An FID is only comparable with published ones when computed with one network: the TF-ported
Inception of ``pt_inception-2015-12-05-6726825d.pth``. :func:`resolve_inception_weights` finds
that file (a configured path, the torch hub cache, or the copy torch-fidelity / torchmetrics put
there) and, when it is nowhere, downloads it once into the hub cache, verified and moved into place
atomically. :func:`load_inception_state_dict` checks any file's tensors before FID trusts them;
:func:`check_inception_weights` does both at the start of a run. Building the network from the
checked tensors lives here too, so :mod:`vqgen.metrics.fid` only deals with images and statistics.
"""

from __future__ import annotations

import hashlib
import http.client
import math
import os
import posixpath
import re
import tempfile
import urllib.parse
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from vqgen.errors import CheckpointError
from vqgen.utils import download_once, sha256_file

INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILENAME
)
INCEPTION_CONFIG_KEY = "evaluate.inception_weights"
# A mirror for clusters that cannot reach github; an explicit `url` (from the config) wins over it.
INCEPTION_URL_ENV = "VQGEN_INCEPTION_URL"
# torch-fidelity (and so torchmetrics, whose Inception is torch-fidelity's class) fetches the same
# network with torch.hub.load_state_dict_from_url, i.e. into <hub>/checkpoints, under this name.
# Its keys are the ones our network loads strictly (it *is* that class), so it needs no mapping;
# torch-fidelity does not check the download's hash, so its values are checked before use.
TORCH_FIDELITY_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048

# A few tensors whose shapes identify the FID Inception layout; the strict load in
# `_build_inception_network` then checks every key.
_LAYOUT_PROBES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
}
_FC_SHAPES = {"fc.weight": (1008, FEATURE_DIM), "fc.bias": (1008,)}
_NUM_KEYS_WITH_FC = 566

# torch hub convention: the 8 hex digits in the standard file's name start its sha256.
INCEPTION_SHA256_PREFIX = "6726825d"
# The checksum `inception_tensors_sha256` gives for the standard FID Inception's tensors other than
# fc.weight/fc.bias (which FID never reads). Computed from pt_inception-2015-12-05-nofc.pth, a state
# dict holding exactly those 564 tensors (its file sha256 is b1d7825e...); the standard 6726825d
# file holds the same network, saved differently (legacy format, other strides).
INCEPTION_TENSORS_SHA256 = "acfa230643f38c90d8a3db66aebb4a6f868cba6fd57959b1c969640cf8d918a3"

# torch hub's naming: "<name>-<first 8+ hex digits of the file's sha256>.<ext>".
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[^.]+$")


# ---------------------------------------------------------------------------------------------
# Where the weights are


def hub_checkpoints_dir() -> Path:
    """torch hub's checkpoint folder (follows ``TORCH_HOME`` and ``torch.hub.set_dir``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def default_inception_path() -> Path:
    """Where pytorch-fid users already have the weights, and where vqgen downloads them."""
    return hub_checkpoints_dir() / INCEPTION_FILENAME


def torch_fidelity_inception_path() -> Path:
    """Where torch-fidelity and torchmetrics users already have the same network."""
    return hub_checkpoints_dir() / TORCH_FIDELITY_FILENAME


def inception_url(url: str | None = None) -> str:
    """The URL to download from: ``url`` (the config's), else ``$VQGEN_INCEPTION_URL``, else the
    standard one. Empty strings count as unset, as an exported-but-empty variable usually means."""
    return url or os.environ.get(INCEPTION_URL_ENV) or INCEPTION_URL


def expected_sha256_prefix(url: str) -> str:
    """The sha256 prefix the file behind ``url`` must have, read from its name as torch hub does.

    A name without one is refused: its download could not be verified.
    """
    match = _HASH_IN_NAME.search(_url_file_name(url))
    if match is None:
        raise CheckpointError(
            f"{url}: the file name carries no sha256 prefix ('<name>-<8 hex digits>.pth', the torch "
            "hub convention), so its download cannot be verified; point the URL at a file named so"
        )
    return match.group(1)


def _url_file_name(url: str) -> str:
    name = posixpath.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    if not name:
        raise CheckpointError(f"{url}: names no file to download")
    return name


def resolve_inception_weights(
    path: str | os.PathLike | None = None, *, url: str | None = None, download: bool = True
) -> Path:
    """The Inception weights file to use, downloaded once into the torch hub cache if needed.

    ``path`` (``evaluate.inception_weights``) must exist; it is never downloaded over. Without it:
    the hub cache copy, else torch-fidelity's copy there if it holds the same network, else (when
    ``download``) a download of ``url`` (see :func:`inception_url`) checked against the sha256
    prefix in its file name. Several processes may call this at once: one downloads, the others
    wait for it. Raises :class:`CheckpointError` saying where to put the file and where to get it
    when it is missing and cannot be downloaded.
    """
    if path is not None:
        return _explicit_weights(Path(path).expanduser())
    url = inception_url(url)
    destination = hub_checkpoints_dir() / _url_file_name(url)
    for candidate in dict.fromkeys([default_inception_path(), destination]):
        if candidate.is_file():
            return candidate
    fidelity, note = _torch_fidelity_copy()
    if fidelity is not None:
        return fidelity
    if not download:
        raise CheckpointError(_missing_weights_message(url, "downloading is switched off" + note))
    try:
        _download_once(url, destination)
    except (OSError, http.client.HTTPException) as err:  # offline, refused, timed out, disk full
        reason = f"downloading it failed ({type(err).__name__}: {err})"
        raise CheckpointError(_missing_weights_message(url, reason + note)) from err
    return destination


def check_inception_weights(
    path: str | os.PathLike | None = None, *, url: str | None = None, download: bool = True
) -> Path:
    """Preflight for a long run: find the weights now (downloading them once if needed) and check
    their tensors, so a missing file, no network or the wrong network stops the run at its start
    instead of at the FID evaluation hours or days later. Returns the path that
    :class:`~vqgen.metrics.fid.InceptionFeatures` will find again (it then needs no network)."""
    resolved = resolve_inception_weights(path, url=url, download=download)
    load_inception_state_dict(resolved)
    return resolved


def _explicit_weights(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(
            f"FID Inception weights not found at {path} (set by {INCEPTION_CONFIG_KEY}); a configured "
            f"file is never downloaded. Fix {INCEPTION_CONFIG_KEY}, or leave it unset to use "
            f"{default_inception_path()} (downloaded from {INCEPTION_URL} on first use)."
        )
    return path


def _torch_fidelity_copy() -> tuple[Path | None, str]:
    """torch-fidelity's cached file if it holds the standard network, else None and why it was
    skipped (for the error message if nothing else is found)."""
    path = torch_fidelity_inception_path()
    if not path.is_file():
        return None, ""
    try:
        load_inception_state_dict(path)
    except CheckpointError as err:
        warnings.warn(f"not using torch-fidelity's copy of the FID Inception weights: {err}", stacklevel=3)
        return None, f"; {path} was skipped: {err}"
    return path, ""


def _missing_weights_message(url: str, reason: str) -> str:
    return (
        f"FID Inception weights not found at {default_inception_path()} (the torch hub cache), "
        f"and {reason}. Get {url} on a machine with internet access, then either put the file at "
        f"{default_inception_path()} or set {INCEPTION_CONFIG_KEY} = '/path/to/{INCEPTION_FILENAME}'. "
        "A state dict with the same tensors but no fc.weight/fc.bias also works."
    )


# ---------------------------------------------------------------------------------------------
# Downloading once


def _download_once(url: str, destination: Path) -> None:
    """Fetch ``url`` to ``destination`` unless another process did so while this one waited; the
    file is moved there only if its sha256 starts with the prefix its name carries."""
    prefix = expected_sha256_prefix(url)  # refused before any network access

    def check(digest: str) -> None:
        if not digest.startswith(prefix):
            raise CheckpointError(
                f"{url}: the downloaded file's sha256 is {digest}, expected one starting with {prefix} "
                "(the digits in its name); it was discarded. The URL serves another file, or the "
                "transfer was corrupted: check the URL or try again"
            )

    download_once(url, destination, check)


# ---------------------------------------------------------------------------------------------
# Checking a weights file


def load_inception_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read and check an FID Inception state dict (``torch.load(weights_only=True)``, no pickle code).

    Files without ``fc.weight``/``fc.bias`` (only needed for logits, never for FID) are accepted.
    A truncated file, something that is not a state dict, the wrong layout, or the right layout
    with other values (see :func:`inception_tensors_sha256`) raises :class:`CheckpointError`
    naming the file.
    """
    path = Path(path)
    state = _read_inception_state_dict(path)
    _check_inception_values(path, state)
    return state


def _read_inception_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of ``path``, checked for the FID Inception's keys and a few shapes (not values)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file; all mean "unreadable"
        raise CheckpointError(
            f"{path}: cannot read FID Inception weights (truncated, or not a torch.save file): "
            f"{type(err).__name__}: {err}"
        ) from err
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    state = dict(state)
    _check_inception_layout(path, state)
    return state


def inception_tensors_sha256(state: Mapping[str, Tensor]) -> str:
    """A checksum of a state dict's values that does not depend on how the file was saved
    (zip or legacy format, strides, storage sharing): sha256 over the keys not starting with
    ``fc.``, in sorted order, each as ``"{key}\\0{dtype}\\0{shape}\\0"`` (e.g.
    ``"Conv2d_1a_3x3.conv.weight\\0torch.float32\\0(32, 3, 3, 3)\\0"``, UTF-8) followed by the
    tensor's bytes (CPU, contiguous, native byte order, i.e. little-endian on every usual machine)."""
    digest = hashlib.sha256()
    for key in sorted(k for k in state if not k.startswith("fc.")):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _check_inception_values(path: Path, state: dict[str, Tensor], file_sha256: str | None = None) -> None:
    """CheckpointError unless ``state`` holds the standard FID Inception's values.

    Tensors of the right shapes but other values load and run, and give FIDs that cannot be
    compared with anyone else's (or non-finite ones). The file's own sha256 prefix is accepted
    too, so the standard file passes even if one of its tensors differed from the reconstructed
    file the tensor checksum was taken from.
    """
    checksum = inception_tensors_sha256(state)
    if checksum == INCEPTION_TENSORS_SHA256:
        return
    if (file_sha256 or sha256_file(path)).startswith(INCEPTION_SHA256_PREFIX):
        return
    raise CheckpointError(
        f"{path}: not the standard FID Inception weights (tensor checksum {checksum[:16]}..., expected "
        f"{INCEPTION_TENSORS_SHA256[:16]}...; or a file whose sha256 starts with {INCEPTION_SHA256_PREFIX}); "
        "FIDs computed with other weights are not comparable with published ones"
    )


def _check_inception_layout(path: Path, state: dict[str, Tensor]) -> None:
    fc_present = [k for k in _FC_SHAPES if k in state]
    if len(fc_present) == 1:
        raise CheckpointError(f"{path}: has {fc_present[0]} but not its fc partner")
    expected_keys = _NUM_KEYS_WITH_FC - (2 if not fc_present else 0)
    probes = dict(_LAYOUT_PROBES, **({k: _FC_SHAPES[k] for k in fc_present}))
    for key, shape in probes.items():
        if key not in state:
            raise CheckpointError(f"{path}: not an FID Inception state dict (no key {key!r})")
        if tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(state[key].shape)}, expected {shape}"
            )
    if len(state) != expected_keys:
        raise CheckpointError(
            f"{path}: has {len(state)} tensors, expected {expected_keys} for the FID Inception"
        )


# ---------------------------------------------------------------------------------------------
# The network from checked tensors


def _build_inception_network(state: dict[str, Tensor], source: Path, resize: str = "torch") -> nn.Module:
    """torchmetrics' NoTrainInceptionV3 holding ``state``, returning 2048-d pool features.

    torchmetrics (through torch-fidelity) only takes weights as a file path, loads it strictly and
    would download when given none. So the checked tensors are written to a private temporary file
    first; ``fc`` is filled with NaN when absent (the 2048-d forward returns before ``fc``, so the
    NaNs are never read). That file holds only tensors we saved, so its loading runs no foreign code.
    """
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        import torch_fidelity  # noqa: F401  (NoTrainInceptionV3 is a torch-fidelity module)
    except ImportError as err:
        raise ModuleNotFoundError(
            "FID needs torch-fidelity for torchmetrics' Inception: pip install torch-fidelity "
            "(or torchmetrics[image])"
        ) from err
    full = dict(state)
    for key, shape in _FC_SHAPES.items():
        full.setdefault(key, torch.full(shape, math.nan))
    with tempfile.TemporaryDirectory(prefix="vqgen-inception-") as tmp:
        tmp_path = Path(tmp) / "inception.pth"
        torch.save(full, tmp_path)
        try:
            net = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=[str(FEATURE_DIM)],
                feature_extractor_weights_path=str(tmp_path),
                antialias=resize == "torch",  # False: TensorFlow 1's bilinear resize
            )
        except RuntimeError as err:  # strict load_state_dict: missing/unexpected keys, bad shapes
            detail = " ".join(str(err).split())  # torch's message spans lines; keep it on one
            raise CheckpointError(f"{source}: does not fit the FID Inception network: {detail}") from err
    return net
