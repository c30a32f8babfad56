"""What only the Triton backend has: launch tables whose tiles differ from the interpreter's, float32 dots kept
in full precision, and, on a GPU, odd shapes against float64.
Every scenario every fused backend meets is in tests/test_attention_conformance.py; the loads each kernel makes
are counted in tests/test_triton_load_counts.py, and tests/test_kernel_compilation.py compiles the launch
tables for Hopper.
"""

import pytest
import torch

from tests.checks import (
    DTYPES,
    TEMPORAL_OPTIONS,
    check_against_reference,
    dtype_id,
    forward_backward,
    make_inputs,
    op_call,
    options_id,
)

pytestmark = pytest.mark.numerics  # CI runs these once more on the AVX2 path (scripts/test.sh --avx2)


def triton_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("block_m, block_n", [(32, 16), (16, 32)])
def test_unequal_spatial_tiles(block_m, block_n, monkeypatch, seed):
    """The interpreter runs the spatial kernels with 16 x 16 tiles, where BLOCK_M and BLOCK_N (and so a loop or a
    grid taken over the wrong one) are interchangeable; the GPU launch table's tiles are not (the key kernel's are
    32 x 128 at D <= 64 in 16 bits). Unequal tiles here too, S = 33 across several of each."""
    from pychop.kernels import spatial_attention

    config = spatial_attention.SpatialConfig(block_m, block_n, 1, 1)
    monkeypatch.setattr(spatial_attention, "INTERPRETER_CONFIG", config)
    check_against_reference("stacked", "triton", (1, 2, 33, 1, 16), torch.float32, triton_device(), seed,
                            causal=True)


@pytest.mark.parametrize("block_m, frames", [(32, 5), (32, 33), (64, 70), (16, 16)])
def test_temporal_row_blocks(block_m, frames, monkeypatch, seed):
    """The temporal kernels' programs hold BLOCK_M // BLOCK_T tokens of BLOCK_T frames each: several tokens per
    program (T = 5 in 32 rows: 8 frames each, three padded), one token spanning blocks of frames (T = 33, 70),
    exactly one block (T = 16 in 16 rows). Windows cross the blocks' edges."""
    from pychop.kernels import temporal_attention

    monkeypatch.setattr(temporal_attention, "INTERPRETER_CONFIG", temporal_attention.TemporalConfig(block_m, 1, 1))
    check_against_reference("temporal", "triton", (1, frames, 5, 1, 16), torch.float32, triton_device(), seed,
                            window=frames // 2 + 1, grad_window=3)


def test_float32_dots_launched_in_full_precision(monkeypatch, seed):
    """float32 stays float32: every tl.dot of a float32 launch is "ieee", never TF32. The interpreter multiplies
    in full precision whatever input_precision says, so the launches' constants are checked here (the gpu
    tests see TF32 as error)."""
    from pychop.kernels import spatial_attention, temporal_attention

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.kernel.fn.__name__, kwargs["DOT_PRECISION"]))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for module in (spatial_attention, temporal_attention):
        for kernel in module.KERNELS:
            monkeypatch.setattr(module, kernel.fn.__name__, Recorder(kernel))
    inputs = make_inputs((1, 2, 3, 1, 16), torch.float32, triton_device())
    forward_backward(lambda *x: op_call("parallel", x, backend="triton", causal=True, spatial_path="kernel"), inputs)
    assert len(launches) == 6 and all(precision == "ieee" for _, precision in launches), launches


# ----------------------------------------------------------------------------------------------------------
# GPU: odd sizes against the float64 loop reference.
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(1, 3, 1000, 2, 160), (3, 1, 77, 4, 40), (1, 5, 129, 2, 256),
                                   (2, 9, 200, 2, 128), (1, 3, 4096, 1, 64)], ids=str)
@pytest.mark.parametrize("options", [{}, {"causal": True, "grad_window": 2}], ids=str)
def test_odd_shapes_gpu(shape, dtype, options, seed):
    check_against_reference("parallel", "triton", shape, dtype, "cuda", seed, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("options", TEMPORAL_OPTIONS, ids=options_id)
@pytest.mark.parametrize("op", ["parallel", "stacked", "temporal"])
def test_temporal_options_gpu(op, options, dtype, seed):
    check_against_reference(op, "triton", (2, 17, 333, 3, 80), dtype, "cuda", seed, packed=True, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_spatial_gpu(dtype, seed):
    check_against_reference("spatial", "triton", (2, 3, 1000, 4, 64), dtype, "cuda", seed, packed=True)
