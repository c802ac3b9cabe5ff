"""dashboard.html: one self-contained page (inline CSS, figures as base64 data URIs, no scripts, no fonts
or stylesheets from elsewhere), so it opens from disk, offline, and can be mailed or attached as is."""
from __future__ import annotations

import base64
import html
from typing import Iterable

from .report_figures import Figure
from .report_tables import Table

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto;
       max-width: 1280px; padding: 0 16px; color: #1d2330; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 4px; }
h2 { font-size: 1.25em; margin-top: 32px; border-bottom: 2px solid #e3e7ee; padding-bottom: 4px; }
h3 { font-size: 1.0em; margin: 18px 0 6px; }
.meta { color: #5b6577; margin: 2px 0; }
.count { font-weight: 600; color: #1d2330; }
.note { color: #5b6577; font-size: 0.85em; margin: 4px 0 8px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.86em; margin: 4px 0 12px; }
th, td { border: 1px solid #d5dae3; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #f1f4f9; }
td:first-child, th:first-child { text-align: left; font-weight: 600; }
tbody tr:nth-child(even) { background: #fafbfd; }
td.fail { color: #b3261e; font-weight: 600; }
figure { margin: 8px 0 20px; }
figure img { max-width: 100%; border: 1px solid #e3e7ee; }
figcaption { color: #5b6577; font-size: 0.85em; }
nav a { margin-right: 12px; }
.empty { padding: 16px; background: #fff6e5; border: 1px solid #f0d9a8; }
"""


def _table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in t.columns)
    body = []
    for row in t.rows:
        cells = []
        for cell in row:
            text = str(cell)
            css = ' class="fail"' if text in ("OOM", "error") else ""
            cells.append(f"<td{css}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = f'<p class="note">{html.escape(t.note)}</p>' if t.note else ""
    return (f'<h3 id="{html.escape(t.key)}">{html.escape(t.title)}</h3>{note}<div class="scroll">'
            f'<table data-key="{html.escape(t.key)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _figure(f: Figure) -> str:
    data = base64.b64encode(f.png).decode("ascii")
    return (f'<figure><img alt="{html.escape(f.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(f.title)}</figcaption></figure>")


def render(title: str, meta: Iterable[str], run_count: int, sections, empty_message: str = "") -> str:
    """The page: title, run count, selection, then each section's tables and figures."""
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="meta"><span class="count" id="run-count">{run_count} run'
             f'{"" if run_count == 1 else "s"}</span> included</p>']
    parts += [f'<p class="meta">{html.escape(line)}</p>' for line in meta]
    if empty_message:
        parts.append(f'<p class="empty">{html.escape(empty_message)}</p>')
    if sections:
        parts.append("<nav>" + "".join(f'<a href="#s{i}">{html.escape(s.title)}</a>'
                                       for i, s in enumerate(sections)) + "</nav>")
    for i, section in enumerate(sections):
        parts.append(f'<h2 id="s{i}">{html.escape(section.title)}</h2>')
        parts += [_table(t) for t in section.tables]
        parts += [_figure(f) for f in section.figures]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")
