"""The Triton backend against the float64 reference: forward and every gradient, every option and dtype.

On a CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so sizes are
small but odd: S = 1, 7, 33 (never a multiple of the 16-token interpreter blocks), T = 1, 3, 17, D = 40, 64,
80, 128 (padded to 64, 128 in the kernels). The gpu tests run DESIGN.md's sizes and odd ones on a GPU.
Outputs are NaN-poisoned (PYCHOP_POISON_OUTPUTS=1), so an element a kernel leaves unwritten fails.
"""

import pytest
import torch

from pychop.ops import backends
from tests.checks import (DTYPES, ERROR_FACTOR, FLOOR, GRAD_NAMES, TEMPORAL_OPTIONS, assert_finite,
                          check_against_reference, check_kernel_statistics, dominating_key_inputs, dtype_id,
                          forward_backward, input_count, make_inputs, nan_padded_inputs, op_call, options_id,
                          reference_call, relative_error, temporal_dominated_inputs)



def triton_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("options", TEMPORAL_OPTIONS, ids=options_id)
@pytest.mark.parametrize("op", ["parallel", "stacked", "temporal"])
def test_temporal_options(op, options, seed):
    check_against_reference(op, "triton", (2, 5, 7, 1, 16), torch.float32, triton_device(), seed, **options)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("op, options", [
    ("parallel", {}),
    ("parallel", {"causal": True, "grad_window": 2}),
    ("stacked", {"causal": True, "grad_window": 2}),
    ("temporal", {"window": 2, "grad_window": 1}),
    ("spatial", {}),
], ids=["parallel", "parallel-causal-grad2", "stacked-causal-grad2", "temporal-window2-grad1", "spatial"])
def test_dtypes_with_tokens_across_blocks(op, options, dtype, seed):
    check_against_reference(op, "triton", (1, 3, 33, 2, 40), dtype, triton_device(), seed, **options)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", [40, 64, 80, 128])
def test_head_dims(head_dim, dtype, seed):
    check_against_reference("parallel", "triton", (1, 3, 7, 1, head_dim), dtype, triton_device(), seed,
                            causal=True, grad_window=1)


@pytest.mark.parametrize("frames, options", [
    (1, {}),
    (1, {"causal": True, "grad_window": 1}),
    (3, {"window": 2}),
    (17, {"causal": True, "grad_window": 4}),
    (17, {"grad_window": 3}),
])
def test_frame_counts(frames, options, seed):
    check_against_reference("parallel", "triton", (1, frames, 5, 1, 40), torch.float32, triton_device(), seed,
                            **options)


@pytest.mark.parametrize("tokens", [2, 7, 33])
def test_token_counts(tokens, seed):
    check_against_reference("parallel", "triton", (2, 2, tokens, 2, 24), torch.float16, triton_device(), seed,
                            causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("op, options", [("parallel", {"causal": True}), ("temporal", {"causal": True}),
                                         ("spatial", {})])
def test_single_token(op, options, dtype, seed):
    """S = 1: the spatial q/k gradients are zero in exact arithmetic, where the relative rule of
    check_against_reference divides by zero. Errors are measured against the largest reference gradient
    instead, with the same ERROR_FACTOR x torch-path error + FLOOR bound."""
    count = input_count(op)
    inputs = make_inputs((2, 3, 1, 2, 40), dtype, triton_device(), count)
    out, dout, grads = forward_backward(lambda *x: op_call(op, x, backend="triton", **options), inputs)
    base_out, _, base = forward_backward(lambda *x: op_call(op, x, backend="torch", **options), inputs, dout)
    inputs64 = [x.detach().double().requires_grad_() for x in inputs]
    ref_out, _, reference = forward_backward(lambda *x: reference_call(op, x, **options), inputs64,
                                             dout.double())
    assert relative_error(out, ref_out) <= ERROR_FACTOR * relative_error(base_out, ref_out) + FLOOR[dtype]
    reference = [torch.zeros_like(x, dtype=torch.float64) if r is None else r for x, r in zip(inputs64, reference)]
    largest = max(r.abs().max().item() for r in reference)
    for name, actual, baseline, expected in zip(GRAD_NAMES[count], grads, base, reference):
        assert_finite(actual, name)
        error = (actual.double() - expected).abs().max().item() / largest
        base_error = (baseline.double() - expected).abs().max().item() / largest
        bound = ERROR_FACTOR * base_error + FLOOR[dtype]
        assert error <= bound, f"{name}: error {error:.3g} of the largest gradient > {bound:.3g} ({op} {dtype})"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("op, options", [
    ("parallel", {"window": 2, "grad_window": 1}),
    ("stacked", {"window": 2, "grad_window": 1}),
    ("temporal", {"causal": True}),
    ("spatial", {}),
])
def test_packed_projection_views(op, options, dtype, seed):
    """Strided views of one (B, T, S, n, H, D) projection: read in place, gradients land in the projection."""
    check_against_reference(op, "triton", (1, 3, 19, 2, 40), dtype, triton_device(), seed, packed=True,
                            **options)


def test_strided_output_gradient(seed):
    """An upstream gradient with unusual strides (last one 1) is read as it lies."""
    inputs = make_inputs((1, 3, 9, 2, 16), torch.float32, triton_device(), packed=True)
    dout = torch.randn(1, 3, 2, 9, 16, device=triton_device()).transpose(2, 3)  # (B, T, S, H, D) view
    _, _, grads = forward_backward(lambda *x: op_call("parallel", x, backend="triton", causal=True), inputs, dout)
    _, _, expected = forward_backward(lambda *x: op_call("parallel", x, backend="torch", causal=True), inputs,
                                      dout)
    for name, actual, reference in zip(GRAD_NAMES[6], grads, expected):
        torch.testing.assert_close(actual, reference, rtol=1e-4, atol=1e-4, msg=name)


def test_kernel_interface_statistics(seed):
    """forward() returns each branch's natural-log logsumexp of the scaled scores, (B, T, H, S) float32."""
    check_kernel_statistics(backends.load("triton", torch.device(triton_device())), triton_device())


@pytest.mark.parametrize("block_m, block_n", [(32, 16), (16, 32)])
def test_unequal_tiles(block_m, block_n, monkeypatch, seed):
    """The interpreter runs every kernel with 16 x 16 tiles, where BLOCK_M and BLOCK_N (and so a loop or a grid
    taken over the wrong one) are interchangeable; the GPU launch table's tiles are not (the key kernel's are
    32 x 128 at D <= 64 in 16 bits). Unequal tiles here too, S = 33 across several of each."""
    from pychop.kernels import parallel_st_attention as attention

    monkeypatch.setattr(attention, "_INTERPRETER_CONFIG", attention.LaunchConfig(block_m, block_n, 1, 1))
    check_against_reference("stacked", "triton", (1, 2, 33, 1, 16), torch.float32, triton_device(), seed,
                            causal=True)


@pytest.mark.parametrize("op", ["spatial", "temporal"])
def test_scores_falling_by_more_than_the_exponent_range(op, seed):
    """The online softmax must keep a running maximum over all key blocks and frames: each query's one key
    scoring about 200 above the others (frame 0's at token 0, before all later blocks) would otherwise be
    rescaled by exp(200), past float32's range."""
    shape = (1, 3, 33, 1, 16)
    inputs = dominating_key_inputs(op, shape, torch.float32, triton_device())
    check_against_reference(op, "triton", shape, torch.float32, triton_device(), seed, inputs=inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_temporal_branch_dominating_the_saved_sum(dtype, seed):
    """Summed, the backward reads only out = o_s + o_t rounded to 16 bits: the query kernel corrects dq_s with
    the exact delta_s = rowsum(P dP) and hands that, not the rounded one, to the key kernel."""
    shape = (1, 3, 19, 1, 16)
    inputs = temporal_dominated_inputs(shape, dtype, triton_device())
    check_against_reference("parallel", "triton", shape, dtype, triton_device(), seed, inputs=inputs)


@pytest.mark.parametrize("op, options", [("parallel", {"causal": True, "grad_window": 1}),
                                         ("stacked", {"window": 2})], ids=["parallel-causal-grad1", "stacked-window2"])
def test_nothing_read_past_the_head_dim(op, options, seed):
    """D = 40 runs in 64-column tiles: every load masks columns D..63. Inputs whose rows continue with NaN up to
    the padded width (views of wider tensors, last stride 1) show a load that does not."""
    shape = (1, 3, 7, 2, 40)
    inputs = nan_padded_inputs(shape, torch.float32, triton_device(), input_count(op), width=64)
    check_against_reference(op, "triton", shape, torch.float32, triton_device(), seed, inputs=inputs, **options)


def test_float32_dots_launched_in_full_precision(monkeypatch, seed):
    """float32 stays float32: every tl.dot of a float32 launch is "ieee", never TF32. The interpreter multiplies
    in full precision whatever input_precision says, so the launches' constants are checked here (the gpu
    tests see TF32 as error)."""
    from pychop.kernels import parallel_st_attention as attention

    launches = []

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.name, kwargs["DOT_PRECISION"]))
                return self.kernel[grid](*args, **kwargs)
            return launch

    names = ("_forward_kernel", "_backward_query_kernel", "_backward_key_kernel")
    for name in names:
        monkeypatch.setattr(attention, name, Recorder(name, getattr(attention, name)))
    inputs = make_inputs((1, 2, 3, 1, 16), torch.float32, triton_device())
    forward_backward(lambda *x: op_call("parallel", x, backend="triton", causal=True), inputs)
    assert len(launches) == 3 and all(precision == "ieee" for _, precision in launches), launches


# ----------------------------------------------------------------------------------------------------------
# GPU: DESIGN.md's sizes, and odd sizes against the float64 loop reference.
# ----------------------------------------------------------------------------------------------------------

DESIGN_SHAPES = {  # (B, T, S, H, D)
    "A": (1, 16, 64 * 64, 5, 64),
    "B": (2, 16, 32 * 32, 10, 64),
    "C": (1, 32, 64 * 64, 8, 64),
    "D": (1, 16, 32 * 32, 8, 128),
    "E": (4, 64, 16 * 16, 8, 64),
    "F": (2, 16, 32 * 32, 8, 40),
}


def check_against_float32_torch(shape, dtype, **options):
    """check_against_reference's rule with the torch backend in float32 on upcast inputs as the reference
    (the float64 loop reference would need tens of GiB at these sizes)."""
    inputs = make_inputs(shape, dtype, "cuda")
    out, dout, grads = forward_backward(lambda *x: op_call("parallel", x, backend="triton", **options), inputs)
    base_out, _, base_grads = forward_backward(lambda *x: op_call("parallel", x, backend="torch", **options),
                                               inputs, dout)
    inputs32 = [x.detach().float().requires_grad_() for x in inputs]
    ref_out, _, ref_grads = forward_backward(lambda *x: op_call("parallel", x, backend="torch", **options),
                                             inputs32, dout.float())
    for name, actual, baseline, reference in zip(("out",) + GRAD_NAMES[6], (out, *grads), (base_out, *base_grads),
                                                 (ref_out, *ref_grads)):
        assert_finite(actual, name)
        error, base_error = relative_error(actual, reference.double()), relative_error(baseline, reference.double())
        bound = ERROR_FACTOR * base_error + FLOOR[dtype]
        assert error <= bound, f"{name}: {error:.3g} > {bound:.3g} at {shape} {dtype} {options}"


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{}, {"causal": True, "grad_window": 1}, {"window": 8, "grad_window": 4}],
                         ids=str)
@pytest.mark.parametrize("shape_name", list(DESIGN_SHAPES))
def test_design_shapes_gpu(shape_name, options):
    torch.manual_seed(0)
    check_against_float32_torch(DESIGN_SHAPES[shape_name], torch.bfloat16, **options)


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


# ----------------------------------------------------------------------------------------------------------
# Without a GPU: the kernels compile for Hopper (sm_90) with the launch table's settings.
# ----------------------------------------------------------------------------------------------------------

def compile_for_hopper(kernel, dtype, head_dim, config, stacked):
    """Compiles `kernel` ahead of time for sm_90 as a launch with 16-byte aligned pointers and strides would
    (both branches, causal; `stacked`: the branches written apart)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pychop.kernels import parallel_st_attention as attention

    element = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    names = list(inspect.signature(kernel.fn).parameters)
    constants = dict(HAS_SPATIAL=True, HAS_TEMPORAL=True, CAUSAL=True, STACKED=stacked, OUT_IS_SUM=not stacked,
                     D=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                     BLOCK_D=attention._head_dim_block(head_dim),
                     DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", UPCAST_DOT=False)
    constants = {name: value for name, value in constants.items() if name in names}
    signature, attrs = {}, {}
    for index, name in enumerate(names):
        if name in constants:
            signature[name] = "constexpr"
        elif name == "scale":
            signature[name] = "fp32"
        elif name[0].isupper() and len(name) > 1:  # tensors
            signature[name] = "*fp32" if name.startswith(("Lse", "Delta")) else f"*{element}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name.startswith("s"):  # strides
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                       constexprs={(names.index(name),): value for name, value in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


HOPPER_SHARED_MEMORY_PER_BLOCK = 227 * 1024  # the most one program may ask for on sm_90 (opt-in limit)


def compile_all_for_hopper(dtype_name, head_dim, stacked):
    """Compiles the three kernels with the launch table's settings; prints one line per kernel."""
    from pychop.kernels import parallel_st_attention as attention

    dtype = getattr(torch, dtype_name)
    configs = attention._GPU_CONFIGS[(64 if head_dim <= 64 else 128 if head_dim <= 128 else 256,
                                      dtype.itemsize == 2)]
    kernels = (attention._forward_kernel, attention._backward_query_kernel, attention._backward_key_kernel)
    for kernel, config in zip(kernels, configs):
        compiled = compile_for_hopper(kernel, dtype, head_dim, config, stacked)
        if dtype != torch.float32:  # float32 stays exact ("ieee"): CUDA-core FMAs, no tensor cores
            assert "mma" in compiled.asm["ptx"], f"{kernel.fn.__name__}: no tensor-core instructions"
        assert compiled.metadata.shared <= HOPPER_SHARED_MEMORY_PER_BLOCK, (
            f"{kernel.fn.__name__} {config}: {compiled.metadata.shared} bytes of shared memory would not launch")
        print(kernel.fn.__name__, config, "shared memory", compiled.metadata.shared)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu tests run the kernels themselves")
@pytest.mark.parametrize("dtype_name, head_dim, stacked", [  # one per row of the launch table
    ("bfloat16", 64, False), ("float32", 40, True), ("bfloat16", 128, True), ("float32", 80, False),
    ("float16", 160, False), ("float32", 256, True)])
def test_kernels_compile_for_hopper(dtype_name, head_dim, stacked):
    """The interpreter accepts code the GPU compiler may not, and ignores shared memory: compile for sm_90 in
    a process without it, every launch-table setting within the shared memory a program may have."""
    import os
    import pathlib
    import subprocess
    import sys

    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    code = ("from tests.test_attention_triton import compile_all_for_hopper; "
            f"compile_all_for_hopper({dtype_name!r}, {head_dim}, {stacked})")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            cwd=pathlib.Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("shared memory") == 3, result.stdout
