"""Matplotlib figures of one attribution, sized to be read at TensorBoard's default image width.

TensorBoard's Images dashboard shows each image in a card about 325 px wide unless "Show actual
image size" is ticked, so the figures here are 3.25 in × 100 dpi wide with fonts of 6.5 pt or
more; wider ones (layer charts of many layers) grow only as needed. Every figure names its axes,
units and colours. Figures are pyplot-free (``matplotlib.figure.Figure`` on the Agg canvas), so the
user's backend and open figures are left alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

HELPFUL_COLOR = "#c62828"  # red: training on the example lowered the query's loss
HARMFUL_COLOR = "#1565c0"  # blue: training on the example raised it
CARD_WIDTH_IN = 3.25  # TensorBoard's default image card (~325 px) at 100 dpi
DPI = 100


def new_figure(size: tuple[float, float]) -> Any:
    """A pyplot-free figure at `DPI` (rendered with the Agg canvas)."""
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=DPI)


# ------------------------------------------------------------------------------------ example grids
@dataclass
class Tile:
    """One example in a grid: an image ``[H, W]`` or ``[H, W, 3]`` in [0, 1] (or ``None``) and a caption."""

    image: Optional[np.ndarray]
    caption: str


@dataclass
class Section:
    """A titled group of tiles drawn with a frame of ``color``; ``note`` is written right of a lone tile."""

    title: str
    tiles: list[Tile]
    color: str = "black"
    note: str = ""


def _fit(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` scaled (nearest neighbour, aspect kept) into a white ``[size, size, 3]`` square."""
    rgb = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    out_h, out_w = max(1, round(h * scale)), max(1, round(w * scale))
    rows = np.minimum((np.arange(out_h) / scale).astype(int), h - 1)
    cols = np.minimum((np.arange(out_w) / scale).astype(int), w - 1)
    square = np.ones((size, size, 3))
    top, left = (size - out_h) // 2, (size - out_w) // 2
    square[top: top + out_h, left: left + out_w] = rgb[rows][:, cols]
    return square


def grid_figure(sections: Sequence[Section], columns: int = 4, title: str = "") -> Any:
    """Sections of captioned tiles, ``columns`` per row, drawn as one mosaic image (one axes: fast).

    Layout in inches: a tile is 0.66 in with its caption (two lines, 7 pt) above it, so four columns
    fit TensorBoard's ~3.25 in card unscaled.
    """
    import matplotlib.colors as mcolors

    cell_w, tile, caption_h, header_h, margin = 0.78, 0.66, 0.26, 0.24, 0.04
    width = columns * cell_w + 2 * margin
    layout = []  # (kind, y, payload)
    y = margin + (0.22 if title else 0.0)
    for section in sections:
        layout.append(("header", y, section))
        y += header_h
        for start in range(0, max(len(section.tiles), 1), columns):
            layout.append(("row", y, (section, section.tiles[start: start + columns])))
            y += caption_h + tile + 0.06
    height = y + margin
    px = round(tile * DPI)
    mosaic = np.ones((round(height * DPI), round(width * DPI), 3))
    fig = new_figure((width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    texts = []
    for kind, top, payload in layout:
        if kind == "header":
            texts.append((margin, top + header_h * 0.55, payload.title, dict(fontsize=7.5, fontweight="bold",
                                                                             color=payload.color, va="center")))
            continue
        section, tiles = payload
        frame = np.array(mcolors.to_rgb(section.color))
        for c, item in enumerate(tiles):
            x0 = margin + c * cell_w + (cell_w - tile) / 2
            texts.append((x0 + tile / 2, top + caption_h - 0.02, item.caption,
                          dict(fontsize=7, ha="center", va="bottom", linespacing=1.0)))
            if item.image is None:
                continue
            r0, c0 = round((top + caption_h) * DPI), round(x0 * DPI)
            mosaic[r0 - 2: r0 + px + 2, c0 - 2: c0 + px + 2] = frame
            mosaic[r0: r0 + px, c0: c0 + px] = _fit(item.image, px)
        if section.note and len(tiles) == 1:
            texts.append((margin + cell_w + 0.05, top + caption_h + tile / 2, section.note,
                          dict(fontsize=7, va="center", linespacing=1.3)))
    ax.imshow(mosaic, extent=(0, width, height, 0), interpolation="nearest", aspect="auto")
    for x, y_, text, style in texts:
        ax.text(x, y_, text, **style)
    if title:
        ax.text(margin, margin + 0.1, title, fontsize=7.5, va="center")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    return fig


# ------------------------------------------------------------------------------------ distributions
def _style(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    """Axis labels, ticks and title at sizes that stay legible in a ~330 px card."""
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7.5)
    ax.set_title(title, fontsize=8.5)


def ccdf_figure(curves: Sequence[tuple[str, np.ndarray, np.ndarray, float]], title: str) -> Any:
    """P(|score| ≥ s) on log-log axes, one curve per ``(label, s, p, α)``; a fitted tail line where α is finite."""
    import matplotlib

    fig = new_figure((CARD_WIDTH_IN, 3.0))
    ax = fig.subplots()
    colors = matplotlib.colormaps["tab10"]
    for i, (label, x, p, alpha) in enumerate(curves):
        color = colors(i % 10)
        ax.loglog(x, p, ".", ms=2, color=color, label=label if i < 10 else None)
        if math.isfinite(alpha):
            k = min(max(10, int(0.1 * x.size)), x.size)
            x0, p0 = x[-k], p[-k]
            xs = np.array([x0, x[-1]])
            ax.loglog(xs, p0 * (xs / x0) ** (-alpha), "-", lw=1, color=color)
    _style(ax, "|score| s (raw units)", "fraction with |score| ≥ s", title)
    ax.legend(fontsize=6.5, loc="lower left", ncol=2 if len(curves) > 5 else 1, markerscale=3, handletextpad=0.2,
              columnspacing=0.6, title="query, tail α (lines: fit)", title_fontsize=6.5)
    fig.tight_layout(pad=0.3)
    return fig


# ------------------------------------------------------------------------------------ layers
def _share_bars(binned: np.ndarray, labels: Sequence[str], color: str, size: tuple[float, float]) -> tuple[Any, Any]:
    """Bars of the mean share (%) over queries of ``binned [Q, B]``, a dot per query."""
    fig = new_figure(size)
    ax = fig.subplots()
    positions = np.arange(binned.shape[1])
    ax.bar(positions, 100 * binned.mean(0), color=color, alpha=0.7, label="mean over queries")
    for q in range(binned.shape[0]):
        ax.plot(positions, 100 * binned[q], ".", color="black", ms=3, alpha=0.5, label="one query" if q == 0 else None)
    ax.set_xticks(positions)
    ax.set_xticklabels(labels)
    return fig, ax


def layer_shares_figure(shares: np.ndarray, names: Sequence[str], title: str) -> Any:
    """Bars: each layer's share of Σ|score| in % (mean over queries, ``shares [Q, L]``); dots: single queries."""
    n = len(names)
    fig, ax = _share_bars(shares, names, "tab:gray", (max(CARD_WIDTH_IN, 0.3 * n + 1.0), 3.0))
    _style(ax, "", "share of Σ|score| (%)", title)
    if n > 3:
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=6.5)
    ax.legend(fontsize=7)
    fig.tight_layout(pad=0.3)
    return fig


def layer_depth_figure(binned: np.ndarray, labels: Sequence[str], title: str) -> Any:
    """Bars: share of Σ|score| (%) per depth bin, bottom of the network on the left (``binned [Q, B]``)."""
    fig, ax = _share_bars(binned, labels, "tab:purple", (CARD_WIDTH_IN, 3.0))
    ax.axhline(100 / binned.shape[1], color="gray", lw=0.8, ls="--", label="equal split")
    _style(ax, "layers, bottom → top", "share of Σ|score| (%)", title)
    ax.legend(fontsize=7)
    fig.tight_layout(pad=0.3)
    return fig


# ------------------------------------------------------------------------------------ over training
def history_figure(series: Sequence[tuple[str, str, Sequence[int], Sequence[float]]], title: str) -> Any:
    """Lines of ``(label, direction, steps, values)``: each tracked example's share of Σ|score| (%)
    over training; red shades for examples that entered as helpful, blue for harmful, legend below."""
    import matplotlib

    rows = math.ceil(len(series) / 4)
    height = 2.6 + 0.16 * rows
    fig = new_figure((CARD_WIDTH_IN, height))
    ax = fig.subplots()
    counts = {"helpful": 0, "harmful": 0}
    markers = "osD^v<>p"
    for label, direction, steps, values in series:
        i = counts[direction] = counts[direction] + 1
        shades = matplotlib.colormaps["Reds" if direction == "helpful" else "Blues"]
        ax.plot(steps, values, "-", marker=markers[i % len(markers)], ms=3, lw=1,
                color=shades(0.45 + 0.5 * ((i * 0.37) % 1.0)), label=label)
    ax.axhline(0, color="gray", lw=0.6)
    _style(ax, "training step", "share of Σ|score| (%)", title)
    # fixed margins in inches (title 2 lines, axis labels, legend rows): cheaper than tight_layout
    fig.subplots_adjust(left=0.6 / CARD_WIDTH_IN, right=1 - 0.08 / CARD_WIDTH_IN, top=1 - 0.45 / height,
                        bottom=(0.45 + 0.16 * rows) / height)
    if series:
        fig.legend(loc="lower center", ncol=4, fontsize=6.5, handlelength=1.5, columnspacing=0.8, frameon=False)
    return fig


__all__ = [
    "CARD_WIDTH_IN", "HARMFUL_COLOR", "HELPFUL_COLOR", "Section", "Tile", "ccdf_figure", "grid_figure",
    "history_figure", "layer_depth_figure", "layer_shares_figure", "new_figure",
]
