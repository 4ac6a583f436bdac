"""Interleaved wall-clock timing, so every contender sees the same machine noise."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def time_interleaved(contenders: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each contender, measured round-robin after `warmup` calls each."""
    with torch.no_grad():
        for fn in contenders.values():
            for _ in range(warmup):
                fn()
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(repeats):
            for name, fn in contenders.items():
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}
