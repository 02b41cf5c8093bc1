"""Pictures people look at: image grids and metric curves, written as PNG with Pillow only."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vqgen.data.datasets import to_uint8
from vqgen.utils import atomic_write_bytes


def image_grid(images: torch.Tensor, ncol: int | None = None, pad: int = 2) -> Image.Image:
    """uint8 ``[N, C, H, W]`` → one PIL image, ``ncol`` per row (default: square-ish)."""
    n, c, h, w = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    canvas = torch.full((3, nrow * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=torch.uint8)
    rgb = images.expand(-1, 3, -1, -1) if c == 1 else images
    for i in range(n):
        y, x = pad + (i // ncol) * (h + pad), pad + (i % ncol) * (w + pad)
        canvas[:, y : y + h, x : x + w] = rgb[i].cpu()
    return Image.fromarray(canvas.permute(1, 2, 0).numpy())


def save_png(image: Image.Image, path: Path, scale: int = 1) -> None:
    """Save atomically; ``scale`` enlarges small images (nearest) so they can be seen."""
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def save_grid(images: torch.Tensor, path: Path, ncol: int | None = None) -> None:
    """``[-1, 1]`` float or uint8 images → a PNG grid, enlarged when the images are small."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    scale = max(1, 96 // images.shape[-1])
    save_png(image_grid(images, ncol), path, scale=scale)


COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))
Series = list[tuple[int, float]]


def labelled_grid(images: torch.Tensor, labels, class_names: tuple[str, ...] = (), per_row: int = 8,
                  pad: int = 2, scale: int = 1) -> Image.Image:
    """uint8 ``[N, C, H, W]`` with their class labels → one row per class (its first ``per_row``
    images), the class name (or number) at the left of each row; ``scale`` enlarges small images."""
    rows = []
    for label in sorted({int(l) for l in labels}):
        chosen = [i for i, l in enumerate(labels) if int(l) == label][:per_row]
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        row = image_grid(images[chosen], ncol=per_row, pad=pad)
        rows.append((name, row.resize((row.width * scale, row.height * scale), Image.NEAREST)))
    margin = 8 + 7 * max(len(name) for name, _ in rows)
    canvas = Image.new("RGB", (margin + max(r.width for _, r in rows), sum(r.height for _, r in rows)), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for name, row in rows:
        canvas.paste(row, (margin, y))
        draw.text((4, y + row.height // 2 - 6), name, fill="black")
        y += row.height
    return canvas


def draw_curves(panels: dict[str, dict[str, Series]], size=(480, 300), log_scale: tuple[str, ...] = (),
                x_label: str = "step") -> Image.Image:
    """One line chart per panel (value against step), stacked vertically; each panel's series share
    its axes (training and validation of one quantity together), in colours named in a legend. A
    panel whose title contains one of ``log_scale`` has a log-scale value axis (losses); a series
    of a single point is drawn as a dot. ``x_label`` names the horizontal axis at its two ends."""
    width, height = size
    titles = [t for t, series in panels.items() if any(series.values())]
    canvas = Image.new("RGB", (width, max(1, len(titles)) * height), "white")
    draw = ImageDraw.Draw(canvas)
    for row, title in enumerate(titles):
        series = {name: points for name, points in panels[title].items() if points}
        log = any(word in title for word in log_scale) and all(v > 0 for pts in series.values() for _, v in pts)
        _draw_panel(draw, row * height, width, height, title, series, log, x_label)
    return canvas


def _draw_panel(draw: ImageDraw.ImageDraw, top: int, width: int, height: int, title: str,
                series: dict[str, Series], log: bool, x_label: str = "step") -> None:
    y_of = (lambda v: math.log10(v)) if log else (lambda v: v)
    steps = [s for pts in series.values() for s, _ in pts]
    values = [y_of(v) for pts in series.values() for _, v in pts]
    top, left, plot_w, plot_h = top + 24, 60, width - 80, height - 56
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1
    s0, s1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1

    def xy(step: int, value: float) -> tuple[float, float]:
        return left + (step - s0) / (s1 - s0) * plot_w, top + plot_h - (y_of(value) - lo) / (hi - lo) * plot_h

    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=(160, 160, 160))
    legend = []
    for colour, (name, points) in zip(COLOURS * 4, series.items()):
        coords = [xy(s, v) for s, v in points]
        if len(coords) == 1:
            (x, y), r = coords[0], 3
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        else:
            draw.line(coords, fill=colour, width=2)
        legend.append((f"{name} (last {points[-1][1]:.4g})", colour))
    heading = title + ("  [log scale]" if log else "")
    draw.text((left, top - 18), heading, fill="black")
    # The legend goes right of the title when both fit on the line (about 7 px a character),
    # else inside the plot's top right corner, one entry per line.
    beside = left + 7 * len(heading) + 16 + sum(7 * len(t) + 16 for t, _ in legend) <= left + plot_w
    x, y = left + plot_w, top - 18
    for text, colour in reversed(legend) if beside else legend:
        if beside:
            x -= 7 * len(text) + 16
        else:
            x, y = left + plot_w - 7 * len(text) - 20, y + 14
        draw.rectangle([x, y + 4, x + 8, y + 12], fill=colour)
        draw.text((x + 12, y), text, fill="black")
    shown = (lambda v: 10**v) if log else (lambda v: v)
    draw.text((4, top), f"{shown(hi):.3g}", fill="black")
    draw.text((4, top + plot_h - 10), f"{shown(lo):.3g}", fill="black")
    ends = [f"{x_label} {s:.4g}" if isinstance(s, float) else f"{x_label} {s}" for s in (s0, s1)]
    draw.text((left, top + plot_h + 4), ends[0], fill="black")
    draw.text((left + plot_w - 7 * len(ends[1]), top + plot_h + 4), ends[1], fill="black")


def stack_panels(panels: list[tuple[str, Image.Image]], width: int = 800) -> Image.Image:
    """Titled panels one below the other on a white page (each scaled to fit ``width``)."""
    scaled = []
    for title, panel in panels:
        if panel.width > width:
            panel = panel.resize((width, max(1, panel.height * width // panel.width)), Image.BILINEAR)
        scaled.append((title, panel))
    page = Image.new("RGB", (width, sum(p.height + 28 for _, p in scaled) + 8), "white")
    draw, y = ImageDraw.Draw(page), 4
    for title, panel in scaled:
        draw.text((8, y + 6), title, fill="black")
        page.paste(panel, ((width - panel.width) // 2, y + 24))
        y += panel.height + 28
    return page

