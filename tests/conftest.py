"""Test set-up: poisoned kernel outputs, Triton's interpreter on CPU-only machines, the gpu marker, one seed per
run (tests/seeding.py), the record of what the tiers hold (tests/tiers.py)."""

import os

# Both must be set before pychop's kernels or Triton are imported.
os.environ.setdefault("PYCHOP_POISON_OUTPUTS", "1")
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

pytest_plugins = ("tests.seeding", "tests.tiers", "pytester")

# No example database: a run's examples follow from its seed alone (tests/seeding.py sets Hypothesis's seed).
settings.register_profile("pychop", deadline=None, max_examples=20, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "pychop"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def deterministic_setting():
    """Restores torch's deterministic-algorithms setting after the test."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
