"""Which runs a report includes: ``report.group``, ``report.where`` and ``report.include_errors``.

``report.where`` is a DuckDB SQL condition over the store's columns (runners.record.STORE_FIELDS)::

    model = 'resnet50' AND batch_size >= 128
    method IN ('none', 'division') AND NOT bits = 1
    batch_size BETWEEN 64 AND 256 AND "group" LIKE 'paper%'      -- group is an SQL keyword: quote it

It can only filter: it must be one condition (no ``;``), it runs in a private in-memory DuckDB
connection that sees one table, ``runs`` (the store, loaded in Python), with file system access,
extension loading and configuration changes turned off, so a condition can neither read nor write a
file nor start a program. The group and the status are bound as parameters, never pasted into SQL.
"""
from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa

from .checks import ConfigError

_CONFIG = {"enable_external_access": False, "autoinstall_known_extensions": False,
           "autoload_known_extensions": False, "threads": 1, "memory_limit": "1GB"}


def locked_connection(table: pa.Table) -> duckdb.DuckDBPyConnection:
    """A private in-memory connection that sees ``table`` as ``runs`` and nothing else (no files, no
    extensions, configuration locked); report_query groups the report's tables in one too."""
    con = duckdb.connect(":memory:", config=dict(_CONFIG))
    con.register("runs", table)
    con.execute("SET lock_configuration = true")  # the condition cannot turn file access back on
    return con


def _check_where(con: duckdb.DuckDBPyConnection, where: str) -> str:
    """The condition as it goes into the query; ConfigError unless it is a single condition."""
    text = where.strip()
    if ";" in text:
        raise ConfigError(f"report.where={where!r}: one SQL condition, without ';' "
                          "(e.g. \"model = 'resnet50' AND batch_size >= 128\")")
    query = f"SELECT * FROM runs WHERE (\n{text}\n)"
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise ConfigError(f"report.where={where!r} is not a valid SQL condition: {_first_line(exc)}") from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise ConfigError(f"report.where={where!r}: one SQL condition only")
    return text


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def select_table(table: pa.Table, group: str | None = None, where: str | None = None,
                 include_errors: bool = False) -> pa.Table:
    """The rows of ``table`` of ``group`` (any when None) that pass ``where`` (all when empty); rows with
    status ``error`` only with ``include_errors``. Order kept."""
    con = locked_connection(table.append_column("_order", pa.array(range(table.num_rows), type=pa.int64())))
    try:
        conditions, params = [], []
        if where and where.strip():
            conditions.append(f"(\n{_check_where(con, where)}\n)")
        if group:
            conditions.append('"group" = ?')
            params.append(str(group))
        if not include_errors:
            conditions.append("status IS DISTINCT FROM 'error'")
        query = "SELECT * FROM runs" + (" WHERE " + " AND ".join(conditions) if conditions else "") + " ORDER BY _order"
        try:
            out = con.sql(query, params=params).to_arrow_table()
        except duckdb.PermissionException as exc:
            raise ConfigError(f"report.where={where!r} reaches outside the store's table: {_first_line(exc)}") from None
        except duckdb.Error as exc:
            raise ConfigError(f"report.where={where!r}: {_first_line(exc)} (columns: "
                              f"{', '.join(n for n in table.column_names)})") from None
    finally:
        con.close()
    return out.drop_columns(["_order"])


def select_rows(table: pa.Table, group: str | None = None, where: str | None = None,
                include_errors: bool = False) -> list[dict[str, Any]]:
    return select_table(table, group, where, include_errors).to_pylist()


def groups(table: pa.Table) -> list[str]:
    """The groups that the table's runs belong to, sorted."""
    return sorted({g for g in table.column("group").to_pylist() if g}) if table.num_rows else []
