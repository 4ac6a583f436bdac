"""One smoke test of the host calibration, in its quick mode (no timing is asserted)."""
import math

from attnfx.cost_model.calibrate import calibrate


def test_quick_calibration_measures_every_rate():
    profile = calibrate(threads=1, quick=True)
    rates = [profile.mm_flops["fp32"], profile.mm_flops["half"], profile.ew_flops, profile.exp_rate,
             profile.exp_op_rate, profile.dram_bw, profile.fault_bw, *(bw for _, bw in profile.levels)]
    assert all(math.isfinite(r) and r > 0 for r in rates)
    assert 0 < profile.gemv_efficiency <= 1 and 0 < profile.efficiency["sdpa"] <= 1.5
    assert profile.threads == 1 and profile.device == "cpu" and profile.source.startswith("calibrated")


def test_a_busy_machine_yields_scaled_one_thread_rates(monkeypatch):
    # a parallel GEMM no faster than one thread means other jobs hold the cores
    monkeypatch.setattr("attnfx.cost_model.calibrate._gemm_rate", lambda dtype, reps: 50e9)
    profile = calibrate(threads=2, quick=True)
    assert "busy" in profile.notes
    assert profile.mm_flops["fp32"] == 50e9 * 1.9 and profile.parallel == 2 and profile.threads == 2
