"""The Triton launch tables compile for Hopper (sm_90a) within its budgets, checked without a GPU.

The interpreter accepts code the GPU compiler may not, and knows nothing of registers or shared memory. Every
entry of the spatial and temporal launch tables is compiled here (in a process without TRITON_INTERPRET) as a
launch with 16-byte aligned pointers and strides: no register spills, shared memory within what a program may
ask for, and tensor-core instructions where they belong: warpgroup MMA (wgmma) in the spatial loops wherever a
tile has 64 rows, tensor-core MMA in the temporal products (16-bit inputs; float32 stays exact, on CUDA cores).
Runs on any machine, GPU or not: a GPU that is not a Hopper still checks Hopper's budgets.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TABLE_ROWS = [(64, "bfloat16"), (128, "bfloat16"), (256, "bfloat16"), (64, "float32"), (128, "float32"),
              (256, "float32")]


def compile_table_row(head_dim: int, dtype_name: str):
    """Compiles every kernel of the launch-table row (head dim bucket, dtype) and returns one dict per build:
    the temporal kernels at T = 16 and 64 (one block of frames) and, for the 16-bit rows, at T = 200 (several)."""
    import torch

    from pychop.kernels import spatial_attention, temporal_attention
    from pychop.kernels.tiles import dot_constants, head_dim_block
    from tests.hopper_compilation import compile_for_hopper

    dtype = getattr(torch, dtype_name)
    base = dict(D=head_dim, BLOCK_D=head_dim_block(head_dim), **dot_constants(dtype))
    builds = []
    spatial_configs = spatial_attention.GPU_CONFIGS[(head_dim, dtype.itemsize == 2)]
    for kernel, config in zip(spatial_attention.KERNELS, spatial_configs):
        constants = dict(base, ADD_TO_OUT=True, OUT_IS_SUM=True, BLOCK_M=config.block_m, BLOCK_N=config.block_n)
        build = compile_for_hopper(kernel, dtype, constants, config.num_warps, config.num_stages)
        rows = config.block_n if kernel is spatial_attention.KERNELS[2] else config.block_m  # the products' M
        builds.append(dict(vars(build), config=str(config), rows=rows))
    temporal_configs = temporal_attention.GPU_CONFIGS[(head_dim, dtype.itemsize == 2)]
    frame_counts = (16, 64, 200) if dtype.itemsize == 2 else (16, 64)
    for kernel, config in zip(temporal_attention.KERNELS, temporal_configs):
        for frames in frame_counts:
            block_m, block_t = config.blocks(frames)
            constants = dict(base, CAUSAL=True, ONE_KEY_BLOCK=block_t >= frames, BLOCK_M=block_m, BLOCK_T=block_t)
            build = compile_for_hopper(kernel, dtype, constants, config.num_warps, config.num_stages)
            builds.append(dict(vars(build), config=f"{config} T={frames}", rows=block_m))
    print(json.dumps(builds))


# Seconds per row: the quick tier compiles the first row, the full run every row.
@pytest.mark.parametrize("head_dim, dtype_name", [row if i == 0 else pytest.param(*row, marks=pytest.mark.slow)
                                                  for i, row in enumerate(TABLE_ROWS)],
                         ids=[f"{d}-{t}" for d, t in TABLE_ROWS])
def test_launch_table_compiles_for_hopper(head_dim, dtype_name):
    from tests.hopper_compilation import HOPPER_SHARED_MEMORY_PER_BLOCK

    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    code = f"from tests.test_kernel_compilation import compile_table_row; compile_table_row({head_dim}, {dtype_name!r})"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    builds = json.loads(result.stdout.strip().splitlines()[-1])
    for build in builds:
        where = f"{build['name']} {build['config']}: {build['registers']} registers"
        assert build["spill_bytes"] == 0, f"{where} spill {build['spill_bytes']} bytes per thread"
        assert build["shared_bytes"] <= HOPPER_SHARED_MEMORY_PER_BLOCK, f"{where}, {build['shared_bytes']} shared bytes"
        if dtype_name == "float32":  # "ieee" dots: exact float32 on CUDA cores
            assert not (build["wgmma"] or build["mma_sync"]), f"{where} uses tensor cores in float32"
        else:
            assert build["wgmma"] or build["mma_sync"], f"{where}: no tensor-core MMA"
            assert build["wgmma"] or build["rows"] < 64, f"{where}: {build['rows']}-row products without wgmma"
