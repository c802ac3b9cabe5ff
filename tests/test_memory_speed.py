"""mode=memory and mode=speed through the same Hydra composition and job as main.py.

On CPU by default; the CUDA tests at the end are opt-in (``pytest -m gpu``).
"""
from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

import runners.memory as memory
from runners.gpu_memory import free_after_oom
from runners.job import run_job
from runners.speed import percentile

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

ALLOCATOR_FIELDS = ("cuda_baseline_bytes", "model_bytes", "optimizer_state_bytes", "grad_bytes",
                    "runtime_bytes", "total_bytes", "peak_bytes", "reserved_peak_bytes")


def run(tmp: Path, name: str, *overrides: str) -> dict:
    """Compose the config as main.py does and run one job in ``tmp/name``."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=resnet20", "dataset=synthetic", "batch_size=8", "logger=none", "device=cpu",
            f"results_dir={tmp}/store", *overrides])
    return run_job(cfg, tmp / name)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("memory_speed")


@pytest.fixture(scope="module")
def division(store) -> dict:
    """DIVISION at the paper's setting (B=8, Q=2), two steps as configured by default."""
    return run(store, "division", "mode=memory", "method=division")


def test_memory_record_on_cpu(division):
    assert division["status"] == "ok"
    assert division["device"] == "cpu"
    assert division["memory_steps"] == 2
    assert division["activation_bytes"] > 0
    assert division["activation_bytes"] == division["ledger_bytes"]  # on CPU the ledger is the figure
    assert division["activation_bytes_per_image"] == division["activation_bytes"] / 8
    for field in ALLOCATOR_FIELDS:
        assert division[field] is None, field  # no allocator on CPU: null, never an estimate
    assert division["param_bytes"] > 0
    assert division["batch_bytes"] == 8 * 3 * 32 * 32 * 4 + 8 * 8  # fp32 images + int64 labels
    assert division["output_bytes"] == 8 * 10 * 4


def test_division_ledger_ratio(division):
    # Measured: 11.2x for resnet20 at 32x32, B=8, Q=2 (1.04 MiB kept vs 11.6 MiB plain).
    assert division["ledger_plain_bytes"] / division["ledger_bytes"] > 8
    assert division["ledger_ratio"] == pytest.approx(division["ledger_plain_bytes"] / division["ledger_bytes"])
    assert set(division["ledger_by_codec"]) >= {"division", "relu_mask"}
    layers = division["ledger_layers"]
    assert layers and {"layer", "kind", "plain_bytes", "stored_bytes", "tensors"} <= set(layers[0])
    assert sum(row["stored_bytes"] for row in layers) == division["ledger_bytes"]


def test_plain_autograd_ratio_is_one_and_no_max_batch_on_cpu(tmp_path):
    record = run(tmp_path, "none", "mode=memory", "method=none", "memory.steps=1",
                 "memory.find_max_batch=true")
    assert record["status"] == "ok"
    assert record["ledger_ratio"] == 1.0
    assert record["activation_bytes"] == record["ledger_plain_bytes"]
    assert record["max_batch"] is None  # the search needs CUDA


def test_more_bits_keep_more_bytes(division, tmp_path):
    eight = run(tmp_path, "q8", "mode=memory", "method=division", "method.bits=8", "memory.steps=1")
    assert eight["ledger_plain_bytes"] == division["ledger_plain_bytes"]
    assert eight["activation_bytes"] > division["activation_bytes"]


def test_smaller_blocks_keep_more_bytes(division, tmp_path):
    two = run(tmp_path, "b2", "mode=memory", "method=division", "method.block_size=2", "memory.steps=1")
    assert two["activation_bytes"] > division["activation_bytes"]


def test_speed_record(tmp_path):
    record = run(tmp_path, "speed", "mode=speed", "method=none", "speed.warmup=1", "speed.steps=3")
    assert record["status"] == "ok"
    assert record["images_per_sec"] > 0
    assert record["steps_timed"] == 3 and record["warmup_steps"] == 1
    assert record["step_ms_p10"] <= record["step_ms_median"] <= record["step_ms_p90"]
    assert record["images_per_sec"] == pytest.approx(8 / (record["step_ms_median"] / 1000))
    assert record["timer"] == "perf_counter"


def test_injected_oom_is_recorded_and_frees_the_step(tmp_path, monkeypatch):
    """Out of memory at the classifier, after every conv has saved its activations for backward.

    Plain autograd with the ledger is the hard case: its raw saves of ReLU outputs form cycles
    with the graph that only backward (or the runner's clean-up) breaks.
    """
    conv_outputs = []

    def model_that_runs_out_of_memory(cfg, num_classes, device):
        model = real_build_model(cfg, num_classes, device)
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.register_forward_hook(lambda m, i, out: conv_outputs.append(weakref.ref(out)))
        classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]

        def forward(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        classifier.forward = forward
        return model

    real_build_model = memory.build_model
    monkeypatch.setattr(memory, "build_model", model_that_runs_out_of_memory)
    record = run(tmp_path, "oom", "mode=memory", "method=none")  # returns: an OOM is a result
    assert record["status"] == "oom"
    assert "OutOfMemoryError" in record["error"]
    assert "activation_bytes" not in record
    written = json.loads((tmp_path / "oom" / "results.json").read_text())
    assert written["status"] == "oom"
    assert conv_outputs and all(ref() is None for ref in conv_outputs)


def test_free_after_oom_drops_the_failed_frames():
    def step():
        activations = torch.ones(1024)
        held.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    held = []
    try:
        step()
    except torch.OutOfMemoryError as exc:
        assert held[0]() is not None  # the traceback keeps the frame's tensor alive...
        free_after_oom(exc)
        assert held[0]() is None  # ...until its frames are cleared, while exc is still alive


@pytest.mark.parametrize("threshold, limit, expected", [
    (37, 8192, (37, False)),     # doubles 8 -> 16 -> 32 -> 64 (fails), then bisects to 37
    (8, 8192, (8, False)),       # the configured batch is already the largest
    (10_000, 100, (100, True)),  # never ran out of memory: capped at the limit
])
def test_max_batch_search(monkeypatch, threshold, limit, expected):
    tried = []

    def fits(cfg, device, batch_size):
        tried.append(batch_size)
        return batch_size <= threshold

    monkeypatch.setattr(memory, "_fits", fits)
    assert memory.find_max_batch(None, torch.device("cpu"), 8, limit) == expected
    assert max(tried) <= limit


def test_percentile_interpolates():
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.1) == pytest.approx(1.3)
    assert percentile([5.0], 0.9) == 5.0


# ------------------------------------------------------------------- CUDA (opt-in: pytest -m gpu)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", ["none", "division"])
def test_cuda_memory_fields_add_up(tmp_path, method):
    gc.collect()
    held_before = torch.cuda.memory_allocated()  # what earlier tests of this process still hold
    record = run(tmp_path, method, "mode=memory", f"method={method}", "device=cuda", "batch_size=64")
    assert record["status"] == "ok"
    # Each allocator figure against what it must hold, counted independently from the tensors
    # (the caching allocator rounds every block up to 512 bytes). activation_bytes and runtime_bytes
    # are what is left of total once the parts are taken out, so the parts are where it can go wrong.
    from models import build_model
    reference = build_model("resnet20", num_classes=10)
    params = [p for p in reference.parameters() if p.requires_grad]
    blocks = lambda tensors: sum(-(-t.numel() * t.element_size() // 512) * 512 for t in tensors)  # noqa: E731
    assert record["model_bytes"] == pytest.approx(blocks([*reference.parameters(), *reference.buffers()]), rel=0.02)
    assert record["grad_bytes"] == pytest.approx(blocks(params), rel=0.02)
    assert record["optimizer_state_bytes"] == pytest.approx(blocks(params), rel=0.02)  # SGD momentum: one per param
    assert record["batch_bytes"] == 64 * 3 * 32 * 32 * 4 + 64 * 8
    assert record["activation_bytes"] > 0 and record["output_bytes"] == 64 * 10 * 4
    assert record["total_bytes"] > record["model_bytes"] + record["optimizer_state_bytes"] + record["activation_bytes"]
    assert record["peak_bytes"] >= record["total_bytes"]
    # Reserved and allocated are each read against their own baseline; the baseline segments'
    # slack can absorb a little of the step's allocations.
    assert record["reserved_peak_bytes"] >= 0.9 * record["peak_bytes"]
    assert 0 <= record["runtime_bytes"] < 2 ** 20  # cuBLAS workspaces are in the baseline
    # The job adds nothing to what the process held before it (priming's workspaces aside).
    assert record["cuda_baseline_bytes"] - held_before < memory.LEFTOVER_WARNING_BYTES
    assert record["grad_bytes"] > 0 and record["optimizer_state_bytes"] > 0
    # The allocator sees what the ledger counts, less the input batch (saved by reference, counted
    # by the ledger, subtracted as batch here) and plus the loss's saves and allocator rounding.
    assert record["activation_bytes"] == pytest.approx(record["ledger_bytes"], rel=0.1)


@pytest.mark.gpu
@needs_cuda
def test_cuda_oom_frees_the_gpu_and_the_next_job_runs(tmp_path):
    gc.collect()
    before = torch.cuda.memory_allocated()  # what earlier tests of this process still hold
    record = run(tmp_path, "oom", "mode=memory", "method=none", "device=cuda", "batch_size=200000")
    assert record["status"] == "oom"
    assert torch.cuda.memory_allocated() - before < 2 ** 20
    after = run(tmp_path, "after", "mode=memory", "method=none", "device=cuda", "batch_size=64")
    assert after["status"] == "ok"
    assert after["cuda_baseline_bytes"] - before < memory.LEFTOVER_WARNING_BYTES


@pytest.mark.gpu
@needs_cuda
def test_cuda_max_batch_and_speed(tmp_path):
    found = run(tmp_path, "max", "mode=memory", "method=division", "device=cuda", "batch_size=64",
                "memory.find_max_batch=true", "memory.max_batch_limit=200")
    assert found["max_batch"] == 200 and found["max_batch_capped"] is True
    speed = run(tmp_path, "speed", "mode=speed", "method=division", "device=cuda", "batch_size=64")
    assert speed["timer"] == "cuda_events" and speed["steps_timed"] == 15
    assert speed["step_ms_p10"] <= speed["step_ms_median"] <= speed["step_ms_p90"]


def _queued_run(folder: str, size: int, seconds: float, spans: list) -> None:
    """A stand-in run of the queue: warm up for ``seconds``, then note its timed span."""
    import time
    from omegaconf import OmegaConf
    from runners.speed_queue import timing_turn
    cfg = OmegaConf.create({"speed": {"queue": folder, "queue_size": size, "queue_timeout": 60}})
    time.sleep(seconds)
    with timing_turn(cfg):
        start = time.monotonic()
        time.sleep(0.3)
        spans.append((start, time.monotonic()))


def test_speed_queue_times_runs_one_at_a_time_after_all_are_warm(tmp_path):
    """Three runs warm up for 0, 0.5 and 1 s: none is timed before the last is warm, and no two
    timed spans overlap. (Threads: each opens the lock file itself, and flock excludes between open
    files, as between processes.)"""
    import threading
    import time
    folder, spans = str(tmp_path / "queue"), []
    started = time.monotonic()
    runs = [threading.Thread(target=_queued_run, args=(folder, 3, warm, spans)) for warm in (0.0, 0.5, 1.0)]
    for run_ in runs:
        run_.start()
    for run_ in runs:
        run_.join(60)
    spans.sort()
    assert len(spans) == 3
    assert spans[0][0] >= started + 1.0  # the slowest run's warm-up came first
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))


def test_a_queued_run_that_fails_while_warming_up_is_not_waited_for(tmp_path):
    """One of two queued runs raises while it warms up (a compile error): the other is timed at
    once, not after the queue's timeout (60 s here), and the failure still reaches its caller."""
    import threading
    import time
    from omegaconf import OmegaConf
    from runners.speed_queue import leaving_on_failure
    folder, spans, errors = str(tmp_path / "queue"), [], []

    def failing() -> None:
        cfg = OmegaConf.create({"speed": {"queue": folder, "queue_size": 2, "queue_timeout": 60}})
        try:
            with leaving_on_failure(cfg):
                time.sleep(0.3)
                raise RuntimeError("compile failed")
        except RuntimeError as error:
            errors.append(str(error))
    started = time.monotonic()
    runs = [threading.Thread(target=failing), threading.Thread(target=_queued_run, args=(folder, 2, 0.0, spans))]
    for run_ in runs:
        run_.start()
    for run_ in runs:
        run_.join(60)
    assert errors == ["compile failed"]
    assert len(spans) == 1 and spans[0][1] - started < 10


def test_speed_queue_times_the_arrived_runs_after_its_timeout(tmp_path, caplog):
    from runners.speed_queue import wait_for_all
    assert wait_for_all(tmp_path, size=2, timeout_s=0.2) == 1
    assert "1 of 2 runs warmed up" in caplog.text


def test_speed_record_through_a_queue_of_one(tmp_path):
    record = run(tmp_path, "queued", "mode=speed", "method=division", "speed.warmup=1", "speed.steps=2",
                 f"speed.queue={tmp_path}/queue", "speed.queue_size=1")
    assert record["steps_timed"] == 2 and record["images_per_sec"] > 0
    assert (tmp_path / "queue" / "lock").exists()
