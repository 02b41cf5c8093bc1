"""The report's pictures: class-labelled sample grids and curves people can read."""

from __future__ import annotations

import numpy as np
import torch

from vqgen.pictures import COLOURS, draw_curves, labelled_grid


def _has_colour(image, colour) -> bool:
    return bool((np.asarray(image) == np.array(colour, dtype=np.uint8)).all(axis=-1).any())


def test_labelled_grid_has_one_row_per_class():
    images = torch.full((12, 3, 8, 8), 0, dtype=torch.uint8)
    labels = torch.tensor([2, 0, 2, 0, 1, 2, 0, 1, 2, 2, 0, 1])
    grid = labelled_grid(images, labels, ("a", "b", "c"), per_row=4, pad=2)
    assert grid.height == 3 * (8 + 2 * 2)  # three rows, each one image high with its padding
    # Black image cells: as many as images per class (at most per_row), row by row.
    cells = np.asarray(grid)[:, :, 0] == 0
    row_height = grid.height // 3
    counts = [int(cells[r * row_height + row_height // 2].sum()) // 8 for r in range(3)]
    assert counts == [4, 3, 4]  # class 0: 4 images, class 1: 3, class 2: 5 capped at 4


def test_training_and_validation_share_a_panel_and_one_point_is_drawn():
    panels = {"loss": {"train": [(1, 1.0), (2, 0.5), (3, 0.1)], "val": [(3, 0.2)]}}
    image = draw_curves(panels, size=(300, 200), log_scale=("loss",))
    assert image.height == 200  # one panel for both series
    assert _has_colour(image, COLOURS[0]) and _has_colour(image, COLOURS[1])  # the line and the single dot
    linear = draw_curves(panels, size=(300, 200))
    assert not np.array_equal(np.asarray(image), np.asarray(linear))  # the log scale moves the points
    assert draw_curves({"empty": {"train": []}}, size=(300, 200)).height == 200  # nothing to draw: blank
