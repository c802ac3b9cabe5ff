"""The report's grouping and aggregation, in DuckDB SQL over the selected runs' Arrow table.

``RunsDB`` opens one private in-memory connection (the same locked-down one report.where runs in:
no file access, no extensions, no configuration changes) over the selection, as table ``runs``, and
makes the temporary table ``r``: every run with the labels the tables group by, computed once in SQL:

- ``_label``   the method with its knobs, a table's row ("division B8 Q2", "actnn Q2", "none");
- ``_col``     model and batch size, a memory / throughput column ("resnet50 b128");
- ``_setting`` model / data set and epochs, an accuracy column ("resnet18 / cifar10, 55 epochs"), with
               the processes (DDP), CUDA graphs or compile mode where a run used them: runs trained
               differently are never averaged into one cell;
- ``_ctx``     what a comparison holds fixed (data set, precision, device, CUDA graphs, compile mode,
               code version): runs of two contexts never share a table;
- ``_version`` the code version (``code_version``), 'not recorded' for records written before it.

``LATEST`` is the order that picks one run per cell: a successful run before a failed one, then the
latest (a rerun replaces a failed attempt), then the later in the store.

report_tables groups, pivots and averages with GROUP BY and window functions over ``r`` and keeps by
hand only the paper's rules: ratios against method none, OOM cells, how cells are written.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import pyarrow as pa

from division.methods import DEFAULT_ATTENTION_BITS, DEFAULT_PROBABILITY_BITS

from .record import STORE_SCHEMA, to_row
from .report_filter import locked_connection

# The paper's order: the baseline first, then the memory-saving methods, DIVISION last; others after.
METHOD_ORDER = ("none", "checkpoint", "swap", "blpa", "acgc", "actnn", "division")
UNKNOWN_VERSION = "not recorded"

_SETUP = [
    # 8 and 8.0 both read "8" (adaptive methods describe their bits as a float), 2.5 stays "2.5"
    "CREATE MACRO knob(v) AS CASE WHEN isfinite(v) AND v = trunc(v) THEN CAST(CAST(v AS BIGINT) AS VARCHAR) "
    "WHEN isfinite(v) THEN printf('%.3g', v) ELSE lower(CAST(v AS VARCHAR)) END",
    # a finite number or NULL, as report_tables.number() reads a value
    "CREATE MACRO num(v) AS CASE WHEN isfinite(CAST(v AS DOUBLE)) THEN CAST(v AS DOUBLE) END",
    "CREATE MACRO txt(v) AS coalesce(CAST(v AS VARCHAR), 'None')",  # as Python's str(None)
    # a table, not a view: the labels are computed once, not in every one of a report's queries
    f"""CREATE TEMP TABLE r AS SELECT *,
        txt(method) || CASE WHEN block_size IS NOT NULL THEN ' B' || knob(block_size) ELSE '' END
                    || CASE WHEN bits IS NOT NULL THEN ' Q' || knob(bits) ELSE '' END
                    || CASE WHEN rebuild_conv_input THEN ' rebuild' ELSE '' END
                    || CASE WHEN recompute_norm_input THEN ' recompute' ELSE '' END
                    || CASE WHEN fused_norm THEN ' fused-norm' ELSE '' END
                    || CASE WHEN attention_bits <> {DEFAULT_ATTENTION_BITS} THEN ' A' || CAST(attention_bits AS VARCHAR) ELSE '' END
                    || CASE WHEN probability_bits <> {DEFAULT_PROBABILITY_BITS} THEN ' P' || CAST(probability_bits AS VARCHAR) ELSE '' END
                    AS _label,
        [coalesce(list_position({list(METHOD_ORDER)}, method), {len(METHOD_ORDER) + 1})::DOUBLE,
         coalesce(num(block_size), 0), coalesce(num(bits), 0),
         CASE WHEN rebuild_conv_input THEN 1.0 ELSE 0.0 END,
         CASE WHEN recompute_norm_input THEN 1.0 ELSE 0.0 END,
         CASE WHEN fused_norm THEN 1.0 ELSE 0.0 END,
         coalesce(attention_bits, {DEFAULT_ATTENTION_BITS})::DOUBLE,
         coalesce(probability_bits, {DEFAULT_PROBABILITY_BITS})::DOUBLE] AS _label_rank,
        txt(model) || ' b' || txt(batch_size) AS _col,
        txt(model) || ' / ' || txt(dataset)
                   || CASE WHEN epochs IS NOT NULL THEN ', ' || CAST(epochs AS VARCHAR) || ' epochs' ELSE '' END
                   || CASE WHEN world_size > 1 THEN ', ' || CAST(world_size AS VARCHAR) || ' processes' ELSE '' END
                   || CASE WHEN cuda_graph THEN ', CUDA graph' ELSE '' END
                   || CASE WHEN compile IS NOT NULL AND compile <> '' THEN ', compile-' || compile ELSE '' END
                   AS _setting,
        coalesce(code_version, '{UNKNOWN_VERSION}') AS _version,
        list_filter([txt(dataset), txt(precision), txt(device),
                     CASE WHEN cuda_graph THEN 'cuda_graph' END,
                     CASE WHEN compile IS NOT NULL AND compile <> '' THEN 'compile-' || compile END,
                     CASE WHEN code_version IS NOT NULL THEN 'code ' || code_version END], lambda x: x IS NOT NULL) AS _ctx
        FROM runs""",
]

# ORDER BY of the window that picks one run per cell (row_number() = 1 is the one shown)
LATEST = "status IS NOT DISTINCT FROM 'ok' DESC, coalesce(started_at, '') DESC, _order DESC"


def as_table(rows: "pa.Table | Iterable[dict[str, Any]]") -> pa.Table:
    """The runs as a table of the store's schema: store rows or records (nested values become JSON)."""
    if isinstance(rows, pa.Table):
        return rows
    rows = list(rows)
    try:  # store rows (what report_filter.select_rows gives) convert as they are
        return pa.Table.from_pylist(rows, schema=STORE_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):  # records: nested values, other types
        return pa.Table.from_pylist([to_row(r) for r in rows], schema=STORE_SCHEMA)


class RunsDB:
    """One DuckDB connection over the selected runs, for all the queries of one report."""

    def __init__(self, rows: "pa.Table | Iterable[dict[str, Any]]"):
        table = as_table(rows)
        self.table = table
        self._con = locked_connection(table.append_column("_order", pa.array(range(table.num_rows), type=pa.int64())))
        for statement in _SETUP:
            self._con.execute(statement)

    def rows(self, query: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """The query's result as dicts, column names as keys."""
        result = self._con.execute(query, list(params))
        names = [d[0] for d in result.description]
        return [dict(zip(names, values)) for values in result.fetchall()]

    def values(self, query: str, params: Sequence[Any] = ()) -> list[Any]:
        """The first column of the query's result."""
        return [row[0] for row in self._con.execute(query, list(params)).fetchall()]

    def close(self) -> None:
        self._con.close()


def runs_db(rows: "RunsDB | pa.Table | Iterable[dict[str, Any]]") -> RunsDB:
    """``rows`` itself when it is a RunsDB already (one connection serves a whole report), else a new one."""
    return rows if isinstance(rows, RunsDB) else RunsDB(rows)
