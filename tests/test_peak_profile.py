"""scripts/peak_profile.py's replay of an allocator trace: the peak, what is alive at it, the marks."""
from __future__ import annotations

import importlib.util
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("peak_profile", _ROOT / "scripts" / "peak_profile.py")
peak_profile = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(peak_profile)

_OURS = [{"filename": str(_ROOT / "division" / "rebuild.py"), "line": 7, "name": "decode"},
         {"filename": "/site-packages/torch/autograd/graph.py", "line": 1, "name": "unpack"}]
_TORCH = [{"filename": "/site-packages/torch/nn/modules/conv.py", "line": 3, "name": "forward"}]
_MARK = [{"filename": str(_ROOT / "scripts" / "peak_profile.py"), "line": 1, "name": peak_profile.MARKER}]


def _alloc(addr, size, frames):
    return {"action": "alloc", "addr": addr, "size": size, "frames": frames}


def _free(addr, size):
    return {"action": "free_completed", "addr": addr, "size": size}


def test_replay_finds_the_peak_the_blocks_alive_at_it_and_the_marks():
    trace = [_alloc(1, 100, _TORCH), _alloc(2, 4, _MARK), _alloc(3, 300, _OURS),
             # a block freed only when requested is still allocated: free_requested is not a free
             {"action": "free_requested", "addr": 3, "size": 300},
             _alloc(4, 50, []), _free(3, 300), _free(1, 100), _alloc(5, 4, _MARK), _alloc(6, 200, _TORCH)]
    curve, best, best_at, live, marks = peak_profile.replay(trace)
    assert curve == [100, 104, 404, 404, 454, 154, 54, 58, 258]
    assert (best, best_at) == (454, 4)
    assert sorted(live) == [1, 2, 3, 4]
    assert marks == [1, 7]


def test_a_block_allocated_before_the_recording_lowers_the_level_when_freed():
    """The last step's gradients, freed by zero_grad during the recorded step, were allocated before
    it: their free takes the level below the floor it was counted in, instead of being ignored (which
    counted them twice once backward made the new ones)."""
    trace = [_alloc(1, 100, _TORCH), _free(9, 60), _alloc(2, 50, _TORCH)]
    curve, best, best_at, live, _ = peak_profile.replay(trace)
    assert curve == [100, 40, 90]
    assert (best, best_at) == (100, 0)


def test_frame_label_names_the_project_frame_first_then_torch():
    assert peak_profile.frame_label(_OURS) == "division/rebuild.py:7 decode"
    assert peak_profile.frame_label(_TORCH) == "torch/nn/modules/conv.py:3 forward"
    assert peak_profile.frame_label([]) == "(no Python frame)"


def test_cpu_replay_of_a_training_step(tmp_path):
    """``--device cpu``: the CPU allocator's events of one step (torch.profiler) replayed as the GPU
    trace is. Plain training peaks at the start of backward, with every activation alive; DIVISION
    keeps codes and peaks at least twice lower above the floor, which both share (the tensors held
    between steps). The report and the curve are written, and the peak block sites are named with
    the op they ran in."""
    import re
    import subprocess
    import sys

    found = {}
    for method in ("none", "division"):
        out = subprocess.run([sys.executable, str(_ROOT / "scripts" / "peak_profile.py"), str(tmp_path),
                              "--label", method, "--device", "cpu", "--", "model=resnet20", "batch_size=32",
                              f"method={method}", "logger=none"],
                             capture_output=True, text=True, timeout=300, cwd=_ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        text = (tmp_path / f"{method}_peak.txt").read_text()
        above, floor, phase = re.search(r"CPU allocator \(torch.profiler\): ([\d.]+) GiB above the floor; floor "
                                        r"\(tensors held between steps\) ([\d.]+) GiB; .*\((after \w+)[,)]", text).groups()
        found[method] = (float(above), float(floor), phase)
        assert (tmp_path / f"{method}_curve.csv").read_text().count("\n") > 10
        assert re.search(r"\[(aten::\w+|\w+Backward\d*)\]", text), text
    assert found["none"][2] == "after before_backward", found
    assert found["none"][1] == found["division"][1] > 0, found
    assert 0 < 2 * found["division"][0] < found["none"][0], found


def test_lifetimes_name_the_events_that_made_and_freed_each_block():
    trace = [_alloc(1, 100, _TORCH), _alloc(2, 50, _OURS), _free(2, 50), _alloc(2, 60, []), _free(1, 100)]
    assert peak_profile.lifetimes(trace, [trace[0], trace[3]], 3) == [(0, 4), (3, "-")]
