"""Under CI=true a skipped test fails the run, unless CI_MAY_SKIP names it: a skip that hides
in CI (a tool that failed to install, a fixture that found nothing) is a test that did not run.

Loaded by tests/conftest.py as a pytest plugin.
"""
import os

import pytest

# The tests CI may skip, by node id without parameters, each with the reason it may.
CI_MAY_SKIP = {
    "tests/test_reliability.py::test_cuda_without_a_gpu_exits_2":
        "checks the error for --device cuda where no GPU is visible: a runner with a GPU skips it",
}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and item.nodeid.split("[")[0] not in CI_MAY_SKIP:
        reason = (report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)).removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = (f"skipped under CI=true ({reason}); only the tests in tests/ci_skips.py's "
                           f"CI_MAY_SKIP may skip in CI")
