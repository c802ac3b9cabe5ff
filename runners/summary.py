"""The short summary printed at the end of a run."""
from __future__ import annotations

from typing import Any


def human_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def summary_lines(record: dict[str, Any]) -> list[str]:
    knobs = ""
    if record.get("block_size") is not None:
        knobs = f" (B={record['block_size']}, Q={record['bits']})"
    if record["mode"] == "report":  # a report reads the store; model / method defaults mean nothing here
        lines = [f"report | {record.get('report_runs', 0)} runs | status {record['status']}"]
    else:
        lines = [f"{record['mode']} | {record['model']} on {record['dataset']} | method {record['method']}{knobs}"
                 f" | {record['device']} {record['precision']} | status {record['status']}"]
    if record.get("final_val_top1") is not None:
        lines.append(f"val top-1 {record['final_val_top1']:.2f}% (best {record['best_val_top1']:.2f}%),"
                     f" train loss {record['final_train_loss']:.4f}, {record['epochs']} epoch(s)")
    if record.get("ledger_bytes") is not None:
        ratio = record.get("ledger_ratio")
        plain = record.get("ledger_plain_bytes")
        lines.append(f"activations kept for backward: {human_bytes(record['ledger_bytes'])}"
                     + (f" vs {human_bytes(plain)} with plain autograd" if plain is not None
                        else f" saved by the compiled graph ({record.get('compile')} mode)")
                     + (f" ({ratio:.1f}x smaller)" if ratio else ""))
    if record.get("peak_bytes") is not None:
        lines.append(f"CUDA peak {human_bytes(record['peak_bytes'])}, activation {human_bytes(record.get('activation_bytes'))}")
    if record.get("images_per_sec") is not None:
        lines.append(f"{record['images_per_sec']:.1f} images/s (median step {record['step_ms_median']:.2f} ms)")
    if record.get("report_dir"):
        lines.append(f"report written to {record['report_dir']}")
    if record.get("error"):
        lines.append(f"error: {record['error']}")
    lines.append(f"record: {record['run_dir']}/results.json")
    return lines


def print_summary(record: dict[str, Any]) -> None:
    print("\n".join(summary_lines(record)))
