"""``report.where``: a small, safe filter language over the columns of the results store.

    model == 'resnet50' and batch_size >= 128
    method in ['none', 'division'] and not (bits == 1)
    status != 'error' or group == 'paper_memory'

Names are columns, literals are strings, numbers, lists/tuples, true/false/null (or True/False/None).
Only comparisons (== != < <= > >= in, not in, is, is not), and/or/not and unary minus are allowed: the
expression is parsed with ``ast`` and walked by hand, never ``eval``-ed. A column a row lacks is null,
and an ordering comparison with null (or between a number and a string) is false, as in SQL.
"""
from __future__ import annotations

import ast
import operator
from typing import Any, Callable, Iterable

from .checks import ConfigError

_ORDER = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}
_LITERAL_NAMES = {"true": True, "false": False, "null": None, "none": None, "True": True, "False": False,
                  "None": None}


class _Missing:
    """A column name not present in a row: compares like null."""


def _compare(op: ast.cmpop, left: Any, right: Any) -> bool:
    if isinstance(op, ast.Eq):
        return left == right
    if isinstance(op, ast.NotEq):
        return left != right
    if isinstance(op, ast.Is):
        return left is right
    if isinstance(op, ast.IsNot):
        return left is not right
    if isinstance(op, (ast.In, ast.NotIn)):
        try:
            found = left in right
        except TypeError:  # e.g. a number "in" a null column
            found = False
        return found if isinstance(op, ast.In) else not found
    try:
        return bool(_ORDER[type(op)](left, right))
    except TypeError:  # null or mixed types: no order, so the row does not match
        return False


class WhereFilter:
    """A compiled ``report.where`` expression; ``matches(row)`` says whether a row passes."""

    def __init__(self, expression: str, columns: Iterable[str] = ()):
        self.expression = expression
        try:
            tree = ast.parse(expression.strip(), mode="eval")
        except SyntaxError as exc:
            raise ConfigError(f"report.where={expression!r} is not a valid expression: {exc.msg}") from None
        self._columns = set(columns)
        self._fn = self._compile(tree.body)

    def _fail(self, what: str) -> None:
        raise ConfigError(f"report.where={self.expression!r}: {what}; allowed: column names, literals, "
                          "== != < <= > >= in, not in, is, is not, and, or, not")

    def _compile(self, node: ast.AST) -> Callable[[dict], Any]:
        if isinstance(node, ast.BoolOp):
            parts = [self._compile(v) for v in node.values]
            if isinstance(node.op, ast.And):
                return lambda row: all(p(row) for p in parts)
            return lambda row: any(p(row) for p in parts)
        if isinstance(node, ast.UnaryOp):
            operand = self._compile(node.operand)
            if isinstance(node.op, ast.Not):
                return lambda row: not operand(row)
            if isinstance(node.op, ast.USub):
                def negate(row):
                    value = operand(row)
                    return -value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
                return negate
            self._fail(f"unsupported operator {type(node.op).__name__}")
        if isinstance(node, ast.Compare):
            first = self._compile(node.left)
            pairs = [(op, self._compile(c)) for op, c in zip(node.ops, node.comparators)]

            def compare(row):  # a chain like 64 <= batch_size < 512
                left = first(row)
                for op, right_fn in pairs:
                    right = right_fn(row)
                    if not _compare(op, None if left is _Missing else left, None if right is _Missing else right):
                        return False
                    left = right
                return True
            return compare
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
            value = node.value
            return lambda row: value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [self._compile(e) for e in node.elts]
            return lambda row: [i(row) for i in items]
        if isinstance(node, ast.Name):
            name = node.id
            if name in _LITERAL_NAMES and name not in self._columns:
                value = _LITERAL_NAMES[name]
                return lambda row: value
            if self._columns and name not in self._columns:
                self._fail(f"unknown column {name!r} (columns: {', '.join(sorted(self._columns))})")
            return lambda row: row.get(name, _Missing)
        self._fail(f"{type(node).__name__} is not supported")
        raise AssertionError  # unreachable: _fail raises

    def matches(self, row: dict[str, Any]) -> bool:
        return bool(self._fn(row))


def select_rows(rows: list[dict[str, Any]], group: str | None, where: str | None) -> list[dict[str, Any]]:
    """Rows of ``group`` (any group when None) that pass ``where`` (every row when empty)."""
    # Compiled first, against every column of the store, so a typo fails even when nothing is selected.
    flt = WhereFilter(where, {key for row in rows for key in row}) if where and where.strip() else None
    if group:
        rows = [r for r in rows if r.get("group") == group]
    if flt is not None:
        rows = [r for r in rows if flt.matches(r)]
    return rows
