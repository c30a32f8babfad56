"""Every GPU family's Triton launch tables compile for that family within its budgets, checked without a GPU.

The interpreter accepts code the GPU compiler may not, and knows nothing of registers or shared memory. Every
entry of the spatial and temporal launch tables of every family (kernels/gpu_families.py) is compiled here for
the family's architecture (in a process without TRITON_INTERPRET, by tests/gpu_compilation.py): no register
spills, shared memory within the family's per-block limit, and the family's tensor-core instruction where it
belongs: warpgroup MMA (wgmma) on sm_90 and tcgen05 on sm_100 wherever a spatial product has 64 rows,
mma.sync otherwise (16-bit inputs; float32 stays exact, on CUDA cores). Each table row is compiled at its
bucket's head dim and at the Stable Diffusion head dims that fall in it (40; 72, 80, 96; 160) laid out as a
packed projection's views, whose head stride D is no multiple of 16: every 16-bit tile load must still be a
16-byte vector load (the host proves the alignment, tiles.alignment), none a 2-byte ld.global.b16.

The default run compiles a representative subset (DEFAULT_ROWS); every other row is marked slow
(python -m pytest tests/test_kernel_compilation.py -m slow; all: -m "slow or not slow").
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from pychop.kernels.gpu_families import FAMILIES
from tests.gpu_compilation import BUCKETS, GpuBuild

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The default run: the 16-bit D <= 64 row of one family per tensor-core instruction (sm90 wgmma, sm100 tcgen05,
# sm86 mma.sync: all six kernels, the head dims 64 and 40, split and packed) and the 16-bit row of D = 160 on a
# 99 KiB mma.sync family; the rest (sm80's and sm120's rows too) is slow.
DEFAULT_ROWS = {(name, 64, "bfloat16") for name in ("sm86", "sm90", "sm100")} | {("sm86", 192, "bfloat16")}
TABLE_ROWS = [pytest.param(family.name, bucket, dtype_name, id=f"{family.name}-{bucket}-{dtype_name}",
                           marks=[] if (family.name, bucket, dtype_name) in DEFAULT_ROWS else [pytest.mark.slow])
              for dtype_name in ("bfloat16", "float32") for family in FAMILIES for bucket in BUCKETS]


# Matrix products per key block (forward, backward query kernel) or query block (backward key kernel), as
# docs/design.md counts them; the query kernel's fourth, P K, only with a summed output (compiled here).
SPATIAL_PRODUCTS = {"_spatial_forward_kernel": 2, "_spatial_backward_query_kernel": 4,
                    "_spatial_backward_key_kernel": 4}


@pytest.mark.parametrize("family_name, bucket, dtype_name", TABLE_ROWS)
def test_launch_table_compiles_for_its_family(family_name, bucket, dtype_name):
    family = next(f for f in FAMILIES if f.name == family_name)
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "tests.gpu_compilation", family_name, str(bucket), dtype_name, "--json"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    builds = json.loads(result.stdout.strip().splitlines()[-1])
    for build in builds:  # printed: pytest -rP shows every build's registers, spills and shared memory
        print(f"{family_name} {build['config']}: {GpuBuild.of(build).line()}")
    for build in builds:
        where = f"{family_name} {build['name']} {build['config']}: {build['registers']} registers"
        assert build["spill_bytes"] == 0, f"{where} spill {build['spill_bytes']} bytes per thread"
        assert build["shared_bytes"] <= family.shared_memory, f"{where}, {build['shared_bytes']} shared bytes"
        if build["name"] in SPATIAL_PRODUCTS:  # each product one tl.dot per block of the head dim
            assert build["dots"] == SPATIAL_PRODUCTS[build["name"]] * build["head_dim_blocks"], \
                f"{where}: {build['dots']} tl.dot"
        tensor_cores = build["wgmma"] or build["tcgen05"] or build["mma_sync"]
        if dtype_name == "float32":  # "ieee" dots: exact float32 on CUDA cores
            assert not tensor_cores, f"{where} uses tensor cores in float32"
            continue
        assert tensor_cores, f"{where}: no tensor-core MMA"
        if build["name"].startswith("_spatial") and build["rows"] >= 64 and family.capability in (90, 100):
            instruction = "wgmma" if family.capability == 90 else "tcgen05"
            assert build[instruction], f"{where}: {build['rows']}-row products without {instruction}"
        if build["aligned"]:
            assert build["scalar_loads"] == 0 and build["vector_loads"] > 0, \
                f"{where}: {build['scalar_loads']} 2-byte and {build['vector_loads']} 16-byte global loads"
