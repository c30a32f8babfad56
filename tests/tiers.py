"""The test tiers (a pytest plugin, registered by tests/conftest.py): every collected item, kept before ``-m`` or
``-k`` deselect any, so that tests/test_tiers.py can check the quick tier (``-m "not slow"``, which
``bash scripts/test.sh --quick`` passes) against all of them."""

import pytest

COLLECTED = pytest.StashKey[list]()


@pytest.hookimpl(tryfirst=True)  # before the mark plugin deselects
def pytest_collection_modifyitems(config, items):
    config.stash[COLLECTED] = list(items)
