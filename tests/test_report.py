"""mode=report on fabricated records: the paper-shaped tables, figures, filters, dashboard and edge cases."""
from __future__ import annotations

import csv
import importlib.util
import re
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf
from PIL import Image

from runners import report
from runners.checks import ConfigError
from runners.record import write_record
from runners.record import read_store_table
from runners.report_filter import select_rows
from runners.tracking import NullLogger

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30


@pytest.fixture(autouse=True)
def _wandb_in_tmp(tmp_path, monkeypatch):
    # Nothing here starts wandb, but keep it off $HOME and the network should that ever change.
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "disabled")


class RecordingLogger(NullLogger):
    def __init__(self):
        self.tables: dict[str, tuple[list, list]] = {}
        self.images: dict[str, str] = {}

    def log_table(self, key, columns, rows):
        self.tables[key] = (columns, rows)

    def log_image(self, key, path):
        self.images[key] = path


_CLOCK = iter(range(10 ** 6))


def record(**fields) -> dict:
    base = dict(run_id=uuid.uuid4().hex[:12], mode="memory", model="resnet50", dataset="synthetic", method="none",
                block_size=None, bits=None, batch_size=64, device="cuda", precision="fp32", seed=0, group="paper",
                status="ok", error=None, run_dir="/nowhere", duration_s=1.0, wandb_run_id=None)
    base["started_at"] = f"2026-01-01T00:{next(_CLOCK):06d}"
    base.update(fields)
    if base["method"] == "division" and base["block_size"] is None:
        base.update(block_size=8, bits=2)
    return base


def fill(store: Path, records: list[dict]) -> None:
    for r in records:
        write_record(r, store.parent / "runs" / r["run_id"], store)


def paper_memory_records() -> list[dict]:
    """The paper's ResNet-50 activation row shape: vanilla OOM at batch 512, DIVISION 10x smaller."""
    out = []
    for batch, vanilla in ((64, 5.14), (128, 10.25), (256, 20.48), (512, None)):
        for method, factor in (("none", 1.0), ("division", 1 / 10.5), ("checkpoint", 1 / 5.7), ("actnn", 1 / 10.5)):
            if vanilla is None and method == "none":
                out.append(record(method=method, batch_size=batch, status="oom", error="OutOfMemoryError"))
                continue
            act = int((vanilla or 40.96) * factor * GIB)
            out.append(record(method=method, batch_size=batch, activation_bytes=act, total_bytes=act + int(0.3 * GIB),
                              peak_bytes=act + int(0.8 * GIB), ledger_bytes=act,
                              ledger_plain_bytes=int(batch / 64 * 5.14 * GIB),
                              ledger_ratio=batch / 64 * 5.14 * GIB / act))
    return out


def speed_records() -> list[dict]:
    return [record(mode="speed", method=m, batch_size=b, precision="bf16", images_per_sec=v, step_ms_median=b / v * 1e3)
            for m, values in (("none", (444, 464)), ("division", (370, 379))) for b, v in zip((64, 128), values)]


def train_records() -> list[dict]:
    out = []
    for method, final in (("none", 94.9), ("division", 94.7)):
        history = [dict(epoch=e, train_loss=1.0 / e, train_top1=80.0, val_top1=final - 3 + e, val_top5=99.0, lr=0.1,
                        images_per_sec=900.0) for e in (1, 2, 3)]
        out.append(record(mode="train", model="resnet18", dataset="cifar10", method=method, batch_size=256,
                          group="cifar", epochs=3, final_val_top1=final, best_val_top1=final, final_train_loss=0.33,
                          images_per_sec_train=900.0, history=history, ledger_plain_bytes=1e8,
                          ledger_bytes=1e7, ledger_ratio=10.0))
    return out


def sweep_records() -> list[dict]:
    return [record(mode="memory", model="resnet18", dataset="cifar10", method="division", block_size=b, bits=q,
                   batch_size=256, device="cpu", group="block_bits", activation_bytes=1e6 * q / b,
                   ledger_bytes=1e6 * q / b, ledger_plain_bytes=3.2e7, ledger_ratio=32.0 * b / q)
            for b in (2, 4, 8, 16) for q in (1, 2, 4, 8)]


def run_report(store: Path, out: Path, group=None, where=None, formats=("md", "csv", "png", "html"),
               include_errors=False):
    cfg = OmegaConf.create({"results_dir": str(store),
                            "report": {"group": group, "where": where, "formats": list(formats),
                                       "include_errors": include_errors}})
    logger = RecordingLogger()
    fields = report.run(cfg, SimpleNamespace(run_dir=out, logger=logger, device=None))
    return fields, logger


def md_table(markdown: str, title_start: str) -> list[list[str]]:
    """The rows (header included) of the Markdown table under the heading that starts with title_start."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"### {title_start}"))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows


def test_memory_table_has_the_papers_shape(tmp_path):
    store = tmp_path / "store"
    fill(store, paper_memory_records() + [record(mode="report", method="division")])
    fields, logger = run_report(store, tmp_path / "out")
    assert fields["report_runs"] == 16  # the report run itself is left out
    text = (tmp_path / "out" / "report.md").read_text()
    rows = md_table(text, "Activation memory")
    assert rows[0] == ["method", "resnet50 b64", "resnet50 b128", "resnet50 b256", "resnet50 b512"]
    assert [r[0] for r in rows[1:]] == ["none", "checkpoint", "actnn", "division B8 Q2"]  # the paper's order
    none, division = rows[1], rows[4]
    assert none[1] == "5.14" and none[4] == "OOM"
    assert division[1] == "0.49 (10.5x)"  # the paper's cell, in GiB with the ratio to none
    assert division[4] == "3.90"  # no ratio where vanilla ran out of memory
    assert "Total memory" in text and "Peak memory" in text
    assert "report/memory_activation" in logger.tables
    assert logger.tables["report/memory_activation"][0][0] == "method"
    with open(tmp_path / "out" / "memory_activation.csv") as f:
        assert list(csv.reader(f))[1][:2] == ["none", "5.14"]



def test_largest_batch_table(tmp_path):
    """memory.find_max_batch's runs: methods x model, the batch and how many times none's; a search
    that reached its limit is a lower bound; runs that did not search stay out of the table."""
    store = tmp_path / "store"
    fill(store, [record(method="none", batch_size=256, max_batch=1707, max_batch_capped=False),
                 record(method="division", batch_size=256, max_batch=5888, max_batch_capped=False),
                 record(method="actnn", batch_size=256, max_batch=8192, max_batch_capped=True),
                 record(model="wrn50_2", method="none", batch_size=256, max_batch=8192, max_batch_capped=True),
                 record(model="wrn50_2", method="division", batch_size=256, max_batch=8192, max_batch_capped=True),
                 record(method="checkpoint", batch_size=64, activation_bytes=GIB)])  # no search
    run_report(store, tmp_path / "out", formats=("md", "csv"))
    rows = md_table((tmp_path / "out" / "report.md").read_text(), "Largest batch that trains")
    assert rows == [["method", "resnet50", "wrn50_2"], ["none", "1707", ">= 8192"],
                    ["actnn", ">= 8192 (>= 4.8x)", ""], ["division B8 Q2", "5888 (3.4x)", ">= 8192"]]
    assert (tmp_path / "out" / "max_batch.csv").exists()

def test_throughput_accuracy_and_curves(tmp_path):
    store = tmp_path / "store"
    fill(store, speed_records() + train_records())
    fields, logger = run_report(store, tmp_path / "out")
    out = tmp_path / "out"
    text = (out / "report.md").read_text()
    speed = md_table(text, "Throughput")
    assert speed[1][:2] == ["none", "444.0"] and speed[2][1] == "370.0 (0.83x)"
    accuracy = md_table(text, "Top-1 accuracy")
    assert accuracy[0] == ["method", "resnet18 / cifar10, 3 epochs"]
    assert accuracy[2] == ["division B8 Q2", "94.70 / 94.70 (-0.20)"]
    for name in ("throughput_bars.png", "accuracy_bars.png", "training_curves.png"):
        assert name in fields["report_files"]
        with Image.open(out / name) as image:
            image.verify()
    assert set(logger.images) >= {"report/throughput_bars", "report/accuracy_bars", "report/training_curves"}


def test_accuracy_averages_seeds_and_compares_equal_training_lengths(tmp_path):
    """Seeds of one method and setting are averaged (mean, sample std, count); a rerun of a seed
    replaces its failed attempt; runs of another length get their own column."""
    def train(method, epochs, seed, final, status="ok"):
        return record(mode="train", model="resnet18", dataset="cifar10", method=method, epochs=epochs, seed=seed,
                      final_val_top1=final, best_val_top1=final + 0.1, status=status)
    store = tmp_path / "store"
    fill(store, [train("none", 55, 0, 90.0), train("none", 55, 1, 91.0),
                 train("division", 55, 0, 90.0, status="error"), train("division", 55, 0, 90.2),
                 train("division", 55, 1, 90.8), train("none", 30, 0, 89.5), train("actnn", 30, 0, 89.0)])
    run_report(store, tmp_path / "out")
    rows = md_table((tmp_path / "out" / "report.md").read_text(), "Top-1 accuracy")
    assert rows[0] == ["method", "resnet18 / cifar10, 30 epochs", "resnet18 / cifar10, 55 epochs"]
    table = {r[0]: r[1:] for r in rows[1:]}
    assert table["none"] == ["89.50 / 89.60", "90.50 ±0.71 / 90.60, 2 seeds"]
    assert table["division B8 Q2"] == ["", "90.50 ±0.42 / 90.60 (+0.00), 2 seeds"]
    assert table["actnn"] == ["89.00 / 89.10 (-0.50)", ""]  # (no bits in this record)


def test_block_bits_heatmaps(tmp_path):
    store = tmp_path / "store"
    fill(store, sweep_records())
    fields, _ = run_report(store, tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    grid = md_table(text, "memory: activation compression (ledger)")
    assert grid[0] == ["block size \\ bits", "Q=1", "Q=2", "Q=4", "Q=8"]
    assert [r[0] for r in grid[1:]] == ["B=2", "B=4", "B=8", "B=16"]
    assert grid[3][2] == "128.0"  # B=8, Q=2: 32 * 8 / 2
    heatmaps = [f for f in fields["report_files"] if f.startswith("sweep_") and f.endswith(".png")]
    assert len(heatmaps) == 1
    # 16 settings of one method are the heatmap's, not 16 bars with a 16-entry legend
    assert not [f for f in fields["report_files"] if f.endswith("_bars.png")]
    # On CPU activation_bytes is the ledger's count: one table, not the same numbers twice.
    assert "### Activation memory" not in text and "### Activations kept for backward" in text


def test_group_and_where_filters(tmp_path):
    store = tmp_path / "store"
    fill(store, paper_memory_records() + sweep_records())
    fields, _ = run_report(store, tmp_path / "a", group="block_bits")
    assert fields["report_runs"] == 16
    fields, _ = run_report(store, tmp_path / "b", where="model = 'resnet50' and batch_size >= 128")
    assert fields["report_runs"] == 12
    text = (tmp_path / "b" / "report.md").read_text()
    assert "resnet50 b64" not in text and "resnet50 b128" in text
    fields, _ = run_report(store, tmp_path / "c", group="block_bits", where="bits IN (1, 2) AND NOT block_size = 16")
    assert fields["report_runs"] == 6


def test_missing_group_fails_with_the_groups_there_are(tmp_path):
    store = tmp_path / "store"
    fill(store, paper_memory_records() + sweep_records() + [record(mode="report", group="only_a_report")])
    with pytest.raises(ConfigError, match=r"report.group='nope'.*its groups: block_bits, paper"):
        run_report(store, tmp_path / "out", group="nope")
    with pytest.raises(ConfigError, match="only_a_report"):  # a report run is not a group to report
        run_report(store, tmp_path / "out", group="only_a_report")
    assert not (tmp_path / "out").exists()


def test_error_runs_are_left_out_unless_asked_for(tmp_path):
    store = tmp_path / "store"
    fill(store, [record(method="none", ledger_bytes=GIB), record(method="division", ledger_bytes=GIB // 10),
                 record(method="actnn", status="error", error="RuntimeError: boom")])
    fields, _ = run_report(store, tmp_path / "a")
    text = (tmp_path / "a" / "report.md").read_text()
    assert fields["report_runs"] == 2 and "actnn" not in text
    assert "1 run with status error left out" in text
    fields, _ = run_report(store, tmp_path / "b", include_errors=True)
    assert fields["report_runs"] == 3
    assert md_table((tmp_path / "b" / "report.md").read_text(), "Activations kept")[2] == ["actnn", "error"]


def test_where_is_sql_that_can_only_filter(tmp_path):
    store = tmp_path / "store"
    fill(store, [record(model="resnet50", batch_size=64, group=None),
                 record(model="wrn50_2", batch_size=512, bits=2, method="actnn")])
    table = read_store_table(store)
    assert [r["batch_size"] for r in select_rows(table, None, "batch_size > 64 AND batch_size <= 512")] == [512]
    assert [r["model"] for r in select_rows(table, None, "bits IS NULL")] == ["resnet50"]
    assert [r["model"] for r in select_rows(table, None, "bits >= 2")] == ["wrn50_2"]  # null never orders
    assert len(select_rows(table, None, "model != 'resnet50' OR batch_size = 64")) == 2
    assert [r["model"] for r in select_rows(table, None, '"group" IS NULL')] == ["resnet50"]
    secret = tmp_path / "secret.csv"
    secret.write_text("x\n1\n")
    for bad in (f"run_id IN (SELECT * FROM read_csv('{secret}'))",          # reading a file
                f"(SELECT count(*) FROM glob('{tmp_path}/*')) > 0",          # listing files
                f"1 = 1; COPY runs TO '{tmp_path / 'out.csv'}'",             # a second statement
                "1 = 1); SET enable_external_access = true; SELECT (1",      # turning access back on
                "1 = 1 OR (SELECT count(*) FROM duckdb_settings()) > 0 AND 1 = (SELECT 1 FROM runs LIMIT 0)) --",
                "getenv('HOME') IS NOT NULL",                                # not a function here
                "__import__('os').system('true')"):
        with pytest.raises(ConfigError, match="report.where"):
            select_rows(table, None, bad)
    assert not (tmp_path / "out.csv").exists()
    with pytest.raises(ConfigError, match="modle"):
        select_rows(table, None, "modle = 'resnet50'")
    with pytest.raises(ConfigError, match="not a valid SQL condition"):
        select_rows(table, None, "model ==")


def test_empty_store_and_empty_selection_say_so(tmp_path):
    fields, _ = run_report(tmp_path / "missing", tmp_path / "a")
    assert fields["report_runs"] == 0 and "holds no runs" in fields["report_note"]
    assert "holds no runs" in (tmp_path / "a" / "report.md").read_text()
    assert "0 runs" in (tmp_path / "a" / "dashboard.html").read_text()
    store = tmp_path / "store"
    fill(store, paper_memory_records())
    fields, _ = run_report(store, tmp_path / "b", formats=["csv"], where="batch_size > 10000")
    assert fields["report_runs"] == 0 and "No run matched" in fields["report_note"]
    assert fields["report_files"] == ["report.md"]  # whatever the formats, one file says why it is empty


def test_only_some_fields_and_failed_runs(tmp_path):
    store = tmp_path / "store"
    fill(store, [record(method="none", batch_size=64, status="error", error="RuntimeError: boom"),
                 record(method="division", batch_size=64, ledger_bytes=GIB, activation_bytes=None),
                 record(mode="train", method="division", status="oom")])
    fields, _ = run_report(store, tmp_path / "out", include_errors=True)
    assert fields["report_runs"] == 3
    text = (tmp_path / "out" / "report.md").read_text()
    assert md_table(text, "Activations kept for backward")[1] == ["none", "error"]
    assert md_table(text, "Top-1 accuracy")[1][1] == "OOM"


def test_bad_settings_are_config_errors_before_any_file(tmp_path):
    with pytest.raises(ConfigError, match="report.formats"):
        run_report(tmp_path / "store", tmp_path / "out", formats=["pdf"])
    with pytest.raises(ConfigError, match="report.where"):
        run_report(tmp_path / "store", tmp_path / "out", where="__import__('os').system('true')")
    assert not (tmp_path / "out").exists()


def test_dashboard_is_self_contained(tmp_path):
    store = tmp_path / "store"
    fill(store, paper_memory_records() + speed_records() + train_records() + sweep_records())
    fields, _ = run_report(store, tmp_path / "out")
    page = (tmp_path / "out" / "dashboard.html").read_text()
    assert "<h1>DIVISION experiment report</h1>" in page
    assert f'id="run-count">{fields["report_runs"]} runs<' in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<script" not in page and "<link" not in page
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    assert "division B8 Q2" in page and "<table" in page


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed (apt-get install chromium)")
def test_dashboard_opens_in_headless_chromium(tmp_path):
    import subprocess
    import sys
    store = tmp_path / "store"
    fill(store, paper_memory_records() + sweep_records())
    fields, _ = run_report(store, tmp_path / "out")
    shot = tmp_path / "dashboard.png"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_dashboard.py"),
                           str(tmp_path / "out" / "dashboard.html"), "--runs", str(fields["report_runs"]),
                           "--expect", "division B8 Q2", "--expect", "OOM", "--screenshot", str(shot)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size[0] >= 800


def test_check_dashboard_finds_problems():
    """The checker itself, on pages that break each rule (no browser needed)."""
    spec = importlib.util.spec_from_file_location("check_dashboard", ROOT / "scripts" / "check_dashboard.py")
    check_dashboard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_dashboard)
    page = ('<html><body><h1>x</h1><p><span id="run-count">3 runs</span></p><img src="https://e.com/a.png">'
            '<table><tbody><tr><td>1</td></tr></tbody></table></body></html>')
    problems = "\n".join(check_dashboard.check_dom(page, runs=4, expect=["division"]))
    assert "run count says 3, expected 4" in problems and "https://e.com/a.png" in problems
    assert "text not found: 'division'" in problems
    assert check_dashboard.check_dom(page.replace("https://e.com/a.png", "data:,"), 3, []) == \
        ["image 0 is not an inline PNG ('data:,')"]


def test_compiled_and_graph_runs_get_their_own_tables_and_torch_op_codecs_are_named(tmp_path):
    store = tmp_path / "store"
    eager = [record(mode="speed", method=m, device="cuda", images_per_sec=v, kernels=k)
             for m, v, k in (("none", 400.0, None), ("division", 380.0, "triton"), ("actnn", 90.0, "pytorch"))]
    compiled = [record(mode="speed", method=m, device="cuda", compile="max-autotune-no-cudagraphs", images_per_sec=v)
                for m, v in (("none", 500.0), ("division", 300.0))]
    graphed = [record(mode="speed", method="none", device="cuda", cuda_graph=True, images_per_sec=600.0)]
    fill(store, eager + compiled + graphed)
    run_report(store, tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    titles = [line for line in text.splitlines() if line.startswith("### Throughput")]
    assert titles == ["### Throughput - synthetic, fp32, cuda (images/s)",
                      "### Throughput - synthetic, fp32, cuda, compile-max-autotune-no-cudagraphs (images/s)",
                      "### Throughput - synthetic, fp32, cuda, cuda_graph (images/s)"]
    assert md_table(text, "Throughput - synthetic, fp32, cuda (")[2] == ["actnn", "90.0 (0.23x)"]
    assert md_table(text, "Throughput - synthetic, fp32, cuda, compile")[2] == ["division B8 Q2", "300.0 (0.60x)"]
    assert "codecs run as PyTorch ops, not fused kernels: actnn" in text


def test_tradeoff_figures_and_loss_beside_top1(tmp_path):
    """Memory against throughput (memory and speed runs of the same model and batch) and memory against
    accuracy, one point per method and setting; training curves show the loss next to top-1."""
    from runners.report_tables import accuracy_tradeoff, speed_tradeoffs
    rows = [r for r in paper_memory_records() + speed_records() if r["batch_size"] <= 128]
    (title, points), = speed_tradeoffs(rows)
    division = {p.setting: (round(p.x, 1), round(p.y, 2)) for p in points if p.method == "division B8 Q2"}
    assert division == {"resnet50 b64": (10.5, 0.83), "resnet50 b128": (10.5, 0.82)}
    assert {(p.method, p.x, p.y) for p in points if p.setting == "resnet50 b64"} >= {("none", 1.0, 1.0)}
    assert "Memory against throughput" in title
    train = train_records()
    train[0]["ledger_ratio"] = 1.0
    assert sorted((p.method, p.x, p.y) for p in accuracy_tradeoff(train)) == [("division B8 Q2", 10.0, 94.7),
                                                                               ("none", 1.0, 94.9)]
    store = tmp_path / "store"
    fill(store, rows + train)
    fields, _ = run_report(store, tmp_path / "out")
    for name in ("tradeoff_speed_0.png", "tradeoff_accuracy.png", "training_curves.png"):
        assert name in fields["report_files"], name
    with Image.open(tmp_path / "out" / "training_curves.png") as image:
        width, height = image.size
    assert width > 1.8 * height  # two panels side by side: loss and top-1


def test_fidelity_table_keeps_rebuilt_runs_apart_and_shows_the_ledger_ratio():
    """A run with ``method.rebuild_conv_input`` is its own row ("... rebuild"), not a later copy of
    the same B and Q that replaces the stored one; the ledger ratio is shown where recorded."""
    from runners.report_tables import fidelity_table, method_label
    runs = [record(mode="fidelity", method="division", bits=2, batch_size=4, relu_zeros=True,
                   rebuild_conv_input=rebuild, grad_cosine=cosine, grad_rel_error=0.5,
                   grad_worst_cosine=0.3, ledger_ratio=ratio)
            for rebuild, cosine, ratio in ((False, 0.74, 11.5), (True, 0.60, 13.2))]
    assert [method_label(r) for r in runs] == ["division B8 Q2", "division B8 Q2 rebuild"]
    table = fidelity_table(runs)
    assert table.columns[-1] == "activation compression (ledger)"
    assert [(row[2], row[4], row[-1]) for row in table.rows] == [
        ("division B8 Q2", "0.74000", "11.5x"), ("division B8 Q2 rebuild", "0.60000", "13.2x")]
    # records without a ledger ratio (made before it was kept) get no empty column
    old = [{**r, "ledger_ratio": None} for r in runs]
    assert fidelity_table(old).columns[-1] == "worst layer cosine"


def test_a_fused_norm_run_is_its_own_row_in_python_and_in_sql(tmp_path):
    """``method.fused_norm=true`` (the compiled BatchNorm in its input's encode) names its own row
    ("... fused-norm") beside the same B and Q without it, in the Python label and the report's SQL."""
    from runners.report_tables import method_label
    runs = [record(method="division", fused_norm=fused, activation_bytes=act, ledger_bytes=act, total_bytes=act,
                   peak_bytes=act) for fused, act in ((False, GIB), (True, GIB // 2))]
    want = ["division B8 Q2", "division B8 Q2 fused-norm"]
    assert [method_label(r) for r in runs] == want
    store = tmp_path / "store"
    fill(store, runs)
    run_report(store, tmp_path / "out", formats=("md",))
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert [row[0] for row in md_table(markdown, "Activation memory")[1:]] == want


def test_attention_and_probability_bits_other_than_the_defaults_name_their_own_rows(tmp_path):
    """A run with method.attention_bits or method.probability_bits off their defaults (8, 4) is its
    own row ("... A4", "... P8"), in the Python label and in the report's SQL alike; records made
    before the knobs were recorded (null) keep the plain label."""
    from runners.report_tables import method_label
    runs = [record(method="division", attention_bits=a, probability_bits=p, activation_bytes=act,
                   ledger_bytes=act, total_bytes=act, peak_bytes=act)
            for a, p, act in ((8, 4, GIB), (4, 4, GIB // 2), (8, 8, GIB // 3), (0, 2, GIB // 4), (None, None, GIB // 5))]
    want = ["division B8 Q2", "division B8 Q2 A4", "division B8 Q2 P8", "division B8 Q2 A0 P2", "division B8 Q2"]
    assert [method_label(r) for r in runs] == want
    store = tmp_path / "store"
    fill(store, runs[:4])
    fields, _ = run_report(store, tmp_path / "out", formats=("md",))
    markdown = (tmp_path / "out" / "report.md").read_text()
    labels = [row[0] for row in md_table(markdown, "Activation memory")[1:]]
    assert sorted(labels) == sorted(want[:4]), labels


def test_operator_table_breaks_each_compressing_run_down_by_the_ledger_operators():
    """Per memory run of a compressing method: one row per operator type, largest plain bytes
    first, then "all"; reduction = plain / kept; kept raw = share of plain bytes stored as they
    were. Plain runs and failed runs have no breakdown."""
    import json

    from runners.report_tables import operator_tables
    mib = 2 ** 20
    by_op = {"ReLU": {"plain_bytes": 32 * mib, "stored_bytes": mib, "raw_plain_bytes": 0, "tensors": 2},
             "BatchNorm2d": {"plain_bytes": 64 * mib, "stored_bytes": 8 * mib, "raw_plain_bytes": 4 * mib,
                             "tensors": 3}}
    runs = [record(method="division", ledger_by_op=json.dumps(by_op)),
            record(method="none", ledger_by_op=json.dumps(by_op)),
            record(method="actnn", bits=2, status="oom", ledger_by_op=json.dumps(by_op))]
    (table,) = operator_tables(runs)
    assert table.key == "memory_by_op" and table.columns[2:] == ["operator", "plain MiB", "kept MiB", "reduction",
                                                                  "kept raw"]
    assert [row[1:] for row in table.rows] == [
        ["division B8 Q2", "BatchNorm2d", "64.0", "8.0", "8.0x", "6.2%"],
        ["division B8 Q2", "ReLU", "32.0", "1.0", "32.0x", "0.0%"],
        ["division B8 Q2", "all", "96.0", "9.0", "10.7x", "4.2%"]]
    assert table.rows[0][0] == "resnet50 b64"
    assert operator_tables([runs[1]]) == []
