"""The report's numbers: paper-shaped grids (methods x model/batch) built from store rows, and tables.

The grouping, pivoting and averaging run as DuckDB SQL over the selected runs (report_query.RunsDB);
what is written here by hand are the paper's rules: ratios against method none, OOM cells, units and
how a cell reads. Functions take a RunsDB (one connection for a whole report) or the runs themselves
(an Arrow table of the store's schema, or records).

A ``Grid`` keeps raw values (for figures and CSV) and a ``Table`` keeps display strings (for Markdown,
HTML and the logger). Ratios are always against method ``none`` of the same column: the same model,
batch size, precision (and data set / device where those vary), as in the paper's "x" figures.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from division.methods import DEFAULT_ATTENTION_BITS, DEFAULT_PROBABILITY_BITS

from .report_query import LATEST, METHOD_ORDER, UNKNOWN_VERSION, RunsDB, runs_db
from .summary import human_bytes

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
    fallback: Optional[float] = None  # the run's own ledger ratio, for a column without a none run
    capped: bool = False           # a lower bound: the largest-batch search stopped at its limit


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
    """The method with its knobs, as the tables' row names: "division B8 Q2", "actnn Q2", "none",
    "division B8 Q2 rebuild" (``method.rebuild_conv_input``), "... recompute"
    (``method.recompute_norm_input``), "... fused-norm" (``method.fused_norm``), "... A4" / "... P8" (``method.attention_bits`` /
    ``method.probability_bits`` other than their defaults) (the same label report_query's
    ``_label`` gives in SQL, for code that holds one row)."""
    label = str(row.get("method"))
    if row.get("block_size") is not None:
        label += f" B{_knob(row['block_size'])}"
    if row.get("bits") is not None:
        label += f" Q{_knob(row['bits'])}"
    if row.get("rebuild_conv_input"):
        label += " rebuild"
    if row.get("recompute_norm_input"):
        label += " recompute"
    if row.get("fused_norm"):
        label += " fused-norm"
    for key, letter, default in (("attention_bits", "A", DEFAULT_ATTENTION_BITS),
                                 ("probability_bits", "P", DEFAULT_PROBABILITY_BITS)):
        if row.get(key) is not None and number(row[key]) != default:
            label += f" {letter}{_knob(row[key])}"
    return label


def method_sort_key(row: dict[str, Any]) -> tuple:
    method = str(row.get("method"))
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, method, number(row.get("block_size")) or 0, number(row.get("bits")) or 0,
            bool(row.get("rebuild_conv_input")), bool(row.get("recompute_norm_input")), bool(row.get("fused_norm")),
            _bits_or(row.get("attention_bits"), DEFAULT_ATTENTION_BITS),
            _bits_or(row.get("probability_bits"), DEFAULT_PROBABILITY_BITS))


def _bits_or(value, default: int) -> float:
    """A bits knob for sorting: its value (0 = exact), else the default it had."""
    v = number(value)
    return default if v is None else v


def label_order(label: str) -> tuple:
    method = label.split(" ")[0]
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)), label


def column_label(row: dict[str, Any]) -> str:
    return f"{row.get('model')} b{row.get('batch_size')}"


# A comparison is made within one context (data set, precision, device, eager or CUDA-graph steps,
# eager or torch.compile'd, one code version): the paper compares methods on the same data, precision
# and GPU, and a table never mixes two releases. Columns within it are model x batch size.
def contexts(db: RunsDB, mode: str) -> list[tuple[str, str, str]]:
    """(key suffix, title suffix, SQL condition selecting its runs) per context of ``mode``'s runs;
    an empty key suffix when they have one context."""
    found = db.values("SELECT DISTINCT _ctx FROM r WHERE mode = ? ORDER BY _ctx", [mode])
    # A key names a table's files and a docs/results.md block: the code version joins it only where
    # versions differ, so a table keeps its key from one release to the next.
    versions = {c[-1] if c[-1].startswith("code ") else None for c in found}
    one_version = len(versions) == 1 and None not in versions
    out = []
    for context in found:
        condition = f"mode = '{mode}' AND _ctx = {_sql_list(context)}"
        named = context[:-1] if one_version else context
        suffix = re.sub(r"[^\w.-]", "_", "_" + "_".join(named))  # a file name: no spaces or slashes
        out.append((suffix if len(found) > 1 else "", ", ".join(context), condition))
    return out


def _sql_list(values: list[str]) -> str:
    """A list of strings as an SQL literal (quotes doubled): contexts come from the store's values."""
    return "[" + ", ".join("'" + str(v).replace("'", "''") + "'" for v in values) + "]::VARCHAR[]"


def ordered_labels(db: RunsDB, condition: str) -> list[str]:
    """The rows of a table: method labels in the paper's order (then by name, block size, bits)."""
    return db.values(f"SELECT _label FROM r WHERE {condition} GROUP BY _label "
                     "ORDER BY min(_label_rank[1]), min(txt(method)), min(_label_rank[2]), min(_label_rank[3]), "
                     "min(_label_rank[4]), min(_order)")


def ordered_columns(db: RunsDB, condition: str) -> list[str]:
    """The columns of a memory / throughput table: model, then batch size."""
    return db.values(f"SELECT _col FROM r WHERE {condition} GROUP BY _col "
                     "ORDER BY min(txt(model)), min(coalesce(num(batch_size), 0)), min(_order)")


def latest_runs(db: RunsDB, condition: str, partition: str, columns: str) -> list[dict[str, Any]]:
    """One run per ``partition`` (an SQL expression list) among the runs passing ``condition``: the
    latest successful one, else the latest (a rerun replaces a failed attempt)."""
    return db.rows(f"SELECT {columns} FROM (SELECT *, row_number() OVER (PARTITION BY {partition} "
                   f"ORDER BY {LATEST}) AS _n FROM r WHERE {condition}) WHERE _n = 1 ORDER BY _order")


def method_grid(db: RunsDB, condition: str, key: str, title: str, value: str,
                ratio: Callable[[float, float], Optional[float]]) -> Grid:
    """Methods x columns of the SQL expression ``value`` over the runs passing ``condition``;
    ``ratio(value, baseline)`` against method none of the column."""
    grid = Grid(key, title, ordered_labels(db, condition), ordered_columns(db, condition))
    for run in latest_runs(db, condition, "_label, _col", f"_label, _col, txt(status) AS status, num({value}) AS v, "
                                                          "num(ledger_ratio) AS ledger_ratio"):
        ok = run["status"] == "ok"
        grid.cells[(run["_label"], run["_col"])] = Cell(run["v"] if ok else None, run["status"],
                                                        fallback=run["ledger_ratio"])
    add_ratios(grid, ratio)
    return grid


def operator_tables(rows: "RunsDB | list[dict[str, Any]]") -> list[Table]:
    """Activation memory by operator, from the ledger (``ledger_by_op``): for each memory run of a
    compressing method, what each operator type's saves take under plain autograd and as kept,
    largest first, then the run's total; "kept raw" is the part of the plain bytes stored as they
    were (uncompressed). One table per context, keyed like the memory tables."""
    db = runs_db(rows)
    tables = []
    for suffix, context, condition in contexts(db, "memory"):
        runs = latest_runs(db, f"{condition} AND txt(method) <> 'none' AND ledger_by_op IS NOT NULL",
                           "_label, _col", "_label, _col, txt(status) AS status, txt(ledger_by_op) AS by_op")
        out = []
        for run in sorted(runs, key=lambda r: (r["_col"], label_order(r["_label"]))):
            ops = json.loads(run["by_op"]) if run["status"] == "ok" and run["by_op"] not in ("None", "") else {}
            if not ops:
                continue
            entries = sorted(ops.items(), key=lambda kv: (-kv[1].get("plain_bytes", 0), kv[0]))
            total = {k: sum(v.get(k, 0) for _, v in entries) for k in ("plain_bytes", "stored_bytes", "raw_plain_bytes")}
            for op, v in entries + [("all", total)]:
                plain, kept, raw = v.get("plain_bytes", 0), v.get("stored_bytes", 0), v.get("raw_plain_bytes", 0)
                out.append([run["_col"], run["_label"], op, f"{plain / 2 ** 20:.1f}", f"{kept / 2 ** 20:.1f}",
                            f"{plain / kept:.1f}x" if kept else ("-" if not plain else "inf"),
                            f"{100 * raw / plain:.1f}%" if plain else "-"])
        if out:
            tables.append(Table(f"memory_by_op{suffix}", f"Activation memory by operator - {context}",
                                ["model", "method", "operator", "plain MiB", "kept MiB", "reduction", "kept raw"],
                                out, "the ledger's bytes per operator type that saved them: plain = what plain "
                                "autograd keeps, kept = what the method stores; kept raw = share of the plain "
                                "bytes stored uncompressed"))
    return tables


def add_ratios(grid: Grid, ratio: Callable[[float, float], Optional[float]]) -> None:
    """The paper's "x": each cell against method none of its column (none where either is missing)."""
    for (label, col), cell in grid.cells.items():
        base = grid.cells.get((BASELINE, col))
        if label != BASELINE and base and base.value and cell.value:
            cell.ratio = ratio(cell.value, base.value)


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

def memory_grids(rows: "RunsDB | list[dict[str, Any]]") -> list[Grid]:
    """Per context, one grid per memory figure the runs have (allocator figures are CUDA-only)."""
    db = runs_db(rows)
    grids = []
    for suffix, context, condition in contexts(db, "memory"):
        candidates = []
        for field_name, title, how in MEMORY_METRICS:
            if field_name == "activation_bytes" and activation_is_ledger(db, condition):
                continue  # on CPU the memory runner reports the ledger's count as activation: one table
            grid = method_grid(db, condition, f"memory_{field_name.removesuffix('_bytes')}{suffix}",
                               f"{title} - {context}", field_name, memory_ratio)
            if field_name == "ledger_bytes":
                _ledger_fallback_ratios(grid)
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


def activation_is_ledger(db: RunsDB, condition: str, params: Sequence[Any] = ()) -> bool:
    """Whether ``activation_bytes`` is just the ledger's count: no allocator was read (CPU runs)."""
    answer, = db.values(f"SELECT count(*) > 0 AND bool_and(total_bytes IS NULL AND peak_bytes IS NULL "
                        f"AND activation_bytes IS NOT DISTINCT FROM ledger_bytes) "
                        f"FROM r WHERE ({condition}) AND activation_bytes IS NOT NULL", params)
    return bool(answer)


def _ledger_fallback_ratios(grid: Grid) -> None:
    """Without a none run in a column, the ledger's own ratio (what plain autograd would keep / kept)."""
    for (label, col), cell in grid.cells.items():
        if cell.ratio is None and label != BASELINE and (BASELINE, col) not in grid.cells:
            cell.ratio = cell.fallback


def memory_table(grid: Grid) -> Table:
    return grid_table(grid, lambda c: _amount(c.value) + (f" ({c.ratio:.1f}x)" if c.ratio else ""))


def _amount(value: float) -> str:
    """Two decimals, as the paper writes GiB; a value under 0.1 of the table's unit (a small model
    beside a large one) keeps two significant digits instead of reading 0.01."""
    return f"{value:.2f}" if value >= 0.1 or value == 0 else f"{value:.2g}"


def max_batch_grids(rows: "RunsDB | list[dict[str, Any]]") -> list[Grid]:
    """Per context, the largest batch that trains (``memory.find_max_batch``): methods x model, with
    how many times method none's batch it is. A search that reached ``memory.max_batch_limit`` without
    running out of memory gives a lower bound (">="); against such a none there is no ratio."""
    db = runs_db(rows)
    grids = []
    for suffix, context, condition in contexts(db, "memory"):
        searched = f"({condition}) AND max_batch IS NOT NULL AND status = 'ok'"
        runs = latest_runs(db, searched, "_label, txt(model)", "_label, txt(model) AS model, "
                           "num(max_batch) AS v, coalesce(max_batch_capped, false) AS capped")
        if not runs:
            continue
        models = db.values(f"SELECT DISTINCT txt(model) FROM r WHERE {searched} ORDER BY 1")
        grid = Grid(f"max_batch{suffix}", f"Largest batch that trains - {context}", ordered_labels(db, searched),
                    models, unit="images")
        for run in runs:
            grid.cells[(run["_label"], run["model"])] = Cell(run["v"], capped=bool(run["capped"]))
        add_ratios(grid, lambda v, base: v / base)
        for (label, col), cell in grid.cells.items():
            if grid.cells.get((BASELINE, col), cell).capped and label != BASELINE:
                cell.ratio = None  # none's own batch is only a lower bound
        grid.note = ("memory.find_max_batch: doubling from batch_size, then bisecting, to the largest batch whose "
                     "training steps fit; >= : the search reached memory.max_batch_limit without running out of "
                     "memory; x = times method none's largest batch")
        grids.append(grid)
    return grids


def max_batch_table(grid: Grid) -> Table:
    at_least = lambda c: ">= " if c.capped else ""  # noqa: E731
    return grid_table(grid, lambda c: f"{at_least(c)}{c.value:.0f}"
                      + (f" ({at_least(c)}{c.ratio:.1f}x)" if c.ratio else ""))


def throughput_grids(rows: "RunsDB | list[dict[str, Any]]") -> list[Grid]:
    db = runs_db(rows)
    grids = []
    for suffix, context, condition in contexts(db, "speed"):
        grid = method_grid(db, condition, f"throughput{suffix}", f"Throughput - {context}", "images_per_sec",
                           lambda v, base: v / base)
        grid.unit = "images/s"
        grid.note = "from the median step time (warm-up excluded); x = speed relative to method none"
        torch_ops = db.values(f"SELECT DISTINCT _label FROM r WHERE ({condition}) AND kernels = 'pytorch' "
                              f"AND (SELECT bool_or(device = 'cuda') FROM r WHERE {condition})")
        if torch_ops:
            grid.note += ("; codecs run as PyTorch ops, not fused kernels: " + ", ".join(sorted(torch_ops, key=label_order)))
        grids.append(grid)
    return grids


def throughput_table(grid: Grid) -> Table:
    return grid_table(grid, lambda c: f"{c.value:.1f}" + (f" ({c.ratio:.2f}x)" if c.ratio else ""))


def setting_label(row: dict[str, Any]) -> str:
    """Model / data set, with how the run trained where it was not one eager process (as report_query's
    ``_setting``, which adds the epochs): "resnet18 / cifar10, 2 processes, CUDA graph"."""
    label = f"{row.get('model')} / {row.get('dataset')}"
    if (number(row.get("world_size")) or 1) > 1:
        label += f", {row['world_size']} processes"
    if row.get("cuda_graph"):
        label += ", CUDA graph"
    if row.get("compile"):
        label += f", compile-{row['compile']}"
    return label


def code_versions(db: RunsDB, mode: str) -> list[str]:
    return db.values("SELECT DISTINCT _version FROM r WHERE mode = ? ORDER BY _version", [mode])


def accuracy_grids(rows: "RunsDB | list[dict[str, Any]]") -> list[Grid]:
    """Per code version, methods x settings (model / data set, trained for one number of epochs: 30
    epochs are not compared with 55) of final top-1, averaged over seeds (the latest run of each seed).
    Accuracy of two code versions is never averaged into one cell nor put in one table."""
    db = runs_db(rows)
    versions = code_versions(db, "train")
    grids = []
    for version in versions:
        condition = "mode = 'train' AND _version = ?"
        latest = (f"SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY _label, _setting, seed "
                  f"ORDER BY {LATEST}) AS _n FROM r WHERE {condition}) WHERE _n = 1")
        ok = "status = 'ok' AND num(final_val_top1) IS NOT NULL"
        cells = db.rows(f"""SELECT _label, _setting, count(*) FILTER ({ok}) AS seeds,
                avg(num(final_val_top1)) FILTER ({ok}) AS mean, stddev_samp(num(final_val_top1)) FILTER ({ok}) AS spread,
                avg(num(best_val_top1)) FILTER ({ok}) AS best, arg_max(txt(status), (coalesce(started_at, ''), _order)) AS latest
            FROM ({latest}) GROUP BY _label, _setting ORDER BY min(_order)""", [version])
        key, title = "accuracy", "Top-1 accuracy, final / best"
        if len(versions) > 1:
            key += "_" + "".join(c if c.isalnum() or c in "-." else "_" for c in version)
        if len(versions) > 1 or version != UNKNOWN_VERSION:
            title += f" - code {version}"
        settings = db.values(f"SELECT DISTINCT _setting FROM r WHERE {condition} ORDER BY _setting", [version])
        labels = db.values(f"SELECT _label FROM r WHERE {condition} GROUP BY _label ORDER BY min(_label_rank[1]), "
                           "min(txt(method)), min(_label_rank[2]), min(_label_rank[3]), min(_label_rank[4]), "
                           "min(_order)", [version])
        grid = Grid(key, title, labels, settings, unit="%")
        for c in cells:
            grid.cells[(c["_label"], c["_setting"])] = (
                Cell(c["mean"], "ok", extra=c["best"], seeds=c["seeds"], spread=c["spread"]) if c["seeds"]
                else Cell(None, c["latest"]))
        for (label, col), cell in grid.cells.items():
            base = grid.cells.get((BASELINE, col))
            if label != BASELINE and base and base.value is not None and cell.value is not None:
                cell.ratio = cell.value - base.value  # for accuracy, a difference in points reads better
        grid.note = ("validation top-1 after the last epoch / best epoch, the mean over seeds (with their "
                     "standard deviation and count where there are several); (+/-) = final vs method none, in points")
        grids.append(grid)
    return grids


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
                    _fmt(r.get("ledger_ratio"), "{:.1f}x"), str(r.get("status")), str(r.get("run_id")),
                    str(r.get("code_version") or "")])
    return Table("training", "Training runs",
                 ["setting", "method", "epochs", "final top-1", "best top-1", "final train loss",
                  "train images/s", "activation compression", "status", "run", "code"], out)


def fidelity_table(rows: "RunsDB | list[dict[str, Any]]") -> Optional[Table]:
    """Gradient fidelity (scripts/gradient_fidelity.py): a method's parameter gradients against exact
    backward on one batch of real images, per model, bit width and decode (one run each)."""
    db = runs_db(rows)
    runs = latest_runs(db, "mode = 'fidelity'", "_version, model, dataset, batch_size, _label, relu_zeros, seed",
                       "model, batch_size, _label, relu_zeros, txt(status) AS status, num(grad_cosine) AS cosine, "
                       "num(grad_rel_error) AS rel_error, num(grad_worst_cosine) AS worst, _version, "
                       "_label_rank, method, num(ledger_ratio) AS ledger_ratio")
    if not runs:
        return None
    runs.sort(key=lambda r: (str(r["model"]), r["batch_size"] or 0, r["_label_rank"][0], str(r["method"]),
                             r["_label_rank"][1], r["_label_rank"][2], r["_label_rank"][3], not r["relu_zeros"],
                             r["_version"]))
    decode = {True: "mask zeros (default)", False: "paper's", None: ""}
    # the ledger's ratio for the step, where the records keep it (earlier ones did not)
    ledger = any(r["ledger_ratio"] is not None for r in runs)
    out = [[str(r["model"]), _fmt(r["batch_size"], "{:.0f}"), r["_label"], decode[r["relu_zeros"]],
            _fmt(r["cosine"], "{:.5f}"), _fmt(r["rel_error"], "{:.4f}"), _fmt(r["worst"], "{:.4f}")]
           + ([_fmt(r["ledger_ratio"], "{:.1f}x")] if ledger else [])
           if r["status"] == "ok" else [str(r["model"]), _fmt(r["batch_size"], "{:.0f}"), r["_label"],
                                        decode[r["relu_zeros"]], status_text(r["status"]), "", ""]
           + ([""] if ledger else [])
           for r in runs]
    versions = sorted({r["_version"] for r in runs})
    return Table("fidelity", "Gradient fidelity against exact backward" + f" - code {', '.join(versions)}",
                 ["model", "images", "method", "ReLU outputs decode with", "overall cosine",
                  "overall relative error", "worst layer cosine"]
                 + (["activation compression (ledger)"] if ledger else []), out,
                 "cosine similarity and relative error (norm of the difference / norm of the exact gradient) of all "
                 "parameter gradients together against exact backward, same initial weights and batch; worst layer: "
                 "the least similar parameter" + ("; activation compression: plain autograd's bytes over the "
                                                  "method's for the same step, by the ledger" if ledger else ""))


def kernels_tables(rows: "RunsDB | list[dict[str, Any]]") -> list[Table]:
    """The codec's bandwidth (``python -m division.bench`` through scripts/bench_records.py), one table
    per device and code version: per activation, compress and decompress GB/s, both together as a
    fraction of the device's copy bandwidth, and the PyTorch reference's time over the kernels'."""
    db = runs_db(rows)
    keyed = db.values("SELECT DISTINCT [txt(device_name), _version] FROM r WHERE mode = 'bench' ORDER BY 1")
    tables = []
    for device_name, version in keyed:
        quoted = ["'" + str(v).replace("'", "''") + "'" for v in (device_name, version)]  # values of the store
        runs = latest_runs(db, f"mode = 'bench' AND txt(device_name) = {quoted[0]} AND _version = {quoted[1]}",
                           "activation, precision, _label",
                           "txt(activation) AS activation, txt(precision) AS precision, _label, "
                           "num(compress_gbps) AS c, num(decompress_gbps) AS d, num(copy_gbps) AS copy, "
                           "num(combined_of_copy) AS comb, num(reference_speedup) AS ref, num(batch_size) AS n")
        runs.sort(key=lambda r: (r["_label"], -(r["n"] or 0), r["activation"], r["precision"]))
        copies = sorted({round(r["copy"]) for r in runs if r["copy"]})
        out = [[r["activation"], r["precision"], r["_label"], _fmt(r["c"], "{:.0f}"), _fmt(r["d"], "{:.0f}"),
                _fmt(r["comb"], "{:.0%}"), _fmt(r["ref"], "{:.1f}x")] for r in runs]
        key = "kernels" if len(keyed) == 1 else "kernels_" + re.sub(r"[^\w.-]", "_", f"{device_name}_{version}")
        tables.append(Table(key, f"Codec bandwidth - {device_name}, code {version}",
                            ["activation", "dtype", "codec", "compress GB/s", "decompress GB/s",
                             "combined, of copy", "vs PyTorch reference"], out,
                            "fused kernels; compress reads x and writes the stored tensors, decompress the reverse; "
                            "combined: both byte counts over both times, as a fraction of the device's copy bandwidth "
                            f"({', '.join(str(c) for c in copies) or 'n/a'} GB/s, read + write); vs PyTorch "
                            "reference: its compress + decompress time over the kernels'"))
    return tables


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


_SETTING = "mode, model, dataset, batch_size, precision, device, _version"


def sweep_heatmaps(rows: "RunsDB | list[dict[str, Any]]") -> list[Heatmap]:
    """B x Q grids for DIVISION runs that differ in block size or bits, per mode, setting and code version."""
    db = runs_db(rows)
    division = "method = 'division' AND block_size IS NOT NULL AND bits IS NOT NULL"
    settings = db.rows(f"""SELECT {_SETTING}, list(DISTINCT block_size ORDER BY block_size) AS blocks,
            list(DISTINCT trunc(bits)::BIGINT ORDER BY trunc(bits)::BIGINT) AS bits
        FROM r WHERE {division} GROUP BY ALL HAVING count(DISTINCT block_size) > 1 OR count(DISTINCT trunc(bits)) > 1""")
    several_versions = len({s["_version"] for s in settings}) > 1
    # the activation of method none in the same setting: the last successful run's
    baselines = {tuple(b[f] for f in _SETTING.split(", ")): b["activation"] for b in db.rows(
        f"SELECT {_SETTING}, arg_max(num(activation_bytes), _order) AS activation FROM r "
        f"WHERE method = '{BASELINE}' AND status = 'ok' GROUP BY ALL")}
    heatmaps = []
    for s in sorted(settings, key=lambda s: str(tuple(s[f] for f in _SETTING.split(", ")))):
        key = tuple(s[f] for f in _SETTING.split(", "))
        mode, model, dataset, batch, precision, device, version = key
        same = " AND ".join(f"{f} IS NOT DISTINCT FROM ?" for f in _SETTING.split(", "))
        runs = {(r["block_size"], r["q"]): r for r in db.rows(
            f"SELECT block_size, trunc(bits)::BIGINT AS q, status, num(ledger_ratio) AS ledger_ratio, "
            f"num(activation_bytes) AS activation_bytes, num(peak_bytes) AS peak_bytes, "
            f"num(images_per_sec) AS images_per_sec, num(final_val_top1) AS final_val_top1, "
            f"num(best_val_top1) AS best_val_top1 FROM (SELECT *, row_number() OVER (PARTITION BY block_size, "
            f"trunc(bits) ORDER BY {LATEST}) AS _n FROM r WHERE {division} AND {same}) WHERE _n = 1 ORDER BY _order",
            list(key))}
        baseline = baselines.get(key)
        shown: list[dict] = []
        for metric, title, fmt in _SWEEP_METRICS.get(mode, ()):
            if metric == "activation_ratio" and activation_is_ledger(db, f"{division} AND {same}", key):
                continue  # the ledger heatmap already shows it
            values = {k: _sweep_value(r, metric, baseline) for k, r in runs.items()}
            if all(v is None for v in values.values()) or values in shown:
                continue  # nothing to show, or the same grid again (best = final after one epoch)
            shown.append(values)
            setting = f"{model} / {dataset} b{batch} {precision} {device}"
            if version != UNKNOWN_VERSION:
                setting += f", code {version}"
            slug = "_".join(str(x) for x in (mode, model, dataset, batch, precision, device, metric.split("_")[0]))
            if several_versions:
                slug += "_" + "".join(c if c.isalnum() or c in "-." else "_" for c in version)
            heatmaps.append(Heatmap(f"sweep_{slug}", f"{mode}: {title} - {setting}", s["blocks"], s["bits"],
                                    values, fmt))
    return heatmaps


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
        allocator = number(row.get("total_bytes")) is not None or number(row.get("peak_bytes")) is not None
        if activation is not None and (allocator or row.get("activation_bytes") != row.get("ledger_bytes")):
            return f"activation {human_bytes(activation)}"
        if number(row.get("ledger_bytes")) is not None:
            return f"kept for backward {human_bytes(number(row['ledger_bytes']))}"
    if mode == "speed" and number(row.get("images_per_sec")) is not None:
        return f"{number(row['images_per_sec']):.1f} images/s"
    if mode == "bench" and number(row.get("combined_of_copy")) is not None:
        return f"{number(row['combined_of_copy']):.0%} of copy bandwidth"
    if mode == "train" and number(row.get("final_val_top1")) is not None:
        return f"val top-1 {number(row['final_val_top1']):.2f}%"
    return ""


def runs_table(rows: list[dict[str, Any]]) -> Table:
    ordered = sorted(rows, key=lambda r: (str(r.get("mode")), str(r.get("model")), number(r.get("batch_size")) or 0,
                                          method_sort_key(r), str(r.get("started_at") or "")))
    out = [[str(r.get("run_id")), str(r.get("mode")), str(r.get("model")), str(r.get("dataset")), str(r.get("method")),
            _fmt(r.get("block_size"), "{:.0f}"), _fmt(r.get("bits"), "{:.0f}"), _fmt(r.get("batch_size"), "{:.0f}"),
            str(r.get("precision")), str(r.get("device")), str(r.get("status")), headline(r),
            _fmt(r.get("duration_s"), "{:.1f}"), str(r.get("group") or ""), str(r.get("code_version") or "")]
           for r in ordered]
    return Table("runs", "Runs included",
                 ["run", "mode", "model", "dataset", "method", "B", "Q", "batch", "precision", "device", "status",
                  "result", "seconds", "group", "code"], out)


# --- trade-offs -------------------------------------------------------------------------------------

@dataclass
class TradeoffPoint:
    method: str
    setting: str
    x: float
    y: float


def _memory_reductions(rows: "RunsDB | list[dict[str, Any]]") -> dict[tuple[str, str], float]:
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


def speed_tradeoffs(rows: "RunsDB | list[dict[str, Any]]") -> list[tuple[str, list[TradeoffPoint]]]:
    """Per throughput context: (title, points of memory reduction x relative speed), one point per
    method and model / batch that has both a memory run and a speed run (and a none run for the ratios)."""
    rows = runs_db(rows)
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


def accuracy_tradeoff(rows: "RunsDB | list[dict[str, Any]]") -> list[TradeoffPoint]:
    """Per method, setting and code version: the exact ledger's activation compression (the mean over
    the successful runs that recorded it) against final top-1 (the mean over seeds)."""
    db = runs_db(rows)
    points = []
    for grid, version in zip(accuracy_grids(db), code_versions(db, "train")):
        ratios = {(r["_label"], r["_setting"]): r["ratio"] for r in db.rows(
            "SELECT _label, _setting, avg(num(ledger_ratio)) AS ratio FROM r WHERE mode = 'train' AND status = 'ok' "
            "AND _version = ? AND num(ledger_ratio) IS NOT NULL GROUP BY ALL", [version])}
        points += [TradeoffPoint(label, col, ratios[(label, col)], cell.value)
                   for (label, col), cell in grid.cells.items() if cell.value is not None and (label, col) in ratios]
    return points
