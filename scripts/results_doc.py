"""docs/results.md's tables, regenerated from the records committed beside it (docs/records/<set>/).

Every table of docs/results.md sits in a generated block:

    <!-- generated: SET/TABLES [group=GROUP] -->
    ...
    <!-- end generated -->

SET is a folder of docs/records (a results store of one set of runs, packed into its records.jsonl
by ``python -m runners.record pack``); TABLES is
the key of a table of ``mode=report`` over it (the name of its CSV: ``memory_ledger``, ``fidelity``,
``training``) or a pattern of keys (``throughput*``); ``group=`` narrows the set as ``report.group``
does. The block's text is the report's tables, made by the same code as
``python main.py mode=report results_dir=docs/records/SET report.group=GROUP``. A set that has no
records yet gets a line saying so instead of a table. A set whose records come from two code
versions is refused: one table never mixes code releases.

    python scripts/results_doc.py            # rewrite docs/results.md's generated blocks
    python scripts/results_doc.py --check    # exit 1 if a block differs from what its records give
"""
from __future__ import annotations

import argparse
import fnmatch
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runners.checks import ConfigError  # noqa: E402
from runners.record import read_store_table, store_files  # noqa: E402
from runners.report import build_sections, reportable, select  # noqa: E402
from runners.report_tables import Table  # noqa: E402

DOC = ROOT / "docs" / "results.md"
RECORDS = ROOT / "docs" / "records"
BLOCK = re.compile(r"^<!-- generated: (?P<set>[\w.-]+)/(?P<tables>[\w*?.-]+)(?: group=(?P<group>[\w.-]+))? -->\n"
                   r"(?P<body>.*?)^<!-- end generated -->$", re.M | re.S)
START = re.compile(r"^<!-- generated:.*$", re.M)


class DocError(Exception):
    """A generated block that cannot be filled: the message names the block and the fix."""


def block_text(tables: list[Table]) -> str:
    parts = []
    for table in tables:
        heading = f"_{table.title}" + (f": {table.note}" if table.note else "") + "_"
        parts += [heading, "", table.to_markdown(), ""]
    return "\n".join(parts)


def set_tables(records: Path, name: str, group: str | None, cache: dict) -> list[Table] | None:
    """The report's tables over one records folder (None: no records yet), computed once per set and group."""
    key = (name, group)
    if key not in cache:
        folder = records / name
        if not store_files(folder):
            cache[key] = None
            return None
        runs = reportable(read_store_table(folder))
        versions = sorted({v or "not recorded" for v in runs.column("code_version").to_pylist()})
        if len(versions) > 1:
            raise DocError(f"{folder} holds records of {len(versions)} code versions ({', '.join(versions)}): "
                           "a table must not mix code releases; keep one version's records in this folder "
                           "and move the others to a folder (set) of their own")
        try:
            selected = select(runs, folder, group, None, False)
        except ConfigError as exc:
            raise DocError(str(exc)) from None
        cache[key] = [t for s in build_sections(selected, with_figures=False) for t in s.tables]
    return cache[key]


def regenerate(text: str, records: Path = RECORDS) -> str:
    """``text`` with every generated block refilled from its records."""
    found = list(BLOCK.finditer(text))
    starts = START.findall(text)
    if len(found) != len(starts):
        raise DocError(f"{len(starts)} '<!-- generated:' lines but {len(found)} well-formed blocks: each is "
                       "'<!-- generated: SET/TABLES [group=GROUP] -->' on its own line, closed by "
                       "'<!-- end generated -->'")
    cache: dict = {}

    def fill(match: re.Match) -> str:
        name, pattern, group = match["set"], match["tables"], match["group"]
        head = match.group(0).split("\n", 1)[0]
        tables = set_tables(records, name, group, cache)
        if tables is None:
            body = (f"_Not yet measured in this release: docs/records/{name}/ holds no records. The command "
                    f"above makes them; then `python scripts/results_doc.py` fills this block._\n")
        else:
            chosen = [t for t in tables if fnmatch.fnmatchcase(t.key, pattern)]
            if not chosen:
                raise DocError(f"{head}: the report of docs/records/{name} has no table '{pattern}'; its tables: "
                               + ", ".join(t.key for t in tables))
            body = block_text(chosen)
        return f"{head}\n{body}<!-- end generated -->"

    return BLOCK.sub(fill, text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare only; exit 1 if docs/results.md is stale")
    p.add_argument("--doc", type=Path, default=DOC)
    p.add_argument("--records", type=Path, default=RECORDS)
    args = p.parse_args()
    text = args.doc.read_text()
    try:
        new = regenerate(text, args.records)
    except DocError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{args.doc} differs from its records: run python scripts/results_doc.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.doc.write_text(new)
        print(f"{args.doc}: generated blocks rewritten")
    else:
        print(f"{args.doc}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
