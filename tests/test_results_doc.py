"""docs/results.md is generated from the records under docs/records: its blocks equal what the records
give, no table stands outside a block, and no table mixes code versions."""
from __future__ import annotations

import importlib.util
import re
import uuid
from pathlib import Path

import pytest

from runners.record import STORE_SCHEMA, code_version, read_store_table, write_store_row
from runners.report import build_sections
from runners.report_query import as_table

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("results_doc", ROOT / "scripts" / "results_doc.py")
results_doc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results_doc)
_spec = importlib.util.spec_from_file_location("bench_records", ROOT / "scripts" / "bench_records.py")
bench_records = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_records)


def test_results_md_is_what_its_records_give():
    text = (ROOT / "docs" / "results.md").read_text()
    assert results_doc.regenerate(text) == text, "docs/results.md is stale: run python scripts/results_doc.py"


def test_no_table_outside_a_generated_block():
    text = (ROOT / "docs" / "results.md").read_text()
    outside = results_doc.BLOCK.sub("", text)
    tables = [line for line in outside.splitlines() if line.lstrip().startswith("|")]
    assert tables == [], f"tables typed into docs/results.md outside a generated block: {tables[:3]}"
    assert len(results_doc.BLOCK.findall(text)) >= 4
    # the CPU sets are committed and filled, so their blocks hold tables, not the missing-records line
    for name in ("cpu-ledger", "cpu-block-bits", "cpu-fidelity", "cpu-default"):
        assert (ROOT / "docs" / "records" / name / "records.jsonl").is_file(), name
        block = re.search(rf"<!-- generated: {name}/.*?<!-- end generated -->", text, re.S).group(0)
        assert "\n| " in block and "Not yet measured" not in block, name
    # committed as text: no binary store file under docs/records
    assert not list((ROOT / "docs" / "records").rglob("*.parquet"))


def test_committed_records_name_no_machine_folder():
    """docs/records is committed: a record's run_dir is relative to where the runs were started
    (runners.record.record_run_dir), never an absolute folder of the machine that made it."""
    records = [r for folder in sorted((ROOT / "docs" / "records").iterdir()) if folder.is_dir()
               for r in read_store_table(folder).to_pylist()]
    assert records
    absolute = [(r["run_id"], r["run_dir"]) for r in records if r["run_dir"] and Path(r["run_dir"]).is_absolute()]
    assert absolute == [], absolute[:3]


def _record(version: str | None, method: str, final: float, seed: int = 0) -> dict:
    return dict(run_id=uuid.uuid4().hex[:12], mode="train", model="resnet18", dataset="cifar10", method=method,
                batch_size=256, device="cuda", precision="bf16", seed=seed, group="acc", status="ok", epochs=55,
                started_at=f"2026-01-01T00:00:{seed:02d}", final_val_top1=final, best_val_top1=final,
                code_version=version)


def _doc(block: str) -> str:
    return f"# x\n\ntext\n\n<!-- generated: {block} -->\nold\n<!-- end generated -->\n\nmore text\n"


def test_missing_set_mixed_versions_and_unknown_tables(tmp_path):
    records = tmp_path / "records"
    text = results_doc.regenerate(_doc("nothing-yet/accuracy*"), records)
    assert "Not yet measured in this release: docs/records/nothing-yet/ holds no records" in text
    assert "\n|" not in text and text.endswith("<!-- end generated -->\n\nmore text\n")

    for method, final in (("none", 90.0), ("division", 90.5)):
        write_store_row(_record("v1", method, final), records / "one")
    text = results_doc.regenerate(_doc("one/accuracy"), records)
    assert "_Top-1 accuracy, final / best - code v1 (%)" in text
    assert "| division B8 Q2 |" not in text and "| division | 90.50 / 90.50 (+0.50) |" in text
    assert results_doc.regenerate(text, records) == text  # regenerating is idempotent

    with pytest.raises(results_doc.DocError, match="no table 'memory_peak'; its tables: accuracy, training, runs"):
        results_doc.regenerate(_doc("one/memory_peak"), records)
    write_store_row(_record("v2", "division", 91.0, seed=1), records / "one")
    with pytest.raises(results_doc.DocError, match=r"2 code versions \(v1, v2\).*must not mix code releases"):
        results_doc.regenerate(_doc("one/accuracy"), records)
    with pytest.raises(results_doc.DocError, match="well-formed"):
        results_doc.regenerate("<!-- generated: one/accuracy -->\nno end\n", records)


def _bench_result() -> dict:
    """What python -m division.bench --out writes (the fields the records read), two rows."""
    def fast(c_s, d_s, nbytes):
        return {"compress_s": c_s, "decompress_s": d_s, "compress_GBps": nbytes / c_s / 1e9,
                "decompress_GBps": nbytes / d_s / 1e9, "combined_GBps": 2 * nbytes / (c_s + d_s) / 1e9}
    return {"device": "NVIDIA H200", "copy_GBps": 4000.0, "code_version": "v9",
            "started_at": "2026-01-01T00:00:00+00:00", "codec": {"block_size": 8, "bits": 2, "rounding": "stochastic"},
            "rows": [{"shape": [256, 64, 56, 56], "dtype": "fp32", "format": "NCHW", "fast": fast(1e-6, 1e-6, 2.6e6),
                      "ref": {"compress_s": 1e-5, "decompress_s": 1e-5}},
                     {"shape": [128, 2048, 7, 7], "dtype": "bf16", "format": "NHWC", "fast": fast(5e-4, 3e-4, 1e6),
                      "ref": None}]}


def test_kernel_and_largest_batch_blocks_fill_from_their_records(tmp_path):
    """The kernels and largest-batch sections of docs/results.md are blocks like the others: made by
    mode=report's tables over records (division.bench's JSON through scripts/bench_records.py, and
    memory.find_max_batch runs), 'not yet measured' while their set is empty."""
    records = tmp_path / "records"
    text = results_doc.regenerate(_doc("kernels/kernels") + _doc("mb/max_batch*"), records)
    assert text.count("Not yet measured in this release") == 2
    for record in bench_records.bench_records(_bench_result()):
        write_store_row(record, records / "kernels")
    text = results_doc.regenerate(_doc("kernels/kernels"), records)
    assert "_Codec bandwidth - NVIDIA H200, code v9: fused kernels;" in text and "(4000 GB/s, read + write)" in text
    assert "| 256x64x56x56 NCHW | fp32 | division B8 Q2 | 2600 | 2600 | 65% | 10.0x |" in text
    assert "| 128x2048x7x7 NHWC | bf16 | division B8 Q2 | 2 | 3 | 0% |  |" in text
    for method, found in (("none", 1707), ("division", 5888)):
        write_store_row(dict(run_id=uuid.uuid4().hex[:12], mode="memory", model="resnet50", dataset="synthetic",
                             method=method, batch_size=256, device="cuda", precision="fp32", status="ok",
                             started_at="2026-01-01T00:00:00", code_version="v9", max_batch=found,
                             max_batch_capped=False), records / "mb")
    text = results_doc.regenerate(_doc("mb/max_batch*"), records)
    assert "| none | 1707 |" in text and "| division | 5888 (3.4x) |" in text


def test_report_never_averages_two_code_versions(tmp_path):
    """In mode=report, runs of two code versions get one accuracy table each (a record written before
    code_version existed reads as 'not recorded'), not one cell averaged over both."""
    store = tmp_path / "store"
    for record in (_record("v1", "none", 90.0), _record("v1", "division", 90.0, seed=1),
                   _record("v2", "division", 92.0, seed=2), _record(None, "division", 50.0, seed=3)):
        write_store_row(record, store)
    table = read_store_table(store)
    assert table.schema.equals(STORE_SCHEMA) and table.column("code_version").null_count == 1
    tables = {t.key: t for s in build_sections(table, with_figures=False) for t in s.tables}
    assert {k for k in tables if k.startswith("accuracy")} == {"accuracy_v1", "accuracy_v2", "accuracy_not_recorded"}
    assert tables["accuracy_v1"].rows == [["none", "90.00 / 90.00"], ["division", "90.00 / 90.00 (+0.00)"]]
    assert tables["accuracy_v2"].rows == [["division", "92.00 / 92.00"]]
    assert tables["accuracy_not_recorded"].title.startswith("Top-1 accuracy, final / best - code not recorded")


def test_memory_tables_keep_their_key_across_releases(tmp_path):
    """One code version: the table's key has no version in it (a docs block keeps its name from one
    release to the next); two, or one beside records without it: one table each, keys apart."""
    def memory(version, method, kept):
        return dict(run_id=uuid.uuid4().hex[:12], mode="memory", model="resnet18", dataset="synthetic", method=method,
                    batch_size=32, device="cpu", precision="fp32", status="ok", started_at="2026-01-01T00:00:00",
                    ledger_bytes=kept, ledger_plain_bytes=1000, code_version=version)

    def keys(records):
        table = as_table(records)
        return {t.key: t.title for s in build_sections(table, with_figures=False) for t in s.tables
                if t.key.startswith("memory")}
    assert keys([memory("v1", "none", 1000), memory("v1", "division", 100)]) == {
        "memory_ledger": "Activations kept for backward (exact byte ledger) - synthetic, fp32, cpu, code v1 (KiB)"}
    assert set(keys([memory("v1", "none", 1000), memory(None, "none", 1000)])) == {
        "memory_ledger_synthetic_fp32_cpu", "memory_ledger_synthetic_fp32_cpu_code_v1"}
    assert set(keys([memory("v1", "none", 1000), memory("v2", "none", 1000)])) == {
        "memory_ledger_synthetic_fp32_cpu_code_v1", "memory_ledger_synthetic_fp32_cpu_code_v2"}


def test_records_name_their_code_version(monkeypatch):
    monkeypatch.delenv("DIVISION_CODE_VERSION", raising=False)
    code_version.cache_clear()
    version = code_version()
    assert version and version != "unknown" and re.fullmatch(r"[\w.-]+", version)
    monkeypatch.setenv("DIVISION_CODE_VERSION", "v0.2-5-gabc1234")  # a copy of the code without .git
    code_version.cache_clear()
    try:
        assert code_version() == "v0.2-5-gabc1234"
    finally:
        monkeypatch.delenv("DIVISION_CODE_VERSION")
        code_version.cache_clear()
