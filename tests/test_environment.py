"""The test set-up itself: what pytest.ini asks for is in force."""


def test_the_per_test_timeout_of_pytest_ini_is_enforced(pytestconfig):
    """pytest.ini's ``timeout`` is read by pytest-timeout alone (without it the line does nothing): the test extra
    lists it and scripts/setup_env.sh installs that extra."""
    assert pytestconfig.pluginmanager.hasplugin("timeout"), (
        "pytest-timeout is not installed, so pytest.ini's timeout does nothing (pip install pytest-timeout)")
    assert float(pytestconfig.getini("timeout")) > 0
