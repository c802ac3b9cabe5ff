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
- png:  bar charts, training curves and B x Q heatmaps;
- html: dashboard.html, a self-contained page with every table and figure.

Sections appear only for what the selected runs hold: memory (paper Table: methods x model/batch,
activation / total / peak / ledger with "x" vs method none), throughput, accuracy (+ curves) and
DIVISION B x Q sweeps. Tables and figures also go to the logger.
"""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks import ConfigError
import pyarrow.compute as pc

from .record import atomic_write_bytes, read_store_table, resolve_results_dir
from .report_figures import Figure, accuracy_bars, grid_bars, heatmap, training_curves
from .report_filter import groups, select_rows
from .report_html import render
from .report_tables import (Table, accuracy_grid, accuracy_table, grid_has_values, heatmap_table, memory_grids,
                            memory_table, runs_table, sweep_heatmaps, throughput_grids, throughput_table,
                            training_details)

log = logging.getLogger(__name__)

FORMATS = ("md", "csv", "png", "html")
TITLE = "DIVISION experiment report"


@dataclass
class Section:
    title: str
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def build_sections(rows: list[dict[str, Any]], with_figures: bool = True) -> list[Section]:
    """The report's content for the selected rows; a section only where the rows have its figures."""
    sections = []
    grids = memory_grids(rows)
    if grids:
        memory = Section("Memory", [memory_table(g) for g in grids])
        if with_figures:  # one chart per context: its first figure (activation on CUDA, else the ledger)
            charted: set[str] = set()
            for grid in (g for g in grids if grid_has_values(g)):
                context = grid.title.rsplit(" - ", 1)[-1]
                if context not in charted:
                    charted.add(context)
                    memory.figures.append(grid_bars(grid, grid.unit, grid.title, "{:.1f}x"))
        sections.append(memory)
    speed = throughput_grids(rows)
    if speed:
        section = Section("Throughput", [throughput_table(g) for g in speed])
        if with_figures:
            section.figures += [grid_bars(g, "images/s", g.title, "{:.2f}x") for g in speed if grid_has_values(g)]
        sections.append(section)
    accuracy = accuracy_grid(rows)
    if accuracy is not None:
        section = Section("Accuracy", [accuracy_table(accuracy)])
        details = training_details(rows)
        if details is not None:
            section.tables.append(details)
        if with_figures:
            if grid_has_values(accuracy):
                section.figures.append(accuracy_bars(accuracy))
            curves = training_curves(rows)
            if curves is not None:
                section.figures.append(curves)
        sections.append(section)
    maps = sweep_heatmaps(rows)
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


def run(cfg, env) -> dict[str, Any]:
    formats = _formats(cfg)
    group = cfg.report.get("group")
    where = cfg.report.get("where")
    include_errors = bool(cfg.report.get("include_errors", False))
    store_dir = resolve_results_dir(cfg)
    stored = read_store_table(store_dir)
    candidates = stored.filter(pc.fill_null(pc.not_equal(stored.column("mode"), "report"), True))
    if group and group not in groups(candidates):
        present = groups(candidates)
        raise ConfigError(f"report.group={group!r}: no run of the store {store_dir} is in that group; "
                          + (f"its groups: {', '.join(present)}" if present else "its runs have no group")
                          + " (or drop report.group to report every run)")
    rows = select_rows(candidates, group, where, include_errors)
    errors = 0 if include_errors else len(select_rows(candidates, group, where, True)) - len(rows)

    reports = stored.num_rows - candidates.num_rows
    meta = [f"store: {store_dir} ({candidates.num_rows} runs; {reports} report run{'' if reports == 1 else 's'} left out)",
            f"group: {group if group else 'any'}", f"where: {where if where else '(none)'}"]
    if errors:
        meta.append(f"{errors} run{'' if errors == 1 else 's'} with status error left out "
                    "(report.include_errors=true to show them)")
    empty_message = ""
    if not candidates.num_rows:
        empty_message = f"The results store {store_dir} holds no runs to report (empty, missing or only reports)."
    elif not rows:
        empty_message = "No run matched the selection (report.group / report.where); nothing to tabulate."
    sections = build_sections(rows, with_figures=bool({"png", "html"} & set(formats))) if rows else []

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
    return {"report_dir": str(out_dir), "report_runs": len(rows), "report_files": written,
            "report_note": empty_message or None}
