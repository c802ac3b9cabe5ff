"""The short summary printed at the end of a run."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

try:
    from hydra.experimental.callback import Callback
except ImportError:  # the summary itself needs no Hydra
    Callback = object


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
    elif record.get("bits") is not None:  # actnn, blpa, acgc (its mean width)
        knobs = f" (Q={record['bits']:.3g})"
    if record["mode"] == "report":  # a report reads the store; model / method defaults mean nothing here
        group = f" of group {record['group']}" if record.get("group") else ""
        lines = [f"report | {record.get('report_runs', 0)} runs{group} | status {record['status']}"]
    else:
        setting = " ".join(str(p) for p in (record["device"], record["precision"],
                                              "cuda_graph" if record.get("cuda_graph") else None,
                                              f"compile={record['compile']}" if record.get("compile") else None) if p)
        lines = [f"{record['mode']} | {record['model']} on {record['dataset']} | method {record['method']}{knobs}"
                 f" | batch {record['batch_size']} | {setting} | status {record['status']}"]
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


def sweep_group(config) -> str | None:
    """The group of a sweep's jobs, as runners.tracking.derive_group names it, from the sweep's config."""
    if config.get("group"):
        return str(config.group)
    from .tracking import _TIME_DIR  # the one rule for naming a sweep directory's group
    choice = config.hydra.runtime.choices.get("experiment")
    if choice and choice != "null":
        return str(choice)
    sweep = Path(str(config.hydra.sweep.dir))
    if _TIME_DIR.match(sweep.name) and sweep.parent.name:
        return f"{sweep.parent.name}_{sweep.name}"
    return sweep.name


def report_command(config) -> str:
    group = sweep_group(config)
    args = ["python", "main.py", "mode=report", f"report.group={group}"]
    results_dir = str(config.get("results_dir"))
    if results_dir != "outputs/results":
        args.append(f"results_dir={results_dir}")
    return " ".join(shlex.quote(a) for a in args)


class SweepHint(Callback):
    """At the end of a multirun (``-m``): the sweep's group and the exact command that reports it."""

    def on_multirun_end(self, config, **kwargs) -> None:
        if config.get("mode") is None or config.mode.get("name") == "report":
            return
        print(f"sweep finished: its runs are in group {sweep_group(config)!r} (directory {config.hydra.sweep.dir})\n"
              f"report: {report_command(config)}", flush=True)
