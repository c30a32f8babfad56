"""python -m pychop.check: every backend that runs here on both spatial paths, its errors against the bound, its
time, what auto takes; a backend computing wrong results, or failing, fails the check."""

import pytest
import torch

from pychop import check
from pychop.ops import extension_attention
from tests.checks import runnable_backends

TINY = check.SMOKE_SHAPES


def test_check_runs_every_backend_on_both_paths(capsys):
    assert check.main(["--device", "cpu", "--repeats", "1", "--threads", "1", "--smoke"]) == 0
    printed = capsys.readouterr().out
    rows = check.run(torch.device("cpu"), TINY, (torch.float32,), repeats=1)
    expected = {("torch", "-")} | {(name, path) for name in runnable_backends() if name != "torch"
                                   for path in ("sdpa", "kernel")}
    assert {(row["backend"], row["spatial_path"]) for row in rows} == expected
    assert all(row["passed"] and row["ms"] > 0 for row in rows)
    assert next(row for row in rows if row["backend"] == "torch")["vs_torch"] == 1.0
    assert "auto at smoke (float32): " in printed and f"{len(rows)} of {len(rows)} cases passed" in printed


@pytest.mark.slow  # runs the check twice: seconds
@pytest.mark.skipif("cpp" not in runnable_backends(), reason="needs the cpp backend")
def test_a_wrong_or_failing_backend_fails_the_check(monkeypatch, capsys):
    real_forward = extension_attention.forward

    def off_by_a_little(*args, **kwargs):
        out, lse_s, lse_t = real_forward(*args, **kwargs)
        out.mul_(1.001)
        return out, lse_s, lse_t

    monkeypatch.setattr(extension_attention, "forward", off_by_a_little)
    assert check.main(["--device", "cpu", "--repeats", "1", "--smoke"]) == 1
    assert "FAIL" in capsys.readouterr().out

    def broken(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(extension_attention, "forward", broken)
    rows = check.run(torch.device("cpu"), TINY, (torch.float32,), repeats=1)
    failed = [row for row in rows if row["backend"] == "cpp"]
    assert failed and all(not row["passed"] and "ValueError: a bug" in row["failure"] for row in failed)
