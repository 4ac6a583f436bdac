"""Compile every attnfx Triton kernel for a CUDA target on a machine without a GPU.

Run as a script (never under TRITON_INTERPRET): a stand-in driver reports the target, each launch is
compiled through Triton's own JIT path (specialisation, constexprs, tuples) down to a cubin and not
run. Prints one line per compiled kernel: name, target, shared memory bytes.
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ARCH = int(sys.argv[1])


class _TargetOnly:
    """What JITFunction.run asks the driver before compiling."""

    def get_current_target(self):
        return GPUTarget("cuda", ARCH, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _launch(self, *args, grid=grid, warmup=True, **kwargs)
    assert "cubin" in kernel.asm
    print(self.fn.__name__, f"sm_{ARCH}", kernel.metadata.shared)
    return kernel


driver.set_active(_TargetOnly())
_launch, JITFunction.run = JITFunction.run, _compile_only

from kernel_cases import COMBINED  # noqa: E402

from attnfx.kernels.triton_decode import decode_forward  # noqa: E402
from attnfx.kernels.triton_flash_bwd import flash_backward, sigmoid_flash_backward  # noqa: E402
from attnfx.kernels.triton_flash_fwd import flash_forward, sigmoid_flash_forward  # noqa: E402

case = COMBINED["all_additive_gqa"]
args = case.launch_args(case.tensors())
out, lse = flash_forward(*args)
flash_backward(torch.ones_like(out), None, *args, out, lse, True)
sigmoid_flash_backward(torch.ones_like(sigmoid_flash_forward(*args, -1.0)), *args, -1.0, True)
decode = case.with_(q_len=2)
decode_forward(*decode.launch_args(decode.tensors()))
