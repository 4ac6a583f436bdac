"""Hardware profiles: the rates the time model divides by.

GPU profiles come from vendor spec sheets with efficiency factors taken from the published
kernel results quoted there; they are estimates until calibrated on the device. The host CPU profile
is measured (`attnfx.cost_model.calibrate`) and cached on disk; `SANDBOX_CPU` describes the
project's 2-core sandbox, for tests and documentation.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class HardwareProfile:
    """Rates of one device; `bandwidth(bytes)` interpolates the memory hierarchy."""

    name: str
    device: str  # "cpu" | "cuda"
    mm_flops: dict[str, float]  # achieved dense GEMM FLOP/s by dtype class: "fp32", "half"
    ew_flops: float  # elementwise ops/s on data already in registers or L1
    exp_rate: float  # exps/s inside a fused softmax (the SFU rate on a GPU)
    exp_op_rate: float  # exps/s of a standalone elementwise exp op (torch.exp)
    levels: tuple[tuple[float, float], ...]  # (capacity bytes, bytes/s), innermost first
    dram_bw: float  # bytes/s once a working set misses every level
    launch_s: float  # per kernel launch (an eager op's dispatch on a CPU)
    efficiency: dict[str, float] = field(default_factory=dict)  # unit -> fraction of mm_flops
    half_rows: float = 0.0  # a GEMM of r rows reaches r / (r + half_rows) of the GEMM rate
    gemv_efficiency: float = 1.0  # share of copy bandwidth at which a GEMM streams operands from DRAM
    gemv_cache_efficiency: float = 0.0  # ... and from the last cache level (0: as from DRAM)
    call_s: dict[str, float] = field(default_factory=dict)  # unit -> extra fixed seconds per call
    parallel: int = 1  # threads (CPU) or SMs x resident blocks (GPU) that split a kernel's blocks
    overlap: float = 1.0  # 1: memory hides under compute (GPU); 0: they add up (CPU thread)
    fault_bw: float | None = None  # bytes/s to first-touch freshly mapped memory
    fault_threshold: float | None = None  # allocations this large are mapped fresh on every call
    fault_min: float = 8 * 2**20  # below this, a reused heap keeps smaller ones mapped (empirical)
    exp_inf_rate: float = 0.0  # exps/s of -inf inputs in a standalone exp op (0: as exp_op_rate)
    select_rate: float = 0.0  # elements/s of masked_fill / where with a bool mask (0: ew_flops)
    sram_per_sm: float = 0.0
    compile_s: dict[str, float] = field(default_factory=dict)  # unit -> one-time compile seconds ...
    compile_calls: float = 1000.0  # ... spread over this many calls (a process serving many batches)
    source: str = "spec sheet"
    machine_id: str = ""
    date: str = ""
    threads: int = 0
    notes: str = ""

    def mm_rate(self, dtype: str, unit: str) -> float:
        key = "fp32" if dtype in ("float32", "float64") else "half"
        rate = self.mm_flops.get(key) or self.mm_flops["fp32"]
        return rate * self.efficiency.get(unit, 1.0) * (0.5 if dtype == "float64" else 1.0)

    def stream_efficiency(self, footprint: float) -> float:
        """Share of `bandwidth(footprint)` a GEMM reaches when it streams an operand of that size:
        the cache-level share while it fits the last cache, tending to the DRAM share past it."""
        if not self.gemv_cache_efficiency or not self.levels:
            return self.gemv_efficiency
        llc_bw = self.levels[-1][1]
        hit = min(max((self.bandwidth(footprint) - self.dram_bw) / max(llc_bw - self.dram_bw, 1e-9), 0.0), 1.0)
        return self.gemv_efficiency + hit * (self.gemv_cache_efficiency - self.gemv_efficiency)

    def amortized_compile_s(self, unit: str) -> float:
        """A kernel's one-time compile, charged per call: its share over `compile_calls` calls."""
        return self.compile_s.get(unit, 0.0) / max(self.compile_calls, 1.0)

    def bandwidth(self, footprint: float) -> float:
        """Bytes/s for a kernel whose data set is `footprint` bytes: a level's rate while it fits,
        interpolated (in log-size) towards the next level, DRAM past the last."""
        points = [(cap, bw) for cap, bw in self.levels] + [(float("inf"), self.dram_bw)]
        if footprint <= points[0][0]:
            return points[0][1]
        for (cap0, bw0), (cap1, bw1) in zip(points, points[1:]):
            if footprint <= cap1:
                if math.isinf(cap1):
                    # past the last cache: converge to DRAM by twice its capacity
                    cap1 = 2 * cap0
                    if footprint >= cap1:
                        return bw1
                x = math.log(footprint / cap0) / math.log(cap1 / cap0)
                return 1.0 / ((1 - x) / bw0 + x / bw1)
        return self.dram_bw

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict) -> "HardwareProfile":
        data = dict(data)
        data["levels"] = tuple(tuple(level) for level in data["levels"])
        return HardwareProfile(**data)

    def describe(self) -> str:
        mm = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in self.mm_flops.items())
        eff = ", ".join(f"{k} {v:.2f}" for k, v in sorted(self.efficiency.items()))
        when = f", {self.date}" if self.date else ""
        return (f"{self.name} ({self.source}{when}): GEMM {mm}; exp {self.exp_rate / 1e9:.3g} G/s; "
                f"DRAM {self.dram_bw / 1e9:.3g} GB/s; launch {self.launch_s * 1e6:.3g} us; "
                f"efficiency {eff or '-'}")


def _gpu(name: str, sms: int, half: float, fp32: float, exp_rate: float, hbm: float, l2: float,
         smem: float, sdpa: float, flash: float, notes: str = "") -> HardwareProfile:
    """A spec-sheet GPU: peaks in FLOP/s, bytes/s; sdpa/flash = assumed fraction of tensor peak."""
    return HardwareProfile(
        name=name, device="cuda", mm_flops={"half": half, "fp32": fp32}, ew_flops=fp32 / 2,
        exp_rate=exp_rate, exp_op_rate=exp_rate, levels=((l2 / 2, 2.0 * hbm),), dram_bw=0.85 * hbm, launch_s=5e-6,
        efficiency={"gemm": 0.7, "sdpa": sdpa, "flash": flash}, call_s={"flash": 20e-6},
        parallel=sms * 2, overlap=1.0, sram_per_sm=smem, notes=notes,
    )


# Efficiencies: FA2 reaches 50-73% of A100 peak and ~35% of H100 (FA3 paper); Triton 1-pass is
# assumed a little below. L2 bandwidth is assumed 2x HBM (not from a spec sheet).
A100 = _gpu("A100-SXM4-80GB", 108, 312e12, 19.5e12, 2.4e12, 2.04e12, 40e6, 164e3, 0.6, 0.5)
H100_SXM = _gpu("H100-SXM5", 132, 989e12, 67e12, 3.9e12, 3.35e12, 50e6, 227e3, 0.4, 0.35)
H100_PCIE = _gpu("H100-PCIe", 114, 756e12, 51e12, 3.9e12 * 51 / 67, 2.0e12, 50e6, 227e3, 0.4, 0.35,
                 notes="exp rate scaled from SXM by the FP32 ratio")
H200 = _gpu("H200", 132, 989e12, 67e12, 3.9e12, 4.8e12, 50e6, 227e3, 0.4, 0.35)

GPU_PROFILES: dict[str, HardwareProfile] = {p.name: p for p in (A100, H100_SXM, H100_PCIE, H200)}

# Per-call costs of attnfx's own ops, measured on the sandbox (one thread, CPU clock): a custom op's
# Python dispatch, and compiled FlexAttention's fixed cost (Dynamo's guards, the block tables, the
# CPU template's set-up: ~1.3 ms at any size). The compile (Inductor, per shape and modifiers) took
# 16-40 s. FlexAttention's dense blocks ran at ~0.6 of SDPA's speed (B1 H8 d64, N 512-1024).
CALL_S = {"op_call": 30e-6, "flex_call": 1.2e-3}
COMPILE_S = {"flex_compile": 20.0}
FLEX_SDPA_RATIO = 0.6

# The project sandbox (2-core EPYC, 2 threads, fp32), for tests and documentation.
# GEMM, exp and DRAM rates were measured on the project's 2-core sandbox; the rest is this project's one-thread calibration
# scaled to two threads. SDPA's efficiency is the calibrated one: the note's 98 ms run at B1 H8 N2048
# d64 would give 0.72 under this time model, but SDPA ran that shape in ~52 ms on two threads here.
SANDBOX_CPU = HardwareProfile(
    name="cpu (sandbox, 2-core EPYC)", device="cpu",
    mm_flops={"fp32": 152e9, "half": 402e9}, ew_flops=20e9, exp_rate=2.8e9, exp_op_rate=2.8e9,
    exp_inf_rate=0.7e9, select_rate=3.6e9, levels=((2e6, 180e9), (32e6, 150e9)), dram_bw=34e9, launch_s=2e-6,
    efficiency={"gemm": 1.0, "sdpa": 1.3, "flex": FLEX_SDPA_RATIO * 1.3}, half_rows=1.5, gemv_efficiency=0.35,
    gemv_cache_efficiency=0.55, call_s={"sdpa": 3e-6, **CALL_S}, compile_s=dict(COMPILE_S),
    parallel=2, overlap=0.0, fault_bw=3e9, fault_threshold=32 * 2**20,
    source="sandbox measurements + calibration", threads=2,
)


def gpu_profile_for(name: str, multi_processors: int) -> HardwareProfile:
    """The spec sheet that matches a CUDA device name (H100 SKUs told apart by SM count)."""
    upper = name.upper()
    if "H200" in upper:
        return H200
    if "H100" in upper:
        return H100_SXM if multi_processors >= 132 else H100_PCIE
    if "A100" in upper:
        return A100
    return replace(H100_SXM, name=f"{name} (priced as H100-SXM5)")
