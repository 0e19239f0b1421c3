"""Attention maps as pictures: probabilities -> uint8 with visible contrast -> an RGB heatmap.

Rows of an attention map sum to 1, so over a long window most entries are tiny; shown raw (as W&B
does with a float image in [0, 1]) the map is black. Each map is therefore divided by its own
maximum and raised to ``gamma`` < 1 before it is quantised, and cells a query may not see (the
causal upper triangle) are painted in a background colour that no value of the colour map takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

BACKGROUND = (255, 255, 255)
# Anchors of a perceptually ordered dark-blue -> teal -> yellow map (viridis-like); none is white,
# so a masked cell never looks like a value.
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
COLORMAP = (
    np.stack(
        [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c]) for c in range(3)], axis=1
    )
    .round()
    .astype(np.uint8)
)


def to_uint8(probs: torch.Tensor | np.ndarray, gamma: float = 0.5) -> np.ndarray:
    """Map one [queries, keys] map of non-negative weights to uint8 0..255 (its maximum -> 255)."""
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    values = probs.detach().float().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs, np.float32)
    if values.ndim != 2:
        raise ValueError(f"an attention map must be 2-D [queries, keys], got shape {list(values.shape)}")
    values = np.nan_to_num(np.clip(values, 0.0, None), nan=0.0)
    peak = float(values.max()) if values.size else 0.0
    scaled = (values / peak) ** gamma if peak > 0 else values
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Layout:
    """Where the map's cells are in the rendered picture: cell (i, j) covers
    ``[left + j*cell, left + (j+1)*cell) x [top + i*cell, top + (i+1)*cell)``."""

    left: int
    top: int
    cell: int

    def pnginfo(self, rows: int, cols: int) -> PngInfo:
        """A PNG text chunk ``grid`` = ``left,top,cell,rows,cols``, so tools reading the file can
        find the cells without knowing how it was drawn."""
        info = PngInfo()
        info.add_text("grid", f"{self.left},{self.top},{self.cell},{rows},{cols}")
        return info


def cell_size(n: int, target: int = 320) -> int:
    """Pixels per cell: about ``target`` pixels across, at least 2 and at most 24 per token."""
    return int(min(24, max(2, target // max(n, 1))))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _label(text: str, limit: int = 8) -> str:
    # Whitespace and control characters would be invisible on the axes; show them escaped.
    shown = repr(text)[1:-1].replace(" ", "·")
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


class HeatmapRenderer:
    """Draws many [n, n] maps that share one frame: the axes labels (``tokens``, keys along the
    top, queries down the left) are drawn once, and each map only pastes its cells and a title."""

    def __init__(self, n: int, tokens: list[str] | None = None, gamma: float = 0.5, target: int = 320) -> None:
        if tokens is not None and len(tokens) != n:
            raise ValueError(f"{len(tokens)} token labels for a map with {n} keys; pass one label per key")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        self.n, self.gamma = n, gamma
        self.cell = cell_size(n, target)
        self.font_size = max(8, min(self.cell, 14))
        self.font = _font(self.font_size)
        labels = [_label(t) for t in tokens] if tokens is not None else None
        label_px = (max(int(self.font.getlength(s)) for s in labels) + 6) if labels else 0
        title_px = self.font_size + 8
        self.layout = Layout(left=label_px + 2, top=title_px + label_px + 2, cell=self.cell)
        side = n * self.cell
        self.frame = Image.new("RGB", (self.layout.left + side + 2, self.layout.top + side + 2), BACKGROUND)
        if labels:
            draw = ImageDraw.Draw(self.frame)
            left, top, cell = self.layout.left, self.layout.top, self.cell
            for i, text in enumerate(labels):
                y = top + i * cell + (cell - self.font_size) // 2
                draw.text((left - 3 - int(self.font.getlength(text)), y), text, fill=(0, 0, 0), font=self.font)
                # Key labels run upwards from the top edge of their column: draw, then rotate.
                strip = Image.new("RGB", (label_px, self.font_size + 4), BACKGROUND)
                ImageDraw.Draw(strip).text((2, 0), text, fill=(0, 0, 0), font=self.font)
                strip = strip.rotate(90, expand=True)
                self.frame.paste(strip, (left + _column_offset(i, cell, strip.width), top - label_px - 1))

    def render(
        self, probs: torch.Tensor | np.ndarray, allowed: np.ndarray | None = None, title: str | None = None
    ) -> Image.Image:
        """The picture of one map; ``allowed`` (bool [n, n]) marks the cells a query may attend,
        the others get the background colour."""
        levels = to_uint8(probs, self.gamma)
        if levels.shape != (self.n, self.n):
            raise ValueError(f"this renderer draws [{self.n}, {self.n}] maps, got {list(levels.shape)}")
        rgb = COLORMAP[levels]
        if allowed is not None:
            if allowed.shape != levels.shape:
                raise ValueError(f"allowed has shape {list(allowed.shape)}, the map {list(levels.shape)}")
            rgb[~allowed] = BACKGROUND
        grid = np.repeat(np.repeat(rgb, self.cell, axis=0), self.cell, axis=1)
        image = self.frame.copy()
        image.paste(Image.fromarray(grid), (self.layout.left, self.layout.top))
        if title:
            ImageDraw.Draw(image).text((2, 2), title, fill=(0, 0, 0), font=self.font)
        return image


def render_heatmap(
    probs: torch.Tensor | np.ndarray,
    allowed: np.ndarray | None = None,
    tokens: list[str] | None = None,
    title: str | None = None,
    gamma: float = 0.5,
) -> tuple[Image.Image, Layout]:
    """An RGB picture of one square attention map [queries, keys] and where its cells are
    (see :class:`HeatmapRenderer`)."""
    shape = tuple(probs.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"an attention map must be square [queries, keys], got shape {list(shape)}")
    renderer = HeatmapRenderer(shape[0], tokens, gamma)
    return renderer.render(probs, allowed, title), renderer.layout


def _column_offset(j: int, cell: int, width: int) -> int:
    """x offset (from the grid's left edge) that centres a ``width``-wide label on column ``j``."""
    return j * cell + (cell - width) // 2
