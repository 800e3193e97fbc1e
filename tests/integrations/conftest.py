"""Integration tests against the real LoRA libraries; each file needs its library installed.

They are not part of the main suite (pyproject's ``norecursedirs``): ``.ci/integrations.sh``
runs them in virtual environments that hold the pinned libraries. A missing library fails the
file at import: there is no skip.
"""

import sys
from pathlib import Path

import pytest

# The shared helpers live in tests/ and in this folder.
for folder in (Path(__file__).parent, Path(__file__).parent.parent):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skipped integration test fails: "skip nothing silently". Deselect a file in
    .ci/integrations.sh instead, where the reason is printed in the log."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"integration tests may not skip; this one did: {report.longrepr}"
