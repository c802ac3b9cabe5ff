"""mode=report: the paper's tables and figures from the results store, in env.run_dir.

    python main.py mode=report                                   # every run in outputs/results
    python main.py mode=report report.group=paper_memory         # one preset / sweep
    python main.py mode=report "report.where=\\"model = 'resnet50' AND batch_size >= 128\\""

Reads every row of ``results_dir`` (report runs themselves excluded), keeps those of ``report.group``
(which must exist: else the error lists the groups there are) that pass ``report.where``, a DuckDB SQL
condition (see report_filter); runs with status ``error`` only with ``report.include_errors=true``.
Writes, per ``report.formats``:

- md:   report.md, every table in Markdown (figures linked when png is written too);
- csv:  one <table>.csv per table, plus store_rows.csv with the selected rows' raw values;
- png:  bar charts, training loss and top-1 curves, memory against throughput / accuracy trade-offs
        per method, and B x Q heatmaps;
- html: dashboard.html, a self-contained page with every table and figure.

Sections appear only for what the selected runs hold: memory (paper Table: methods x model/batch,
activation / total / peak / ledger with "x" vs method none; the largest batch that trains where
``memory.find_max_batch`` searched it), throughput, accuracy (+ curves), gradient
fidelity (scripts/gradient_fidelity.py's records), the codec's bandwidth (division.bench's, through
scripts/bench_records.py) and DIVISION B x Q sweeps; no table mixes code
versions. Tables and figures also go to the logger.
"""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks import ConfigError
import pyarrow as pa
import pyarrow.compute as pc

from .record import atomic_write_bytes, read_store_table, record_run_dir, resolve_results_dir
from .report_figures import Figure, accuracy_bars, grid_bars, heatmap, tradeoff, training_curves
from .report_filter import groups, select_table
from .report_html import render
from .report_query import RunsDB
from .report_tables import (Grid, Table, accuracy_grids, accuracy_table, accuracy_tradeoff, fidelity_table,
                            grid_has_values, heatmap_table, kernels_tables, max_batch_grids, max_batch_table, memory_grids,
                            memory_table, operator_tables, runs_table, speed_tradeoffs, sweep_heatmaps, throughput_grids,
                            throughput_table, training_details)

log = logging.getLogger(__name__)

FORMATS = ("md", "csv", "png", "html")
TITLE = "DIVISION experiment report"


@dataclass
class Section:
    title: str
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def bar_grid(grid: Grid) -> Grid | None:
    """The grid as a bar chart shows it: a method run at several B / Q settings (a B x Q sweep) is left
    to the sweep's heatmap, not drawn as one bar and one legend entry per setting. None: nothing left."""
    methods = [label.split(" ")[0] for label in grid.row_labels]
    keep = [label for label, method in zip(grid.row_labels, methods) if methods.count(method) == 1]
    if not keep or not any(grid.cells.get((label, col)) for label in keep for col in grid.col_labels):
        return None
    if len(keep) == len(grid.row_labels):
        return grid
    cells = {k: c for k, c in grid.cells.items() if k[0] in keep}
    return Grid(grid.key, grid.title, keep, grid.col_labels, cells, grid.unit, grid.note)


def build_sections(runs: "pa.Table | list[dict[str, Any]]", with_figures: bool = True) -> list[Section]:
    """The report's content for the selected runs; a section only where the runs have its figures.
    One DuckDB connection over the selection serves every table's grouping (report_query)."""
    db = RunsDB(runs)
    try:
        return _sections(db, db.table.to_pylist(), with_figures)
    finally:
        db.close()


def _sections(db: RunsDB, rows: list[dict[str, Any]], with_figures: bool) -> list[Section]:
    sections = []
    grids = memory_grids(db)
    if grids:
        memory = Section("Memory", [memory_table(g) for g in grids])
        if with_figures:  # one chart per context: its first figure (activation on CUDA, else the ledger)
            charted: set[str] = set()
            for grid in (g for g in grids if grid_has_values(g)):
                context = grid.title.rsplit(" - ", 1)[-1]
                if context not in charted:
                    charted.add(context)
                    bars = bar_grid(grid)
                    if bars is not None:
                        memory.figures.append(grid_bars(bars, grid.unit, grid.title, "{:.1f}x"))
        memory.tables += [max_batch_table(g) for g in max_batch_grids(db)]
        memory.tables += operator_tables(db)
        sections.append(memory)
    speed = throughput_grids(db)
    if speed:
        section = Section("Throughput", [throughput_table(g) for g in speed])
        if with_figures:
            for grid in (g for g in speed if grid_has_values(g)):
                bars = bar_grid(grid)
                if bars is not None:
                    section.figures.append(grid_bars(bars, "images/s", grid.title, "{:.2f}x"))
            for i, (title, points) in enumerate(speed_tradeoffs(db)):
                section.figures.append(tradeoff(points, f"tradeoff_speed_{i}", title,
                                                "activation memory reduction vs none (x)",
                                                "throughput relative to none (x)"))
        sections.append(section)
    accuracy = accuracy_grids(db)
    if accuracy:
        section = Section("Accuracy", [accuracy_table(g) for g in accuracy])
        details = training_details(rows)
        if details is not None:
            section.tables.append(details)
        if with_figures:
            for grid in accuracy:
                bars = bar_grid(grid) if grid_has_values(grid) else None
                if bars is not None:
                    section.figures.append(accuracy_bars(bars))
            curves = training_curves(rows)
            if curves is not None:
                section.figures.append(curves)
            points = accuracy_tradeoff(db)
            if len({p.method for p in points}) >= 2:
                section.figures.append(tradeoff(points, "tradeoff_accuracy", "Memory against accuracy",
                                                "activations kept for backward: reduction vs plain autograd (x)",
                                                "final val top-1 (%)"))
        sections.append(section)
    fidelity = fidelity_table(db)
    if fidelity is not None:
        sections.append(Section("Gradient fidelity", [fidelity]))
    kernels = kernels_tables(db)
    if kernels:
        sections.append(Section("Kernels", kernels))
    maps = sweep_heatmaps(db)
    if maps:
        sections.append(Section("DIVISION block size x bits", [heatmap_table(h) for h in maps],
                                [heatmap(h) for h in maps] if with_figures else []))
    sections.append(Section("Runs", [runs_table(rows)]))
    return sections


def _formats(cfg) -> list[str]:
    value = cfg.report.get("formats") or []
    if isinstance(value, str):  # report.formats=md or report.formats="md,html" on the command line
        value = value.split(",")
    formats = [str(f).strip().lower() for f in value]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"report.formats={formats!r} is not allowed: use a list of {', '.join(FORMATS)}")
    return formats


def _markdown(meta: list[str], run_count: int, sections: list[Section], figure_files: dict[str, str],
              empty_message: str) -> str:
    lines = [f"# {TITLE}", "", f"**{run_count} run{'' if run_count == 1 else 's'}** included.", ""]
    lines += [f"- {m}" for m in meta] + [""]
    if empty_message:
        lines += [f"> {empty_message}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for table in section.tables:
            lines += [f"### {table.title}", ""]
            if table.note:
                lines += [f"_{table.note}_", ""]
            lines += [table.to_markdown(), ""]
        for fig in section.figures:
            if fig.key in figure_files:
                lines += [f"![{fig.title}]({figure_files[fig.key]})", ""]
    return "\n".join(lines)


def _raw_csv(rows: list[dict[str, Any]]) -> str:
    """The selected rows with every column, raw: for analysis elsewhere (pandas, a spreadsheet)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def reportable(stored: pa.Table) -> pa.Table:
    """The store's runs a report tabulates: every run but the reports themselves."""
    return stored.filter(pc.fill_null(pc.not_equal(stored.column("mode"), "report"), True))


def select(candidates: pa.Table, store_dir, group: str | None, where: str | None, include_errors: bool) -> pa.Table:
    """The runs of ``group`` (which must exist) that pass ``where`` (report_filter)."""
    if group and group not in groups(candidates):
        present = groups(candidates)
        raise ConfigError(f"report.group={group!r}: no run of the store {store_dir} is in that group; "
                          + (f"its groups: {', '.join(present)}" if present else "its runs have no group")
                          + " (or drop report.group to report every run)")
    return select_table(candidates, group, where, include_errors)


def run(cfg, env) -> dict[str, Any]:
    formats = _formats(cfg)
    group = cfg.report.get("group")
    where = cfg.report.get("where")
    include_errors = bool(cfg.report.get("include_errors", False))
    store_dir = resolve_results_dir(cfg)
    stored = read_store_table(store_dir)
    candidates = reportable(stored)
    selected = select(candidates, store_dir, group, where, include_errors)
    errors = 0 if include_errors else select_table(candidates, group, where, True).num_rows - selected.num_rows

    reports = stored.num_rows - candidates.num_rows
    meta = [f"store: {store_dir} ({candidates.num_rows} runs; {reports} report run{'' if reports == 1 else 's'} left out)",
            f"group: {group if group else 'any'}", f"where: {where if where else '(none)'}"]
    if errors:
        meta.append(f"{errors} run{'' if errors == 1 else 's'} with status error left out "
                    "(report.include_errors=true to show them)")
    empty_message = ""
    if not candidates.num_rows:
        empty_message = f"The results store {store_dir} holds no runs to report (empty, missing or only reports)."
    elif not selected.num_rows:
        empty_message = "No run matched the selection (report.group / report.where); nothing to tabulate."
    sections = build_sections(selected, with_figures=bool({"png", "html"} & set(formats))) if selected.num_rows else []
    rows = selected.to_pylist()

    out_dir = Path(env.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def write(name: str, data: str | bytes) -> Path:
        path = out_dir / name
        atomic_write_bytes(path, data if isinstance(data, bytes) else data.encode("utf-8"))
        written.append(name)
        return path

    figure_files: dict[str, str] = {}
    if "png" in formats:
        for fig in (f for s in sections for f in s.figures):
            path = write(f"{fig.key}.png", fig.png)
            figure_files[fig.key] = path.name
            env.logger.log_image(f"report/{fig.key}", str(path))
    tables = [t for s in sections for t in s.tables]
    for table in tables:
        env.logger.log_table(f"report/{table.key}", table.columns, table.rows)
    if "csv" in formats:
        for table in tables:
            write(f"{table.key}.csv", table.to_csv())
        if rows:
            write("store_rows.csv", _raw_csv(rows))
    # An empty selection still leaves a file that says so, whatever the formats.
    if "md" in formats or empty_message:
        write("report.md", _markdown(meta, len(rows), sections, figure_files, empty_message))
    if "html" in formats:
        write("dashboard.html", render(TITLE, meta, len(rows), sections, empty_message))

    if empty_message:
        log.warning("%s", empty_message)
    log.info("report of %d runs: %s", len(rows), ", ".join(written))
    return {"report_dir": record_run_dir(out_dir), "report_runs": len(rows), "report_files": written,
            "report_note": empty_message or None}
