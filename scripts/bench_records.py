"""``python -m division.bench``'s JSON as results-store records, so ``mode=report`` tabulates the codec's
bandwidth like any other run (docs/results.md's kernels table is made from them).

    python -m division.bench --out bench.json
    python scripts/bench_records.py bench.json --results-dir docs/records/h200-kernels

One record per row of the bench's table (mode ``bench``): the activation (shape and memory format) and
its dtype, the fused kernels' compress and decompress bandwidth, both together as a fraction of the
device's copy bandwidth measured in the same run, and the PyTorch reference's time over the kernels'
where the bench timed it. The code version is the one the bench recorded (``code_version`` in its
JSON), else this checkout's.
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runners.record import COMMON_FIELDS, code_version, write_store_row  # noqa: E402


def bench_records(result: dict[str, Any], group: str | None = "kernels") -> list[dict[str, Any]]:
    """The rows of one ``division.bench`` result as store records."""
    codec = result.get("codec") or {}
    started = result.get("started_at") or datetime.now(timezone.utc).isoformat(timespec="seconds")
    version = result.get("code_version") or code_version()
    copy = result.get("copy_GBps")
    records = []
    for row in result.get("rows", []):
        fast, ref = row["fast"], row.get("ref")
        record = dict.fromkeys(COMMON_FIELDS)
        record.update(
            run_id=uuid.uuid4().hex[:12], mode="bench", method="division", block_size=codec.get("block_size"),
            bits=codec.get("bits"), kernels="triton", batch_size=row["shape"][0], device="cuda",
            precision=row["dtype"], cuda_graph=False, seed=0, group=group, status="ok", started_at=started,
            code_version=version, device_name=result.get("device"),
            activation="x".join(str(n) for n in row["shape"]) + f" {row['format']}",
            compress_gbps=fast["compress_GBps"], decompress_gbps=fast["decompress_GBps"], copy_gbps=copy,
            combined_of_copy=fast["combined_GBps"] / copy if copy else None,
            reference_speedup=((ref["compress_s"] + ref["decompress_s"]) / (fast["compress_s"] + fast["decompress_s"])
                               if ref else None))
        records.append(record)
    return records


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench_json", type=Path, help="what python -m division.bench --out wrote")
    p.add_argument("--results-dir", type=Path, required=True, help="the results store to add the records to")
    p.add_argument("--group", default="kernels")
    args = p.parse_args()
    records = bench_records(json.loads(args.bench_json.read_text()), args.group)
    for record in records:
        write_store_row(record, args.results_dir)
    print(f"{len(records)} record(s) added to {args.results_dir}")
    return 0 if records else 1


if __name__ == "__main__":
    sys.exit(main())
