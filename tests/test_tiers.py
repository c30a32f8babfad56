"""The quick tier (``bash scripts/test.sh --quick``, i.e. ``-m "not slow"``) keeps a test of every test module."""

from tests.tiers import COLLECTED


def test_quick_tier_touches_every_collected_module(request):
    """Over everything this run collected (all of tests/ in a plain or --quick run), before deselection."""
    collected = request.config.stash[COLLECTED]
    modules = {item.nodeid.split("::")[0] for item in collected}
    quick = {item.nodeid.split("::")[0] for item in collected if item.get_closest_marker("slow") is None}
    assert modules - quick == set(), "test modules whose every test is marked slow"
