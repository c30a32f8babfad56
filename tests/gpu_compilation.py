"""Compiles pychop's Triton kernels ahead of time for any NVIDIA GPU family on a machine without a GPU, and reads
what ptxas reports: registers, spills, shared memory, the matrix instructions and the global loads used.

Run in a process without TRITON_INTERPRET (the interpreter replaces the compiler). Each kernel is compiled as a
launch with the arguments' divisibility that Triton's launcher would see: tensors 16-byte aligned, each stride
divisible by 16 or not as the caller says (a packed projection's head stride is D, 40 or 72 for Stable Diffusion:
not a multiple of 16). ptxas is Triton's bundled one for the target (12.8 up to sm_90a, its Blackwell ptxas 12.9
for sm_100a and sm_120a).
"""

from __future__ import annotations

import inspect
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SIZES = ("T", "S", "H")
ELEMENT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
ELEMENT_NAMES = ("bfloat16", "float16", "float32")


@dataclass
class GpuBuild:
    name: str
    registers: int
    spill_bytes: int  # spill stores + spill loads, bytes per thread
    shared_bytes: int
    wgmma: bool  # warpgroup MMA (Hopper's asynchronous tensor-core instruction)
    tcgen05: bool  # fifth-generation tensor-core MMA (datacenter Blackwell, sm_100)
    mma_sync: bool  # warp-level tensor-core MMA (Ampere's instruction, on every later family too)
    vector_loads: int  # 16-byte global loads: ld.global.v4 and 16-byte cp.async
    scalar_loads: int  # 2-byte global loads (ld.global.b16 / u16): what an unaligned 16-bit tile compiles to
    dots: int  # tl.dot operations in the kernel (Triton IR, before any unrolling)

    @classmethod
    def of(cls, build: dict) -> "GpuBuild":
        """The GpuBuild of a build dict (table_row_builds), whatever else the dict holds."""
        return cls(**{name: build[name] for name in cls.__annotations__})

    def line(self) -> str:
        return (f"{self.name}: {self.registers} registers, {self.spill_bytes} spill bytes, "
                f"{self.shared_bytes} shared bytes, wgmma={self.wgmma}, tcgen05={self.tcgen05}, "
                f"mma.sync={self.mma_sync}, 16-byte loads {self.vector_loads}, 2-byte loads {self.scalar_loads}, "
                f"{self.dots} tl.dot")


def arch_name(capability: int) -> str:
    """ptxas's name of a compute capability: sm_80, sm_86, and the architecture-specific sm_90a, sm_100a,
    sm_120a from Hopper on (as Triton compiles them)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    return sm_arch_from_capability(capability)


def _ptxas_report(ptx: str, capability: int):
    """(registers, spill bytes) of the kernel in `ptx`, from ptxas -v for `capability`."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([ptxas, "-v", "--gpu-name", arch_name(capability), str(source), "-o",
                                 str(Path(folder) / "k.o")], capture_output=True, text=True, check=True)
    report = result.stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return registers, spills


def count_global_loads(ptx: str):
    """(16-byte loads, 2-byte loads) from global memory in `ptx`: ld.global.v4.b32 / 16-byte cp.async against
    ld.global.b16 / .u16 (one element each)."""
    vector = len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.(?:b|u|f)32", ptx))
    vector += len(re.findall(r"cp\.async\.c[ag]\.shared\.global(?:\.\w+)* \[[^\]]+\], \[[^\]]+\], 0x10", ptx))
    scalar = len(re.findall(r"ld\.global(?:\.\w+)*\.(?:b|u)16\b", ptx))
    return vector, scalar


def compile_kernel(kernel, dtype: torch.dtype, constants: dict, num_warps: int, num_stages: int, capability: int,
                   unaligned_strides=()) -> GpuBuild:
    """Compiles `kernel` (a triton.jit function) for `capability` (80, 86, 90, 100, 120, ...) with `constants`
    for its constexpr parameters that it has (others are ignored). Tensors are parameters named with a capital,
    but for the sizes T, S, H (float32 row statistics: Lse*, Delta*), strides start with ``stride_``, ``scale``
    is float32, the rest int32. Every tensor is 16-byte aligned and every stride divisible by 16, except the
    strides named in `unaligned_strides`."""
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
            if name.startswith("stride_") and name not in unaligned_strides:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                       constexprs={(names.index(name),): value for name, value in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    registers, spills = _ptxas_report(ptx, capability)
    return GpuBuild(kernel.fn.__name__, registers, spills, compiled.metadata.shared, "wgmma" in ptx,
                    "tcgen05.mma" in ptx, "mma.sync" in ptx, *count_global_loads(ptx),
                    len(re.findall(r"= tt\.dot ", compiled.asm["ttir"])))


# ----------------------------------------------------------------------------------------------------------
# The launch tables, row by row.
# ----------------------------------------------------------------------------------------------------------

# The head dims each bucket's spatial entries are compiled at: its own and the Stable Diffusion family's in it.
SPATIAL_HEAD_DIMS = {64: (64, 40), 96: (72, 80, 96), 128: (128,), 192: (160,), 256: (256,)}
# The temporal kernels pad the head dim to a power of two: one entry per padded width, compiled at the
# Stable Diffusion head dim padded to it.
TEMPORAL_HEAD_DIMS = {64: 40, 128: 72, 256: 160}
BUCKETS = tuple(SPATIAL_HEAD_DIMS)


def packed_layout(head_dim: int, itemsize: int):
    """(strides Triton does not see divisible by 16, ALIGN) of views of a packed (B, T, S, 6, H, D) projection:
    the head stride is D, the others multiples of 6 * D; rows start 16-byte aligned when D * itemsize is a
    multiple of 16 (what tiles.alignment checks on the host)."""
    unaligned = {f"stride_{name}_h" for name in ("q", "k", "v", "o", "do", "g")} if head_dim % 16 else set()
    elements = 16 // itemsize
    return unaligned, elements if head_dim % elements == 0 else 1


def table_row_builds(family_name: str, bucket: int, dtype_name: str):
    """Compiles every kernel of one launch-table row (family, head-dim bucket, dtype) at each of the bucket's head
    dims, laid out as a packed projection's views: one dict per build (a GpuBuild's fields, the config, the
    products' rows, whether the host proves 16-byte rows, and for the spatial kernels the head dim's blocks).
    The temporal kernels (power-of-two buckets only) at T = 16 and 64 (one block of frames) and, for 16-bit rows,
    T = 200 (several)."""
    from pychop.kernels import spatial_attention, temporal_attention
    from pychop.kernels.gpu_families import FAMILIES
    from pychop.kernels.tiles import dot_constants, head_dim_block

    family = next(f for f in FAMILIES if f.name == family_name)
    dtype = getattr(torch, dtype_name)
    builds = []

    def build(kernel, config, constants, head_dim, rows, label):
        unaligned, align = packed_layout(head_dim, dtype.itemsize)
        result = compile_kernel(kernel, dtype, dict(constants, D=head_dim, ALIGN=align, **dot_constants(dtype)),
                                config.num_warps, config.num_stages, family.capability, unaligned)
        builds.append(dict(vars(result), config=f"{config} D={head_dim}{label}", rows=rows, aligned=align > 1))

    for head_dim in SPATIAL_HEAD_DIMS[bucket]:
        configs = spatial_attention.configs(head_dim, dtype, family.name)
        for kernel, config in zip(spatial_attention.KERNELS, configs):
            block_d, tail_d = config.head_dim_blocks(head_dim)
            rows = config.block_n if kernel is spatial_attention.KERNELS[2] else config.block_m  # the products' M
            build(kernel, config, dict(ADD_TO_OUT=True, OUT_IS_SUM=True, BLOCK_M=config.block_m,
                                       BLOCK_N=config.block_n, BLOCK_D=block_d, TAIL_D=tail_d), head_dim, rows, "")
            builds[-1]["head_dim_blocks"] = 2 if tail_d else 1
    if bucket not in TEMPORAL_HEAD_DIMS:
        return builds
    head_dim = TEMPORAL_HEAD_DIMS[bucket]
    frame_counts = (16, 64, 200) if dtype.itemsize == 2 else (16, 64)
    for kernel, config in zip(temporal_attention.KERNELS, temporal_attention.configs(head_dim, dtype, family.name)):
        for frames in frame_counts:
            block_m, block_t = config.blocks(frames)
            constants = dict(CAUSAL=True, ONE_KEY_BLOCK=block_t >= frames, BLOCK_M=block_m, BLOCK_T=block_t,
                             BLOCK_D=head_dim_block(bucket))
            build(kernel, config, constants, head_dim, block_m, f" T={frames}")
    return builds


def main(argv=None) -> None:
    """python -m tests.gpu_compilation FAMILY BUCKET DTYPE: one line per build of that launch-table row
    (run without TRITON_INTERPRET)."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m tests.gpu_compilation", description=main.__doc__)
    parser.add_argument("family")
    parser.add_argument("bucket", type=int, choices=BUCKETS)
    parser.add_argument("dtype", choices=ELEMENT_NAMES)
    parser.add_argument("--json", action="store_true", help="print the builds as one JSON list instead")
    args = parser.parse_args(argv)
    builds = table_row_builds(args.family, args.bucket, args.dtype)
    if args.json:
        json.dump(builds, sys.stdout)
        return
    for build in builds:
        print(f"{args.family} {build['config']}: {GpuBuild.of(build).line()}")


if __name__ == "__main__":
    main()
