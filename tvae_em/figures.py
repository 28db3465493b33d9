"""PNG figures for `tvae-em generate`: image grids, scatter plots and histograms.

Matplotlib is used through `matplotlib.figure.Figure` (Agg canvas, no pyplot state), with every
figure laid out in whole pixels so a PNG's size is known in advance. Files are written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .io import atomic_path

DPI = 100
MIN_PANEL_PX = 128  # small images are enlarged by an integer factor up to at least this
GAP_PX = 4
FONT = 9


def panel_px(size: int) -> int:
    """On-screen side in pixels of one image panel of `size` pixels (integer zoom, >= 128 px)."""
    return size * max(1, MIN_PANEL_PX // size)


def display_scale(img: np.ndarray, lo: float = 1.0, hi: float = 99.0) -> np.ndarray:
    """One image mapped to [0, 1] between its own `lo` and `hi` percentiles (flat -> 0.5)."""
    a, b = np.percentile(img, [lo, hi])
    if not np.isfinite(a) or not np.isfinite(b) or b <= a:
        return np.full(img.shape, 0.5, dtype=np.float32)
    return np.clip((img - a) / (b - a), 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class GridLayout:
    """Pixel layout of an image grid: margins around rows x cols square panels."""

    rows: int
    cols: int
    panel: int
    left: int
    top: int
    bottom: int
    right: int = 10
    vgap: int = GAP_PX  # between rows (room for per-panel titles)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole figure in pixels."""
        w = self.left + self.cols * self.panel + (self.cols - 1) * GAP_PX + self.right
        h = self.top + self.rows * self.panel + (self.rows - 1) * self.vgap + self.bottom
        return w, h

    def box(self, r: int, c: int) -> list[float]:
        """Axes rectangle [left, bottom, width, height] of panel (r, c), in figure fractions."""
        w, h = self.size
        x0 = self.left + c * (self.panel + GAP_PX)
        y0 = h - self.top - (r + 1) * self.panel - r * self.vgap
        return [x0 / w, y0 / h, self.panel / w, self.panel / h]


def grid_layout(
    rows: int,
    cols: int,
    size: int,
    row_labels: bool = False,
    col_labels: bool = False,
    xlabel: bool = False,
    panel_titles: bool = False,
) -> GridLayout:
    """The layout `image_grid` uses for rows x cols images of `size` pixels."""
    title_px = 18 if (col_labels or panel_titles) else 0
    return GridLayout(
        rows=rows,
        cols=cols,
        panel=panel_px(size),
        left=90 if row_labels else 10,
        top=30 + title_px,
        bottom=30 if xlabel else 10,
        vgap=GAP_PX + (title_px if panel_titles else 0),
    )


def image_grid(
    path: str | os.PathLike,
    images: Sequence[Sequence[np.ndarray]],
    title: str,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    panel_titles: Sequence[Sequence[str]] | None = None,
) -> tuple[int, int]:
    """Write a grid of grey images (rows of 2D arrays, any sizes) as a PNG; returns (width, height).

    Each image is scaled to its own 1-99 percentile range; rows are drawn top to bottom.
    `col_labels` title the top row; `panel_titles` (same nesting as images) title every panel.
    """
    rows, cols = len(images), max(len(r) for r in images)
    size = max(img.shape[-1] for row in images for img in row)
    lay = grid_layout(
        rows,
        cols,
        size,
        row_labels=bool(row_labels or ylabel),
        col_labels=bool(col_labels),
        xlabel=bool(xlabel),
        panel_titles=panel_titles is not None,
    )
    w, h = lay.size
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI)
    for r, row in enumerate(images):
        for c, img in enumerate(row):
            ax = fig.add_axes(lay.box(r, c))
            ax.imshow(display_scale(img), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if panel_titles is not None:
                ax.set_title(panel_titles[r][c], fontsize=FONT - 1, pad=3)
            elif col_labels is not None and r == 0:
                ax.set_title(col_labels[c], fontsize=FONT - 1, pad=3)
            if row_labels is not None and c == 0:
                ax.set_ylabel(row_labels[r], fontsize=FONT - 1, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=FONT + 2, y=1 - 6 / h, va="top")
    if xlabel:
        fig.text(0.5, 6 / h, xlabel, ha="center", va="bottom", fontsize=FONT)
    if ylabel:
        fig.text(4 / w, 0.5, ylabel, ha="left", va="center", rotation=90, fontsize=FONT)
    save_png(fig, path)
    return w, h


def scatter(
    path: str | os.PathLike,
    x: np.ndarray,
    y: np.ndarray,
    labels: np.ndarray | None,
    title: str,
    xlabel: str,
    ylabel: str,
    max_points: int = 50_000,
) -> None:
    """Scatter plot of (x, y), coloured by integer `labels` (legend up to 20 classes)."""
    idx = np.arange(len(x))
    if len(idx) > max_points:  # a fixed random subset keeps big sets readable and fast
        idx = np.sort(np.random.default_rng(0).choice(len(x), max_points, replace=False))
    fig = Figure(figsize=(6.4, 5.6), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    size = max(1.0, 20.0 / np.sqrt(max(len(idx), 1) / 100))
    if labels is None:
        ax.scatter(x[idx], y[idx], s=size, alpha=0.6, linewidths=0)
    else:
        classes = np.unique(labels)
        cmap = _class_colours(len(classes))
        for k, cls in enumerate(classes):
            m = idx[labels[idx] == cls]
            ax.scatter(x[m], y[m], s=size, alpha=0.6, linewidths=0, color=cmap[k], label=f"{cls}")
        if len(classes) <= 20:
            ax.legend(title="class", fontsize=FONT - 2, markerscale=3, loc="best")
    ax.set_title(title, fontsize=FONT + 2)
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    fig.tight_layout()
    save_png(fig, path)


def _class_colours(k: int) -> list:
    """k distinct colours (tab10 / tab20, then a continuous map)."""
    from matplotlib import colormaps

    name = "tab10" if k <= 10 else "tab20" if k <= 20 else "turbo"
    cmap = colormaps[name]
    return [cmap(i if k <= 20 else i / max(k - 1, 1)) for i in range(k)]


def histograms(
    path: str | os.PathLike,
    panels: Sequence[tuple[np.ndarray, str, str]],
    title: str,
    bins: int = 60,
) -> None:
    """One row of histograms; each panel is (values, panel title, x-axis label)."""
    fig = Figure(figsize=(4.0 * len(panels), 3.6), dpi=DPI)
    for i, (values, name, xlabel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        v = np.asarray(values, dtype=np.float64)
        ax.hist(v[np.isfinite(v)], bins=bins, color="0.35")
        ax.set_title(name, fontsize=FONT + 1)
        ax.set_xlabel(xlabel, fontsize=FONT)
        ax.set_ylabel("particles", fontsize=FONT)
    fig.suptitle(title, fontsize=FONT + 2)
    fig.tight_layout()
    save_png(fig, path)


def save_png(fig: Figure, path: str | os.PathLike) -> None:
    """Save a figure as PNG under a temporary name, then rename it to `path`."""
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
