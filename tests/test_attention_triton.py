"""What only the Triton backend has: launch tables whose tiles differ from the interpreter's, float32 dots kept
in full precision, and, on a GPU, odd shapes against float64.
Every scenario every fused backend meets is in tests/test_attention_conformance.py; the loads each kernel makes
are counted in tests/test_triton_load_counts.py, and tests/test_kernel_compilation.py compiles every GPU
family's launch tables.
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


@pytest.mark.parametrize("head_dim, split", [(40, True), (72, True), (80, True), (96, True), (160, True),
                                             (40, False), (160, False)],
                         ids=["40-split", "72-split", "80-split", "96-split", "160-split", "40-padded", "160-padded"])
def test_spatial_head_dim_split_or_padded(head_dim, split, monkeypatch, seed):
    """A launch table entry compiles Stable Diffusion's head dims in two blocks (40 = 32 + 16, 72 and 80 = 64 + 16,
    96 = 64 + 32, 160 = 128 + 32) or pads them (64, 256; the mma.sync tables pad some backward kernels); against
    float64, on a packed projection's views (head stride D, token stride 6 H D), the summed output's backward
    included."""
    from pychop.kernels import spatial_attention

    monkeypatch.setattr(spatial_attention, "INTERPRETER_CONFIG", spatial_attention.SpatialConfig(16, 16, 1, 1, split))
    check_against_reference("parallel", "triton", (1, 2, 19, 2, head_dim), torch.bfloat16, triton_device(), seed,
                            packed=True, causal=True)


def test_head_dim_split():
    """Two blocks only where they are narrower than padding to a power of two."""
    from pychop.kernels.tiles import head_dim_split

    expected = {10: (16, 0), 16: (16, 0), 24: (32, 0), 40: (32, 16), 56: (64, 0), 64: (64, 0), 72: (64, 16),
                80: (64, 16), 96: (64, 32), 112: (128, 0), 128: (128, 0), 160: (128, 32), 200: (256, 0),
                256: (256, 0)}
    assert {d: head_dim_split(d) for d in expected} == expected


@pytest.mark.parametrize("capability, shared_kib, family", [
    (80, 163, "sm80"), (86, 99, "sm86"), (87, 163, "sm86"), (89, 99, "sm86"), (90, 227, "sm90"),
    (90, 99, "sm86"), (100, 227, "sm100"), (103, 227, "sm100"), (120, 99, "sm120"), (121, 99, "sm120")])
def test_gpu_family_of_a_device(capability, shared_kib, family):
    """The launch table a device gets: by capability, never one asking for more shared memory than it has."""
    from pychop.kernels.gpu_families import family_of

    assert family_of(capability, shared_kib * 1024).name == family


def test_gpu_family_of_an_older_device():
    from pychop.kernels.gpu_families import family_of

    with pytest.raises(RuntimeError, match="compute capability 7.5 with 64 KiB"):
        family_of(75, 64 * 1024)


def test_alignment_the_host_proves():
    """16 bytes per row start only when every data pointer and every stride but the last allows it: a packed
    projection's head stride of 40 does (80 bytes), 10 does not, nor a view starting one element in."""
    from pychop.kernels.tiles import alignment

    packed = torch.zeros(1, 2, 3, 6, 2, 40, dtype=torch.bfloat16)
    assert alignment(packed[:, :, :, 0], packed[:, :, :, 5]) == 8
    assert alignment(packed[:, :, :, 0].float()) == 4
    assert alignment(torch.zeros(1, 2, 3, 2, 10, dtype=torch.bfloat16)) == 1
    assert alignment(packed[:, :, :, 0], packed[..., 1:][:, :, :, 0]) == 1


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
@pytest.mark.parametrize("head_dim", [40, 72, 80, 96, 160])
def test_stable_diffusion_head_dims_gpu(head_dim, dtype, seed):
    """Stable Diffusion's head dims on a packed projection's views: split or padded as the device's table says,
    16-byte loads where the head stride allows."""
    check_against_reference("parallel", "triton", (1, 3, 333, 2, head_dim), dtype, "cuda", seed, packed=True,
                            causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_spatial_gpu(dtype, seed):
    check_against_reference("spatial", "triton", (2, 3, 1000, 4, 64), dtype, "cuda", seed, packed=True)
