"""Compiles pychop's Triton kernels ahead of time for Hopper (sm_90a) on a machine without a GPU, and reads what
ptxas reports: registers, spills, shared memory and the matrix instructions used.

Run in a process without TRITON_INTERPRET (the interpreter replaces the compiler). Each kernel is compiled as a
launch with 16-byte aligned pointers and strides would be (Triton specialises launches on both).
"""

from __future__ import annotations

import inspect
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

HOPPER_SHARED_MEMORY_PER_BLOCK = 227 * 1024  # the most one program may ask for on sm_90 (opt-in limit)
SIZES = ("T", "S", "H")
ELEMENT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass
class HopperBuild:
    name: str
    registers: int
    spill_bytes: int  # spill stores + spill loads, bytes per thread
    shared_bytes: int
    wgmma: bool  # warpgroup MMA (Hopper's asynchronous tensor-core instruction)
    mma_sync: bool  # warp-level tensor-core MMA (Ampere's instruction, also on Hopper)

    def line(self) -> str:
        return (f"{self.name}: {self.registers} registers, {self.spill_bytes} spill bytes, "
                f"{self.shared_bytes} shared bytes, wgmma={self.wgmma}, mma.sync={self.mma_sync}")


def _ptxas_report(ptx: str):
    """(registers, spill bytes) of the kernel in `ptx`, from ptxas -v for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", str(source), "-o", str(Path(folder) / "k.o")],
                                capture_output=True, text=True, check=True)
    report = result.stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return registers, spills


def compile_for_hopper(kernel, dtype: torch.dtype, constants: dict, num_warps: int, num_stages: int) -> HopperBuild:
    """Compiles `kernel` (a triton.jit function) for sm_90a with `constants` for its constexpr parameters that
    it has (others are ignored). Tensors are parameters named with a capital, but for the sizes T, S, H (float32
    row statistics: Lse*, Delta*), strides start with ``stride_``, ``scale`` is float32, the rest int32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    constants = {name: value for name, value in constants.items() if name in names}
    signature, attrs = {}, {}
    for index, name in enumerate(names):
        if name in constants:
            signature[name] = "constexpr"
        elif name == "scale":
            signature[name] = "fp32"
        elif name[0].isupper() and name not in SIZES:
            signature[name] = "*fp32" if name.startswith(("Lse", "Delta")) else f"*{ELEMENT[dtype]}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name.startswith("stride_"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                       constexprs={(names.index(name),): value for name, value in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    registers, spills = _ptxas_report(ptx)
    return HopperBuild(kernel.fn.__name__, registers, spills, compiled.metadata.shared, "wgmma" in ptx,
                       "mma.sync" in ptx)
