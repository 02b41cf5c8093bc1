"""An exponential moving average of a model's weights (``train.ema_decay``), kept beside training.

Training goes on with the raw weights; evaluation, the best-weights file and the export read the
average. :class:`WeightEMA` holds one plain tensor per parameter (same device, dtype and memory
format as the parameter) and lends them to the model for a block (:meth:`WeightEMA.applied`), so
what is evaluated is the trained module itself, with whatever wrappers training put on it
(Accelerate's autocast around ``forward``).

Only parameters are averaged. Buffers stay the raw model's own: the VQ-VAE's codebook buffers are
already a moving average of the encoder's outputs, and averaging them again would leave a code that
a dead-code restart moved somewhere between its old place and its new one, a vector no encoder
output is near; the quantizer's step counter is an integer. In the VQ-VAE export the averaged
encoder and decoder therefore sit beside the codebooks of the last step.

The state is the averages alone (the decay at a step follows from the step, see
:func:`decay_at`), saved as ``ema.safetensors`` in every checkpoint with the decay, start and step
it belongs to in the file's metadata.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vqgen.errors import CheckpointError

EMA_FILE = "ema.safetensors"
FORMAT = "vqgen-weight-ema"


def decay_at(step: int, decay: float, start: int) -> float:
    """The weight of the old average in the update after optimizer step ``step`` (counted from 1).

    0 up to ``start`` (the average is the raw weights), then ``min(decay, n / (n + 9))`` at the
    n-th step after ``start``: the warm-up of TensorFlow's ``ExponentialMovingAverage``
    (``(1 + updates) / (10 + updates)``), so that the average is not held for thousands of steps
    near the weights of step ``start``.
    """
    n = step - start
    return 0.0 if n <= 0 else min(decay, n / (n + 9))


class WeightEMA:
    """The moving average of ``model``'s parameters, starting as a copy of them.

    ``update(model, step)`` after each optimizer step; the same model object (its parameters in
    the same order) every time. Under several processes every rank updates its own copy from the
    identical weights DDP leaves it with, so the copies stay identical without communication.
    """

    def __init__(self, model: torch.nn.Module, decay: float, start: int):
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay, self.start = decay, start
        named = [(name, p.detach()) for name, p in model.named_parameters()]
        self.names = [name for name, _ in named]
        self.averages = [p.clone() for _, p in named]

    def _params(self, model: torch.nn.Module) -> list[torch.Tensor]:
        params = [p.detach() for p in model.parameters()]
        if len(params) != len(self.averages):
            raise ValueError(f"the model has {len(params)} parameters, the average {len(self.averages)}")
        return params

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold ``model``'s weights after optimizer step ``step`` into the average."""
        params = self._params(model)
        decay = decay_at(step, self.decay, self.start)
        if decay == 0:
            torch._foreach_copy_(self.averages, params)
        else:  # average + (1 - decay) * (raw - average), as torch.optim.swa_utils' EMA does it
            torch._foreach_lerp_(self.averages, params, 1 - decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Overwrite ``model``'s parameters with the averages (its buffers are left as they are)."""
        torch._foreach_copy_(self._params(model), self.averages)

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """``model`` holding the averaged parameters inside the block and its own again after it,
        bit for bit, however the block ends."""
        with torch.no_grad():
            params = self._params(model)
            raw = [p.clone() for p in params]
            torch._foreach_copy_(params, self.averages)
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, raw)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages by parameter name (the tensors themselves, not copies)."""
        return dict(zip(self.names, self.averages))

    def _metadata(self, step: int) -> dict[str, str]:
        return {"format": FORMAT, "decay": repr(self.decay), "start": str(self.start), "step": str(step)}

    def save(self, path: Path, step: int) -> None:
        """Write the averages after optimizer step ``step`` to ``path`` (safetensors)."""
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        save_file(tensors, str(path), metadata=self._metadata(step))

    def load(self, path: Path, step: int) -> None:
        """Restore the averages saved by :meth:`save` at optimizer step ``step``; a missing, damaged
        or mismatched file is a CheckpointError naming it."""
        if not path.is_file():
            raise CheckpointError(
                f"{path} is missing: the checkpoint holds no weight average (made with train.ema_decay = 0, "
                f"or the file was deleted); delete {path.parent.parent} to start the stage afresh"
            )
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as err:  # safetensors raises several types for a damaged file
            raise CheckpointError(f"{path} could not be read ({type(err).__name__}: {err})") from err
        expected = self._metadata(step)
        if metadata != expected:
            raise CheckpointError(
                f"{path} holds the average of another setting or step ({metadata}, expected {expected}); "
                f"delete {path.parent.parent} to start the stage afresh"
            )
        if sorted(tensors) != sorted(self.names):
            raise CheckpointError(f"{path} does not hold the parameters of this model")
        for name, average in zip(self.names, self.averages):
            if tensors[name].shape != average.shape:
                raise CheckpointError(f"{path}: {name} has shape {list(tensors[name].shape)}, "
                                      f"the model's {list(average.shape)}")
        saved = [tensors[name].to(average.device) for name, average in zip(self.names, self.averages)]
        with torch.no_grad():
            torch._foreach_copy_(self.averages, saved)
