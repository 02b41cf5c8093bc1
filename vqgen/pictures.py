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


def draw_curves(series: dict[str, list[tuple[int, float]]], size=(480, 300)) -> Image.Image:
    """One small line chart per series (value against step), stacked vertically."""
    width, height = size
    names = [n for n, points in series.items() if len(points) >= 2]
    canvas = Image.new("RGB", (width, max(1, len(names)) * height), "white")
    draw = ImageDraw.Draw(canvas)
    for row, name in enumerate(names):
        steps, values = zip(*series[name])
        top, left, plot_w, plot_h = row * height + 24, 60, width - 80, height - 56
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1
        s0, s1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
        points = [
            (left + (s - s0) / (s1 - s0) * plot_w, top + plot_h - (v - lo) / (hi - lo) * plot_h)
            for s, v in zip(steps, values)
        ]
        draw.rectangle([left, top, left + plot_w, top + plot_h], outline=(160, 160, 160))
        draw.line(points, fill=(31, 119, 180), width=2)
        draw.text((left, top - 18), f"{name}  (last {values[-1]:.4g})", fill="black")
        draw.text((4, top), f"{hi:.3g}", fill="black")
        draw.text((4, top + plot_h - 10), f"{lo:.3g}", fill="black")
        draw.text((left, top + plot_h + 4), f"step {s0}", fill="black")
        draw.text((left + plot_w - 60, top + plot_h + 4), f"step {s1}", fill="black")
    return canvas


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

