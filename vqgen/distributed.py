"""Splitting work across processes without DistributedSampler's padding."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env
from torch.utils.data import DataLoader, Dataset, Subset

from vqgen.errors import VQGenError

T = TypeVar("T")


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """This process's items of ``range(n)``: every item belongs to exactly one process.

    DistributedSampler pads the last round with repeats so that shards have equal length; for
    evaluation and code extraction a repeat would count an image twice, so shards differ by at
    most one item instead.
    """
    return range(rank, n, world_size)


def shard_loader(dataset: Dataset, batch_size: int, accelerator: Accelerator, num_workers: int = 0) -> DataLoader:
    """An in-order DataLoader over this process's shard (no padding, no shuffling)."""
    indices = shard_indices(len(dataset), accelerator.process_index, accelerator.num_processes)
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers)


def process_state() -> PartialState:
    """This process's place in the process group, as the Accelerators created later will see it.

    The first ``PartialState`` fixes the process group for the whole process. A bare
    ``PartialState()`` ignores ``ACCELERATE_USE_CPU`` (``Accelerator`` reads it), so on CPU it
    would settle on one process and every rank would then act as rank 0.
    """
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def on_main_process(fn: Callable[[], T]) -> T:
    """``fn()`` run on the main process only; every process returns its result (plain data), or
    raises a :class:`VQGenError` with the same message, so all processes of a launch take the same
    branch (a rank that went its own way would wait forever in the next collective)."""
    state = process_state()
    outcome: tuple[str, Any] = ("ok", None)
    error: VQGenError | None = None
    if state.is_main_process:
        try:
            outcome = ("ok", fn())
        except VQGenError as err:
            error, outcome = err, ("error", str(err))
    if state.num_processes > 1:
        box = [outcome]
        broadcast_object_list(box, from_process=0)
        outcome = box[0]
    if outcome[0] == "error":
        raise error if error is not None else VQGenError(outcome[1])
    return outcome[1]


def shutdown() -> None:
    """Tear down the process group at the end of a command (once: the stages share it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
