"""The test suite's one source of randomness (a pytest plugin, registered by tests/conftest.py).

Each run has one seed: ``--seed N`` or ``PYCHOP_TEST_SEED=N`` (an integer in [0, 2**32)), else one drawn from
os.urandom. Before every test, torch's, numpy's and Python's global generators are seeded with it, so a test
draws the same inputs whichever tests run before it; the ``seed`` fixture returns it for failure messages.
Hypothesis takes it as its seed (``--hypothesis-seed`` overrides) and keeps no example database
(tests/conftest.py's profile), so a run depends on its seed alone. The report header prints the seed, and each
failing test's report ends with the command that replays it. pytest-xdist's workers take the controller's seed.
"""

from __future__ import annotations

import os
import random
import shlex

import numpy
import pytest
import torch

ENV = "PYCHOP_TEST_SEED"
SEED_LIMIT = 2 ** 32  # numpy's legacy seeding takes [0, 2**32)
SEED_KEY = pytest.StashKey[int]()
WORKER_KEY = "pychop_test_seed"


def parse_seed(text: str, source: str) -> int:
    """The seed written in `text`, an integer in [0, 2**32); a ValueError naming `source` otherwise."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{source} must be an integer in [0, {SEED_LIMIT}), got {text!r}")
    return value


def run_seed(option: str | None, environ) -> int:
    """The run's seed: `option` (--seed), else the environment's PYCHOP_TEST_SEED, else a fresh draw."""
    if option is not None:
        return parse_seed(option, "--seed")
    if environ.get(ENV, "") != "":
        return parse_seed(environ[ENV], ENV)
    return int.from_bytes(os.urandom(4), "little")


def replay_command(seed: int, nodeid: str) -> str:
    """The shell command that runs test `nodeid` again with `seed`."""
    return f"{ENV}={seed} python -m pytest {shlex.quote(nodeid)}"


def seed_generators(seed: int) -> None:
    """Seeds torch's, numpy's and Python's global generators."""
    torch.manual_seed(seed)
    numpy.random.seed(seed)
    random.seed(seed)


def pytest_addoption(parser):
    parser.addoption("--seed", default=None, help=f"the run's random seed, 0 <= N < 2**32 (or {ENV}=N; default: "
                                                  "drawn at random and printed in the report header)")


@pytest.hookimpl(tryfirst=True)  # before Hypothesis's plugin reads --hypothesis-seed
def pytest_configure(config):
    worker = getattr(config, "workerinput", {})  # a pytest-xdist worker takes the controller's seed
    try:
        seed = worker[WORKER_KEY] if WORKER_KEY in worker else run_seed(config.getoption("seed"), os.environ)
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None
    config.stash[SEED_KEY] = seed
    if getattr(config.option, "hypothesis_seed", "absent") is None:
        config.option.hypothesis_seed = str(seed)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    node.workerinput[WORKER_KEY] = node.config.stash[SEED_KEY]


def pytest_report_header(config):
    seed = config.stash[SEED_KEY]
    return f"pychop test seed: {seed} (replay with {ENV}={seed} or --seed {seed})"


@pytest.fixture(autouse=True)
def _seeded_generators(request):
    seed_generators(request.config.stash[SEED_KEY])


@pytest.fixture
def seed(request):
    """The run's seed, already set for torch, numpy and random: failure messages name it."""
    return request.config.stash[SEED_KEY]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        command = replay_command(item.config.stash[SEED_KEY], item.nodeid)
        report.sections.append(("pychop test seed", f"replay: {command}"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"):
        seed = config.stash[SEED_KEY]
        terminalreporter.write_line(f"pychop test seed: {seed}; replay a failed test with "
                                    f"{replay_command(seed, '<test id>')}")
