"""Hardware profiles: the on-disk cache round trip, spec-sheet lookup, the bandwidth curve."""
import json

import pytest
import torch

from attnfx.cost_model import profiles, targets
from attnfx.cost_model.crossovers import linear_crossover
from attnfx.cost_model.hardware import A100, SANDBOX_CPU, H100_PCIE, H100_SXM, H200, gpu_profile_for


def test_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv(profiles.CACHE_ENV, str(tmp_path))
    path = profiles.save_profile(SANDBOX_CPU, tmp_path / "p.json")
    assert profiles.load_profile(path) == SANDBOX_CPU
    assert json.loads(path.read_text())["torch"] == torch.__version__


def test_cache_is_ignored_when_stale_or_corrupt(tmp_path):
    path = profiles.save_profile(SANDBOX_CPU, tmp_path / "p.json")
    payload = json.loads(path.read_text())
    path.write_text(json.dumps({**payload, "torch": "0.0.1"}))
    assert profiles.load_profile(path) is None
    path.write_text(json.dumps({**payload, "calibration": "older"}))  # measured by another attnfx's calibration
    assert profiles.load_profile(path) is None
    path.write_text(json.dumps({k: v for k, v in payload.items() if k != "calibration"}))
    assert profiles.load_profile(path) is None
    path.write_text("{not json")
    assert profiles.load_profile(path) is None
    assert profiles.load_profile(tmp_path / "missing.json") is None


def test_host_profile_reads_the_cache_without_measuring(tmp_path, monkeypatch):
    monkeypatch.setenv(profiles.CACHE_ENV, str(tmp_path))
    profiles.save_profile(SANDBOX_CPU, profiles.cache_path())
    monkeypatch.setattr("attnfx.cost_model.targets.calibrate", lambda *a, **k: pytest.fail("calibrated"))
    assert targets.host_profile() == SANDBOX_CPU
    assert profiles.cache_path().name == f"profile-{profiles.machine_id()}-t{torch.get_num_threads()}.json"


def test_gpu_spec_sheets_by_name():
    assert gpu_profile_for("NVIDIA H100 80GB HBM3", 132) is H100_SXM
    assert gpu_profile_for("NVIDIA H100 PCIe", 114) is H100_PCIE
    assert gpu_profile_for("NVIDIA H200", 132) is H200
    assert gpu_profile_for("NVIDIA A100-SXM4-80GB", 108) is A100
    assert H200.dram_bw > H100_SXM.dram_bw > A100.dram_bw


def test_bandwidth_falls_as_the_working_set_grows():
    sizes = [2**k for k in range(10, 34)]
    bws = [SANDBOX_CPU.bandwidth(n) for n in sizes]
    assert all(a >= b for a, b in zip(bws, bws[1:]))
    assert bws[0] == SANDBOX_CPU.levels[0][1] and bws[-1] == SANDBOX_CPU.dram_bw


@pytest.mark.parametrize("profile, expected", [(H100_SXM, 168), (A100, 152)])
def test_linear_crossover_matches_the_design_note_at_peak_rates(profile, expected):
    # the note's N* uses peak tensor, FP32 and SFU rates with d = 128
    peak = profile.__class__(**{**profile.to_json(), "levels": profile.levels, "efficiency": {},
                                "ew_flops": profile.mm_flops["fp32"]})
    assert linear_crossover(peak, "bfloat16").value == pytest.approx(expected, abs=3)
