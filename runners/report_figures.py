"""The report's figures as PNG bytes (matplotlib, Agg: no display needed), from the grids of report_tables.

Figures are rendered to memory so the same bytes go to ``<key>.png``, into the HTML dashboard as a data
URI, and to the logger.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")  # before pyplot: a headless job must never look for a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .report_tables import (Grid, Heatmap, TradeoffPoint, history, method_label, method_sort_key,  # noqa: E402
                            number, setting_label)

_DPI = 110
_MAX_ANNOTATED_BARS = 48  # above this the ratio labels overlap and only clutter


@dataclass
class Figure:
    key: str
    title: str
    png: bytes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _colors(n: int):
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def grid_bars(grid: Grid, ylabel: str, title: str, ratio_fmt: str) -> Figure:
    """Grouped bars: one group per column (model / batch), one bar per method; OOM marked at the base."""
    methods, cols = grid.row_labels, grid.col_labels
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.4 * len(cols) * max(1, len(methods)) + 2)), 4.2))
    x = np.arange(len(cols))
    annotate = len(methods) * len(cols) <= _MAX_ANNOTATED_BARS
    top = max([c.value for c in grid.cells.values() if c.value is not None], default=1.0)
    for i, (method, color) in enumerate(zip(methods, _colors(len(methods)))):
        offsets = x - 0.4 + width * (i + 0.5)
        heights = []
        for col in cols:
            cell = grid.cells.get((method, col))
            heights.append(cell.value if cell and cell.value is not None else 0.0)
        ax.bar(offsets, heights, width, label=method, color=color)
        for xo, col in zip(offsets, cols):
            cell = grid.cells.get((method, col))
            if cell is None:
                continue
            if cell.value is None and cell.status in ("oom", "error"):
                ax.text(xo, top * 0.01, "OOM" if cell.status == "oom" else "err", rotation=90, ha="center",
                        va="bottom", fontsize=7, color="crimson")
            elif annotate and cell.ratio is not None:
                ax.text(xo, cell.value, ratio_fmt.format(cell.ratio), ha="center", va="bottom", fontsize=7,
                        rotation=90 if len(methods) > 4 else 0)
    ax.set_xticks(x, cols, rotation=20 if len(cols) > 4 else 0, ha="right" if len(cols) > 4 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(0, top * 1.15)
    ax.grid(axis="y", alpha=0.3)
    # Outside the axes, on the right: with a dozen sweep points inside it would cover the bars.
    ax.legend(fontsize=8, ncol=1 if len(methods) <= 12 else 2, loc="upper left", bbox_to_anchor=(1.0, 1.0),
              frameon=False)
    return Figure(f"{grid.key}_bars", title, _png(fig))


def accuracy_bars(grid: Grid) -> Figure:
    return grid_bars(grid, "val top-1 (%)", "Final validation top-1 per method", "{:+.1f}")


def training_curves(rows: list[dict[str, Any]]) -> Optional[Figure]:
    """Per model / data set, side by side: training loss and validation top-1 against epoch, one line
    per run (the same colour in both panels)."""
    # A curve needs two epochs; one-epoch runs are in the accuracy table and bars already.
    runs = [r for r in rows if r.get("mode") == "train" and len(history(r)) >= 2]
    if not runs:
        return None
    settings = sorted({setting_label(r) for r in runs})
    fig, axes = plt.subplots(len(settings), 2, figsize=(11.0, 3.8 * len(settings)), squeeze=False)
    for (loss_ax, top1_ax), setting in zip(axes, settings):
        members = sorted((r for r in runs if setting_label(r) == setting),
                         key=lambda r: (method_sort_key(r), number(r.get("epochs")) or 0, str(r.get("seed"))))
        labels = [method_label(r) for r in members]
        for r, color in zip(members, _colors(len(members))):
            label = method_label(r)
            if labels.count(label) > 1:  # several runs of one method: tell them apart
                label += f" {number(r.get('epochs')) or 0:.0f} ep seed {r.get('seed')}"
            for ax, key in ((loss_ax, "train_loss"), (top1_ax, "val_top1")):
                points = [(h.get("epoch"), h[key]) for h in history(r) if number(h.get(key)) is not None]
                points = [(int(e) if e is not None else i + 1, v) for i, (e, v) in enumerate(points)]
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None,
                        markersize=3, label=label, color=color)
        for ax, ylabel in ((loss_ax, "train loss"), (top1_ax, "val top-1 (%)")):
            ax.set_title(f"{setting}: {ylabel}", fontsize=10)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        top1_ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return Figure("training_curves", "Training loss and validation top-1 per epoch", _png(fig))


def tradeoff(points: list[TradeoffPoint], key: str, title: str, xlabel: str, ylabel: str) -> Figure:
    """One point per method and setting: what it saves (x) against what it costs or keeps (y);
    each method one colour, its settings joined by a line and labelled."""
    methods: list[str] = []
    for p in points:
        if p.method not in methods:
            methods.append(p.method)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for method, color in zip(methods, _colors(len(methods))):
        mine = sorted((p for p in points if p.method == method), key=lambda p: p.x)
        ax.plot([p.x for p in mine], [p.y for p in mine], marker="o", color=color, label=method,
                linestyle="-" if len(mine) > 1 else "none")
        if len(points) <= 40:
            for p in mine:
                ax.annotate(p.setting, (p.x, p.y), fontsize=6, xytext=(3, 3), textcoords="offset points", color=color)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return Figure(key, title, _png(fig))


def heatmap(h: Heatmap) -> Figure:
    data = np.array([[h.values.get((b, q)) if h.values.get((b, q)) is not None else np.nan for q in h.bits]
                     for b in h.blocks], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 * len(h.bits) + 2.6, 0.8 * len(h.blocks) + 1.8))
    masked = np.ma.masked_invalid(data)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")  # grey: a grid point without a value
    image = ax.imshow(masked, cmap=cmap, aspect="auto")
    finite = data[np.isfinite(data)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i, b in enumerate(h.blocks):
        for j, q in enumerate(h.bits):
            v = data[i, j]
            text = h.fmt.format(v) if np.isfinite(v) else ("n/a" if (b, q) in h.values else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=9,
                    color="black" if not np.isfinite(v) or v > middle else "white")
    ax.set_xticks(range(len(h.bits)), [f"Q={q}" for q in h.bits])
    ax.set_yticks(range(len(h.blocks)), [f"B={b}" for b in h.blocks])
    ax.set_xlabel("bits for the high-frequency residual (Q)")
    ax.set_ylabel("block size (B)")
    ax.set_title(h.title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return Figure(h.key, h.title, _png(fig))
