"""scripts/step_time.py's ``tuning:`` overrides: set for one variant, restored after, checked."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from division import triton_norm, triton_plan

_SPEC = importlib.util.spec_from_file_location("step_time", Path(__file__).resolve().parents[1] / "scripts" / "step_time.py")
step_time = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(step_time)


def test_tuning_overrides_apply_for_the_variant_and_are_restored():
    before = (triton_norm.TUNING["fused_forward"], triton_plan.TUNING["split_warps_per_sm"])
    with step_time.tuned(["tuning:triton_norm.fused_forward=false", "tuning:triton_plan.split_warps_per_sm=7"]):
        assert triton_norm.TUNING["fused_forward"] is False
        assert triton_plan.TUNING["split_warps_per_sm"] == 7
    assert (triton_norm.TUNING["fused_forward"], triton_plan.TUNING["split_warps_per_sm"]) == before


def test_unknown_tuning_entry_names_the_entries_and_restores_the_rest():
    before = triton_norm.TUNING["grad_steps"]
    with pytest.raises(KeyError, match="has no entry 'no_such_knob'.*fused_forward"):
        with step_time.tuned(["tuning:triton_norm.grad_steps=9", "tuning:triton_norm.no_such_knob=1"]):
            pass
    assert triton_norm.TUNING["grad_steps"] == before
