"""What only the "cpp" backend (pychop._C's CPU kernels) has: it must build here, "auto" picks it on a CPU, its
temporal backward splits tokens across threads, and its backward query blocks hold 128 rows. Every scenario every
fused backend meets is in tests/test_attention_conformance.py."""

import pytest
import torch

import pychop
from pychop.ops import backends
from tests.checks import check_against_reference

pytestmark = pytest.mark.numerics  # CI runs these once more on the AVX2 path (scripts/test.sh --avx2)


@pytest.fixture(scope="module", autouse=True)
def cpp_backend():
    try:
        backends.load("cpp", torch.device("cpu"))
    except pychop.BackendUnavailable as error:
        pytest.fail(f"the cpp backend must build on this machine: {error}")


@pytest.mark.parametrize("shape", [(2, 3, 5, 1, 10), (1, 8, 4000, 1, 10)], ids=str)
def test_head_dim_not_a_multiple_of_4(shape, seed):
    """D = 10: float32 rows written by 4-wide streaming stores would run 2 columns into the next token's row.
    Within one thread that row is written after and the overrun undone; with S = 4000 the temporal backward runs
    on two threads, and the row after the last of one thread's run of tokens belongs to the other thread, which
    has written it already."""
    check_against_reference("temporal", "cpp", shape, torch.float32, "cpu", seed, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["parallel", "spatial"])
def test_gradients_across_backward_query_blocks(op, dtype, seed):
    """S = 260: two whole 128-row backward query blocks and a partial one, whose dK, dV add up across blocks."""
    check_against_reference(op, "cpp", (1, 2, 260, 1, 16), dtype, "cpu", seed)


def test_auto_picks_cpp_on_cpu():
    assert backends.resolve("auto", torch.device("cpu")) == "cpp"
