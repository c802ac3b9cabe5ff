"""The report's numbers: paper-shaped grids (methods x model/batch) built from store rows, and tables.

A ``Grid`` keeps raw values (for figures and CSV) and a ``Table`` keeps display strings (for Markdown,
HTML and the logger). Ratios are always against method ``none`` of the same column: the same model,
batch size, precision (and data set / device where those vary), as in the paper's "x" figures.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .summary import human_bytes

# The paper's order: the baseline first, then the memory-saving methods, DIVISION last; others after.
METHOD_ORDER = ("none", "checkpoint", "swap", "blpa", "acgc", "actnn", "division")
BASELINE = "none"

MEMORY_METRICS = (
    ("activation_bytes", "Activation memory",
     "allocated right before backward minus model, optimizer state, batch, runtime buffers and output"),
    ("total_bytes", "Total memory", "allocated right before backward (after forward and loss)"),
    ("peak_bytes", "Peak memory", "max_memory_allocated over the whole step"),
    ("ledger_bytes", "Activations kept for backward (exact byte ledger)", "counted tensor by tensor, any device"),
)


@dataclass
class Table:
    """A display table: ``key`` names its files (``<key>.csv``) and its logger entry."""
    key: str
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""

    def to_markdown(self) -> str:
        def esc(cell: Any) -> str:
            return str(cell).replace("|", "\\|").replace("\n", " ")
        lines = ["| " + " | ".join(esc(c) for c in self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows(self.rows)
        return out.getvalue()


@dataclass
class Cell:
    value: Optional[float]
    status: str = "ok"
    ratio: Optional[float] = None
    extra: Optional[float] = None  # a second number (best top-1 next to final top-1)
    seeds: int = 1                 # runs averaged into value (accuracy: one per seed)
    spread: Optional[float] = None  # their sample standard deviation, where seeds > 1


@dataclass
class Grid:
    """Methods (rows) x columns of raw values; ``cells[(row, col)]``."""
    key: str
    title: str
    row_labels: list[str]
    col_labels: list[str]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    unit: str = ""
    note: str = ""


# --- rows -------------------------------------------------------------------------------------------

def number(value: Any) -> Optional[float]:
    """A finite float, or None (missing, null, NaN, a non-numeric string)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _knob(value: Any) -> str:
    """8 and 8.0 both read "8" (some methods describe their bits as a float), 2.5 stays "2.5"."""
    v = number(value)
    if v is None:
        return str(value)
    return str(int(v)) if v.is_integer() else f"{v:.3g}"


def method_label(row: dict[str, Any]) -> str:
    """The method with its knobs, as the tables' row names: "division B8 Q2", "actnn Q2", "none"."""
    label = str(row.get("method"))
    if row.get("block_size") is not None:
        label += f" B{_knob(row['block_size'])}"
    if row.get("bits") is not None:
        label += f" Q{_knob(row['bits'])}"
    return label


def method_sort_key(row: dict[str, Any]) -> tuple:
    method = str(row.get("method"))
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return rank, method, number(row.get("block_size")) or 0, number(row.get("bits")) or 0


def label_order(label: str) -> tuple:
    method = label.split(" ")[0]
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)), label


def ordered_methods(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, tuple] = {}
    for row in rows:
        seen.setdefault(method_label(row), method_sort_key(row))
    return sorted(seen, key=seen.__getitem__)


# A comparison is made within one context (data set, precision, device, eager or CUDA-graph steps,
# eager or torch.compile'd): the paper compares methods on the same data, precision and GPU. Columns
# within it are model x batch size.
CONTEXT_FIELDS = ("dataset", "precision", "device")


def context_of(row: dict[str, Any]) -> tuple[str, ...]:
    context = tuple(str(row.get(f)) for f in CONTEXT_FIELDS)
    if row.get("cuda_graph"):
        context += ("cuda_graph",)
    if row.get("compile"):  # the torch.compile mode: compiled and eager runs never share a cell
        context += (f"compile-{row['compile']}",)
    return context


def contexts(rows: list[dict[str, Any]]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(key suffix, title suffix, rows) per context; empty suffixes when the selection has one context."""
    by_context: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        by_context.setdefault(context_of(row), []).append(row)
    if len(by_context) == 1:
        (context, members), = by_context.items()
        return [("", ", ".join(context), members)]
    return [("_" + "_".join(context), ", ".join(context), members) for context, members in sorted(by_context.items())]


def column_label(row: dict[str, Any]) -> str:
    return f"{row.get('model')} b{row.get('batch_size')}"


def column_sort_key(row: dict[str, Any]) -> tuple:
    return str(row.get("model")), number(row.get("batch_size")) or 0


def latest_per_key(rows: list[dict[str, Any]], key: Callable[[dict], Any]) -> dict[Any, dict[str, Any]]:
    """One run per key: the latest successful one, else the latest (a rerun replaces a failed attempt)."""
    chosen: dict[Any, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: str(r.get("started_at") or "")):
        k = key(row)
        old = chosen.get(k)
        if old is None or row.get("status") == "ok" or old.get("status") != "ok":
            chosen[k] = row
    return chosen


def method_grid(rows: list[dict[str, Any]], key: str, title: str, value: Callable[[dict], Optional[float]],
                ratio: Callable[[float, float], float]) -> Grid:
    """Methods x columns of ``value(row)``; ``ratio(value, baseline)`` against method none of the column."""
    runs = latest_per_key(rows, lambda r: (method_label(r), column_label(r)))
    cols = sorted({column_label(r): column_sort_key(r) for r in rows}.items(), key=lambda kv: kv[1])
    grid = Grid(key, title, ordered_methods(rows), [c for c, _ in cols])
    for (label, col), row in runs.items():
        grid.cells[(label, col)] = Cell(value(row) if row.get("status") == "ok" else None, str(row.get("status")))
    for (label, col), cell in grid.cells.items():
        base = grid.cells.get((BASELINE, col))
        if label != BASELINE and base and base.value and cell.value:
            cell.ratio = ratio(cell.value, base.value)
    return grid


# --- formatting -------------------------------------------------------------------------------------

_BYTE_UNITS = (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10))


def byte_unit(values: list[float]) -> tuple[str, float]:
    """The largest binary unit in which the biggest value is at least 1 (GiB for the paper's figures)."""
    top = max(values, default=0.0)
    for name, size in _BYTE_UNITS:
        if top >= size:
            return name, size
    return "KiB", 2 ** 10


def status_text(status: str) -> str:
    return {"oom": "OOM", "error": "error", "running": "running"}.get(status, "n/a")


def grid_table(grid: Grid, fmt: Callable[[Cell], str], corner: str = "method") -> Table:
    rows = []
    for label in grid.row_labels:
        row = [label]
        for col in grid.col_labels:
            cell = grid.cells.get((label, col))
            if cell is None:
                row.append("")
            elif cell.value is None:
                row.append(status_text(cell.status) if cell.status != "ok" else "n/a")
            else:
                row.append(fmt(cell))
        rows.append(row)
    title = f"{grid.title} ({grid.unit})" if grid.unit else grid.title
    return Table(grid.key, title, [corner] + grid.col_labels, rows, grid.note)


def grid_has_values(grid: Grid) -> bool:
    return any(c.value is not None for c in grid.cells.values())


# --- sections ---------------------------------------------------------------------------------------

def memory_grids(rows: list[dict[str, Any]]) -> list[Grid]:
    """Per context, one grid per memory figure the runs have (allocator figures are CUDA-only)."""
    grids = []
    for suffix, context, members in contexts([r for r in rows if r.get("mode") == "memory"]):
        candidates = []
        for field_name, title, how in MEMORY_METRICS:
            if field_name == "activation_bytes" and activation_is_ledger(members):
                continue  # on CPU the memory runner reports the ledger's count as activation: one table
            grid = method_grid(members, f"memory_{field_name.removesuffix('_bytes')}{suffix}", f"{title} - {context}",
                               lambda r, f=field_name: number(r.get(f)), memory_ratio)
            if field_name == "ledger_bytes":
                _ledger_fallback_ratios(grid, members)
            unit, size = byte_unit([c.value for c in grid.cells.values() if c.value is not None])
            for cell in grid.cells.values():
                cell.value = cell.value / size if cell.value is not None else None
            grid.unit = unit
            grid.note = f"{how}; x = reduction vs method none of the same column"
            if field_name == "ledger_bytes":
                grid.note += " (without a none run: the run's own plain / kept ratio)"
            candidates.append(grid)
        kept = [g for g in candidates if grid_has_values(g)]
        # Every run out of memory (or failed): still the paper's table, with OOM in its cells.
        grids += kept or candidates[:1]
    return grids


def memory_ratio(value: float, base: float):
    """How many times less than method none; none where the method keeps (almost) nothing on the
    device (swap offloads everything: a ratio of millions would say nothing)."""
    return base / value if value and value * 1000 >= base else None


def activation_is_ledger(rows: list[dict[str, Any]]) -> bool:
    """Whether ``activation_bytes`` is just the ledger's count: no allocator was read (CPU runs)."""
    measured = [r for r in rows if number(r.get("activation_bytes")) is not None]
    return bool(measured) and all(number(r.get("total_bytes")) is None and number(r.get("peak_bytes")) is None
                                  and r.get("activation_bytes") == r.get("ledger_bytes") for r in measured)


def _ledger_fallback_ratios(grid: Grid, rows: list[dict[str, Any]]) -> None:
    """Without a none run in a column, the ledger's own ratio (what plain autograd would keep / kept)."""
    runs = latest_per_key(rows, lambda r: (method_label(r), column_label(r)))
    for (label, col), row in runs.items():
        cell = grid.cells[(label, col)]
        if cell.ratio is None and label != BASELINE and (BASELINE, col) not in grid.cells:
            cell.ratio = number(row.get("ledger_ratio"))


def memory_table(grid: Grid) -> Table:
    return grid_table(grid, lambda c: f"{c.value:.2f}" + (f" ({c.ratio:.1f}x)" if c.ratio else ""))


def throughput_grids(rows: list[dict[str, Any]]) -> list[Grid]:
    grids = []
    for suffix, context, members in contexts([r for r in rows if r.get("mode") == "speed"]):
        grid = method_grid(members, f"throughput{suffix}", f"Throughput - {context}",
                           lambda r: number(r.get("images_per_sec")), lambda v, base: v / base)
        grid.unit = "images/s"
        grid.note = "from the median step time (warm-up excluded); x = speed relative to method none"
        torch_ops = sorted({method_label(r) for r in members if r.get("kernels") == "pytorch"}, key=label_order)
        if torch_ops and any(r.get("device") == "cuda" for r in members):
            grid.note += ("; codecs run as PyTorch ops, not fused kernels: " + ", ".join(torch_ops))
        grids.append(grid)
    return grids


def throughput_table(grid: Grid) -> Table:
    return grid_table(grid, lambda c: f"{c.value:.1f}" + (f" ({c.ratio:.2f}x)" if c.ratio else ""))


def setting_label(row: dict[str, Any]) -> str:
    return f"{row.get('model')} / {row.get('dataset')}"


def accuracy_setting(row: dict[str, Any]) -> str:
    """An accuracy column: a model / data set trained for one number of epochs (accuracy after 30
    epochs is not compared with accuracy after 55)."""
    epochs = number(row.get("epochs"))
    return setting_label(row) + (f", {epochs:.0f} epochs" if epochs is not None else "")


def accuracy_grid(rows: list[dict[str, Any]]) -> Optional[Grid]:
    """Methods x settings of final top-1, averaged over seeds (the latest run of each seed)."""
    rows = [r for r in rows if r.get("mode") == "train"]
    if not rows:
        return None
    runs = latest_per_key(rows, lambda r: (method_label(r), accuracy_setting(r), r.get("seed")))
    seeds: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for (label, col, _), row in runs.items():
        seeds.setdefault((label, col), []).append(row)
    settings = sorted({accuracy_setting(r) for r in rows})
    grid = Grid("accuracy", "Top-1 accuracy, final / best", ordered_methods(rows), settings, unit="%")
    for key, members in seeds.items():
        ok = [r for r in members if r.get("status") == "ok" and number(r.get("final_val_top1")) is not None]
        if not ok:
            latest = max(members, key=lambda r: str(r.get("started_at") or ""))
            grid.cells[key] = Cell(None, str(latest.get("status")))
            continue
        finals = [number(r.get("final_val_top1")) for r in ok]
        bests = [b for b in (number(r.get("best_val_top1")) for r in ok) if b is not None]
        grid.cells[key] = Cell(statistics.fmean(finals), "ok",
                               extra=statistics.fmean(bests) if bests else None, seeds=len(finals),
                               spread=statistics.stdev(finals) if len(finals) > 1 else None)
    for (label, col), cell in grid.cells.items():
        base = grid.cells.get((BASELINE, col))
        if label != BASELINE and base and base.value is not None and cell.value is not None:
            cell.ratio = cell.value - base.value  # for accuracy, a difference in points reads better
    grid.note = ("validation top-1 after the last epoch / best epoch, the mean over seeds (with their "
                 "standard deviation and count where there are several); (+/-) = final vs method none, in points")
    return grid


def accuracy_table(grid: Grid) -> Table:
    def fmt(c: Cell) -> str:
        text = f"{c.value:.2f}" + (f" ±{c.spread:.2f}" if c.spread is not None else "")
        text += f" / {c.extra:.2f}" if c.extra is not None else ""
        text += f" ({c.ratio:+.2f})" if c.ratio is not None else ""
        return text + (f", {c.seeds} seeds" if c.seeds > 1 else "")
    return grid_table(grid, fmt)


def training_details(rows: list[dict[str, Any]]) -> Optional[Table]:
    rows = sorted((r for r in rows if r.get("mode") == "train"), key=lambda r: (setting_label(r), method_sort_key(r)))
    if not rows:
        return None
    out = []
    for r in rows:
        out.append([setting_label(r), method_label(r), _fmt(r.get("epochs"), "{:.0f}"),
                    _fmt(r.get("final_val_top1"), "{:.2f}"), _fmt(r.get("best_val_top1"), "{:.2f}"),
                    _fmt(r.get("final_train_loss"), "{:.4f}"), _fmt(r.get("images_per_sec_train"), "{:.1f}"),
                    _fmt(r.get("ledger_ratio"), "{:.1f}x"), str(r.get("status")), str(r.get("run_id"))])
    return Table("training", "Training runs",
                 ["setting", "method", "epochs", "final top-1", "best top-1", "final train loss",
                  "train images/s", "activation compression", "status", "run"], out)


def history(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-epoch history of a train row (a JSON string in the store, a list in results.json)."""
    value = row.get("history")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    return [h for h in value if isinstance(h, dict)] if isinstance(value, list) else []


# --- B x Q sweeps -----------------------------------------------------------------------------------

@dataclass
class Heatmap:
    key: str
    title: str
    blocks: list[int]
    bits: list[int]
    values: dict[tuple[int, int], Optional[float]]
    fmt: str


_SWEEP_METRICS = {
    "memory": (("ledger_ratio", "activation compression (ledger), x", "{:.1f}"),
               ("activation_ratio", "activation compression vs none, x", "{:.1f}"),
               ("peak_bytes", "peak memory, MiB", "{:.0f}")),
    "speed": (("images_per_sec", "throughput, images/s", "{:.0f}"),),
    "train": (("final_val_top1", "final val top-1, %", "{:.2f}"),
              ("best_val_top1", "best val top-1, %", "{:.2f}"),
              ("ledger_ratio", "activation compression (ledger), x", "{:.1f}")),
}


def sweep_heatmaps(rows: list[dict[str, Any]]) -> list[Heatmap]:
    """B x Q grids for DIVISION runs that differ in block size or bits, per mode and setting."""
    division = [r for r in rows if r.get("method") == "division" and r.get("block_size") is not None
                and r.get("bits") is not None]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in division:
        key = (r.get("mode"), r.get("model"), r.get("dataset"), r.get("batch_size"), r.get("precision"),
               r.get("device"))
        groups.setdefault(key, []).append(r)
    heatmaps = []
    for (mode, model, dataset, batch, precision, device), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        blocks = sorted({int(r["block_size"]) for r in members})
        bits = sorted({int(r["bits"]) for r in members})
        if len(blocks) < 2 and len(bits) < 2:
            continue
        runs = latest_per_key(members, lambda r: (int(r["block_size"]), int(r["bits"])))
        baseline = _baseline_activation(rows, mode, model, dataset, batch, precision, device)
        shown: list[dict] = []
        for metric, title, fmt in _SWEEP_METRICS.get(mode, ()):
            if metric == "activation_ratio" and activation_is_ledger(members):
                continue  # the ledger heatmap already shows it
            values = {k: _sweep_value(r, metric, baseline) for k, r in runs.items()}
            if all(v is None for v in values.values()) or values in shown:
                continue  # nothing to show, or the same grid again (best = final after one epoch)
            shown.append(values)
            setting = f"{model} / {dataset} b{batch} {precision} {device}"
            slug = "_".join(str(x) for x in (mode, model, dataset, batch, precision, device, metric.split("_")[0]))
            heatmaps.append(Heatmap(f"sweep_{slug}", f"{mode}: {title} - {setting}", blocks, bits, values, fmt))
    return heatmaps


def _baseline_activation(rows, mode, model, dataset, batch, precision, device) -> Optional[float]:
    for r in reversed(rows):
        if (r.get("method") == BASELINE and r.get("status") == "ok" and
                (r.get("mode"), r.get("model"), r.get("dataset"), r.get("batch_size"), r.get("precision"),
                 r.get("device")) == (mode, model, dataset, batch, precision, device)):
            return number(r.get("activation_bytes"))
    return None


def _sweep_value(row: dict[str, Any], metric: str, baseline: Optional[float]) -> Optional[float]:
    if row.get("status") != "ok":
        return None
    if metric == "activation_ratio":
        act = number(row.get("activation_bytes"))
        return baseline / act if baseline and act else None
    value = number(row.get(metric))
    if metric.endswith("_bytes") and value is not None:
        value /= 2 ** 20
    return value


def heatmap_table(h: Heatmap) -> Table:
    rows = [[f"B={b}"] + [h.fmt.format(h.values[(b, q)]) if h.values.get((b, q)) is not None
                          else ("" if (b, q) not in h.values else "n/a") for q in h.bits] for b in h.blocks]
    return Table(h.key, h.title, ["block size \\ bits"] + [f"Q={q}" for q in h.bits], rows)


# --- the runs themselves ----------------------------------------------------------------------------

def _fmt(value: Any, pattern: str) -> str:
    v = number(value)
    return pattern.format(v) if v is not None else ""


def headline(row: dict[str, Any]) -> str:
    """The one figure that says most about a run, whatever its mode."""
    if row.get("status") == "oom":
        return "OOM"
    mode = row.get("mode")
    if mode == "memory":
        activation = number(row.get("activation_bytes"))
        if activation is not None and not activation_is_ledger([row]):
            return f"activation {human_bytes(activation)}"
        if number(row.get("ledger_bytes")) is not None:
            return f"kept for backward {human_bytes(number(row['ledger_bytes']))}"
    if mode == "speed" and number(row.get("images_per_sec")) is not None:
        return f"{number(row['images_per_sec']):.1f} images/s"
    if mode == "train" and number(row.get("final_val_top1")) is not None:
        return f"val top-1 {number(row['final_val_top1']):.2f}%"
    return ""


def runs_table(rows: list[dict[str, Any]]) -> Table:
    ordered = sorted(rows, key=lambda r: (str(r.get("mode")), str(r.get("model")), number(r.get("batch_size")) or 0,
                                          method_sort_key(r), str(r.get("started_at") or "")))
    out = [[str(r.get("run_id")), str(r.get("mode")), str(r.get("model")), str(r.get("dataset")), str(r.get("method")),
            _fmt(r.get("block_size"), "{:.0f}"), _fmt(r.get("bits"), "{:.0f}"), _fmt(r.get("batch_size"), "{:.0f}"),
            str(r.get("precision")), str(r.get("device")), str(r.get("status")), headline(r),
            _fmt(r.get("duration_s"), "{:.1f}"), str(r.get("group") or "")] for r in ordered]
    return Table("runs", "Runs included",
                 ["run", "mode", "model", "dataset", "method", "B", "Q", "batch", "precision", "device", "status",
                  "result", "seconds", "group"], out)


# --- trade-offs -------------------------------------------------------------------------------------

@dataclass
class TradeoffPoint:
    method: str
    setting: str
    x: float
    y: float


def _memory_reductions(rows: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """(method, model/batch column) -> how many times less than method none the method keeps: the first
    figure of its memory table (activation memory on CUDA, else the exact ledger), 1 for none."""
    out: dict[tuple[str, str], float] = {}
    charted: set[str] = set()
    for grid in (g for g in memory_grids(rows) if grid_has_values(g)):
        context = grid.title.rsplit(" - ", 1)[-1]
        if context in charted:
            continue
        charted.add(context)
        for (label, col), cell in grid.cells.items():
            if label == BASELINE and cell.value is not None:
                out.setdefault((label, col), 1.0)
            elif cell.ratio is not None:
                out.setdefault((label, col), cell.ratio)
    return out


def speed_tradeoffs(rows: list[dict[str, Any]]) -> list[tuple[str, list[TradeoffPoint]]]:
    """Per throughput context: (title, points of memory reduction x relative speed), one point per
    method and model / batch that has both a memory run and a speed run (and a none run for the ratios)."""
    memory = _memory_reductions(rows)
    out = []
    for grid in throughput_grids(rows):
        points = []
        for (label, col), cell in grid.cells.items():
            speed = 1.0 if label == BASELINE and cell.value is not None else cell.ratio
            if speed is not None and (label, col) in memory:
                points.append(TradeoffPoint(label, col, memory[(label, col)], speed))
        if len({p.method for p in points}) >= 2:
            out.append((grid.title.replace("Throughput", "Memory against throughput"), points))
    return out


def accuracy_tradeoff(rows: list[dict[str, Any]]) -> list[TradeoffPoint]:
    """Per method and setting: the exact ledger's activation compression against final top-1 (the mean
    over seeds), from training runs that recorded both."""
    grid = accuracy_grid(rows)
    if grid is None:
        return []
    ratios: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r.get("mode") == "train" and r.get("status") == "ok" and number(r.get("ledger_ratio")) is not None:
            ratios.setdefault((method_label(r), accuracy_setting(r)), []).append(number(r["ledger_ratio"]))
    return [TradeoffPoint(label, col, statistics.fmean(ratios[(label, col)]), cell.value)
            for (label, col), cell in grid.cells.items() if cell.value is not None and (label, col) in ratios]
