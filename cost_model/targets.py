"""Which hardware profile a target names: this host (calibrated once, then cached), the current
GPU's spec sheet, a named spec sheet, or a profile given as is."""
from __future__ import annotations

from .calibrate import calibrate
from .hardware import GPU_PROFILES, H100_SXM, HardwareProfile, gpu_profile_for
from .profiles import load_profile, save_profile


def host_profile(recalibrate: bool = False) -> HardwareProfile:
    """This CPU at torch's current thread count: cached, or measured now and cached."""
    if not recalibrate:
        cached = load_profile()
        if cached is not None:
            return cached
    profile = calibrate()
    save_profile(profile)
    return profile


def cuda_profile() -> HardwareProfile:
    """The spec sheet of the current GPU; H100 SXM when no GPU is visible."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return gpu_profile_for(props.name, props.multi_processor_count)
    except (ImportError, RuntimeError):
        pass
    return H100_SXM


def resolve_target(target: str | HardwareProfile) -> HardwareProfile:
    """"cpu", "cuda", a spec-sheet name (e.g. "A100-SXM4-80GB") or a profile."""
    if isinstance(target, HardwareProfile):
        return target
    if target == "cpu":
        return host_profile()
    if target == "cuda":
        return cuda_profile()
    if target in GPU_PROFILES:
        return GPU_PROFILES[target]
    raise ValueError(f"unknown target {target!r}: use 'cpu', 'cuda', one of {sorted(GPU_PROFILES)} "
                     "or a HardwareProfile")
