"""The run's seed (tests/seeding.py): where it comes from, and that a printed seed replays a run."""

import json
import os
from pathlib import Path

import pytest

from tests.seeding import ENV, SEED_LIMIT, parse_seed, replay_command, run_seed

ROOT = Path(__file__).resolve().parent.parent


def test_seed_sources_in_order():
    assert run_seed("7", {ENV: "8"}) == 7
    assert run_seed(None, {ENV: "8"}) == 8
    assert run_seed(None, {ENV: str(SEED_LIMIT - 1)}) == SEED_LIMIT - 1
    draws = {run_seed(None, {}) for _ in range(4)}
    assert all(0 <= x < SEED_LIMIT for x in draws) and len(draws) > 1
    assert run_seed(None, {ENV: ""}) in range(SEED_LIMIT)  # an empty variable is no seed


@pytest.mark.parametrize("text", ["-1", str(2 ** 32), "0x10", "seven", "1.5"])
def test_bad_seed_is_named(text):
    with pytest.raises(ValueError, match=f"{ENV} must be an integer in \\[0, 4294967296\\), got '{text}'"):
        parse_seed(text, ENV)


def test_replay_command_quotes_the_test_id():
    assert replay_command(5, "tests/t.py::test[a b]") == f"{ENV}=5 python -m pytest 'tests/t.py::test[a b]'"


DRAWING_TESTS = '''
import json, os, random
import numpy, torch
from hypothesis import given, strategies as st

def record(name, value):
    with open(os.environ["DRAWS"], "a") as f:
        f.write(json.dumps([name, value]) + "\\n")

def test_generators(seed):
    record("seed", seed)
    record("draws", [torch.randn(3).tolist(), numpy.random.rand(), random.random()])

@given(st.integers(0, 10 ** 9))
def test_hypothesis(x):
    record("hypothesis", x)

def test_fails():
    assert torch.rand(()) > 2
'''


def run_drawing_tests(pytester, monkeypatch, draws: Path, *args, seed_env=None):
    """DRAWING_TESTS in a pytest subprocess with this plugin: its result and what the tests recorded."""
    pytester.makepyfile(test_draws=DRAWING_TESTS)
    monkeypatch.setenv("DRAWS", str(draws))
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if seed_env is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, seed_env)
    result = pytester.runpytest_subprocess("-p", "tests.seeding", "-p", "no:cacheprovider", *args)
    recorded = [json.loads(line) for line in draws.read_text().splitlines()]
    draws.unlink()
    return result, recorded


def test_a_printed_seed_replays_the_run(pytester, monkeypatch, tmp_path):
    """A run with PYCHOP_TEST_SEED prints it, names it in each failure's replay command, and draws what a run with
    --seed of the same value draws (torch, numpy, random and Hypothesis)."""
    first, drawn = run_drawing_tests(pytester, monkeypatch, tmp_path / "draws", seed_env="12345")
    first.assert_outcomes(passed=2, failed=1)
    first.stdout.fnmatch_lines(["pychop test seed: 12345 (replay with PYCHOP_TEST_SEED=12345 or --seed 12345)",
                                "*replay: PYCHOP_TEST_SEED=12345 python -m pytest test_draws.py::test_fails"])
    assert ["seed", 12345] in drawn and sum(name == "hypothesis" for name, _ in drawn) > 1
    again, redrawn = run_drawing_tests(pytester, monkeypatch, tmp_path / "draws", "--seed", "12345")
    again.assert_outcomes(passed=2, failed=1)
    assert redrawn == drawn
