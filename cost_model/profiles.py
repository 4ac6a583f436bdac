"""The on-disk cache of the host's calibrated profile.

The host CPU is measured once per machine and thread count (a few seconds) and cached as JSON at
`$ATTNFX_CACHE_DIR` (default `~/.cache/attnfx`) under `profile-<machine id>-t<threads>.json`, with
the torch version and the calibration it was measured with; a different torch version, or a
calibration that measures other things (an attnfx upgrade that adds a per-call cost, say), re-measures:
a stale profile would price what it never measured as free.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

from .hardware import HardwareProfile

CACHE_ENV = "ATTNFX_CACHE_DIR"
_CALIBRATION_SOURCES = ("calibrate.py", "hardware.py")  # what is measured, and the profile's fields


def calibration_version() -> str:
    """A hash of the code that decides what a profile measures and holds."""
    digest = hashlib.sha1()
    for name in _CALIBRATION_SOURCES:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:12]


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "attnfx")


def machine_id() -> str:
    """A short id for this machine: its OS machine id, CPU model and core count (cloned VMs can
    share a machine id, not usually a CPU)."""
    parts = [platform.node(), platform.machine(), str(os.cpu_count())]
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            parts.append(Path(path).read_text().strip())
            break
        except OSError:
            continue
    try:
        models = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        parts.append(models[0] if models else "")
    except OSError:
        parts.append(platform.processor())
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def cache_path(threads: int | None = None) -> Path:
    threads = threads or _torch_threads()
    return cache_dir() / f"profile-{machine_id()}-t{threads}.json"


def save_profile(profile: HardwareProfile, path: Path | None = None) -> Path:
    import torch

    path = path or cache_path(profile.threads or None)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"torch": torch.__version__, "calibration": calibration_version(), "profile": profile.to_json()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    tmp.replace(path)
    return path


def load_profile(path: Path | None = None) -> HardwareProfile | None:
    """The cached profile, or None when there is none or it was measured with another torch or
    another calibration."""
    import torch

    path = path or cache_path()
    try:
        payload = json.loads(path.read_text())
        if payload.get("torch") != torch.__version__ or payload.get("calibration") != calibration_version():
            return None
        return HardwareProfile.from_json(payload["profile"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
