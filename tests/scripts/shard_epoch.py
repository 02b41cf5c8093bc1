"""Run under torchrun (CPU processes, gloo): the labels each rank's training loader yields.

    shard_epoch.py PACK OUT RESUME_AT

PACK is a pack whose train labels are the item indices (so a label names its item). Each rank
builds the training loader as ``vqgen.train.fit`` does (``_train_loader`` + ``accelerator.prepare``,
2 workers) and takes batches from ``_batches``, fit's own loop over epochs: two epochs from the
start, then, with a new loader as a resumed process makes, epoch 1 from its batch RESUME_AT on.
Writes ``OUT/rank{r}.json``: ``{"epochs": [[batch labels, ...], [...]], "resumed": [...]}``.
"""

import json
import sys
from pathlib import Path

from vqgen.data.datasets import DataConfig, build_dataset
from vqgen.train import TrainConfig, TrainState, _batches, _train_loader, make_accelerator


def take(loader, accelerator, state: TrainState, count: int) -> list[list[int]]:
    batches = _batches(loader, accelerator, state)
    return [next(batches)[1].tolist() for _ in range(count)]


def main(pack: Path, out: Path, resume_at: int) -> None:
    accelerator = make_accelerator(out / "stage", tracker="none", seed=0)
    data = DataConfig(kind="shards", root=str(pack), image_size=8, shuffle_window_shards=2)
    train_set = build_dataset(data, "train")
    cfg = TrainConfig(batch_size=4, num_workers=2)

    def prepared_loader():
        return accelerator.prepare(_train_loader(train_set, cfg, accelerator))

    loader = prepared_loader()
    per_epoch = len(loader)
    run = take(loader, accelerator, TrainState(), 2 * per_epoch)
    resumed = take(prepared_loader(), accelerator, TrainState(epoch=1, batch_in_epoch=resume_at),
                   per_epoch - resume_at)
    result = {"epochs": [run[:per_epoch], run[per_epoch:]], "resumed": resumed}
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
