"""The documentation runs and cites what backs it.

- Every Python block of README.md and docs/*.md runs, each page as one script in a fresh
  interpreter (``tests/docs_runner.py`` has the rules). Each block is a test of its own, named
  ``page:line``; a block whose needs are unmet here (CUDA, a download, a package) is reported as
  skipped with the reason.
- A block that includes a file must include one that exists and that a loop of a ``.ci/``
  script runs (``for script in examples/recipes/*.py; do``).
- Every fence names its language, so no Python hides in an untagged block.
- Every test, results file, example or benchmark a page cites in backticks exists.
- Every generated region of a page is what ``tests/docs_numbers.py`` makes of the results now.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docs_numbers
import pytest
from docs_runner import ROOT, Block, blocks, pages

RUNNER = Path(__file__).with_name("docs_runner.py")
PAGE_SECONDS = 600
# Defaults for the pages' interpreters. Their models are tiny: one thread keeps them quick on
# a busy machine (flatopt's draws give the same bits on any thread count). No hub downloads
# unless they are turned on.
PAGE_ENV = {"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
if os.environ.get("FLATOPT_DOCS_DOWNLOADS") != "1":
    PAGE_ENV.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _all_blocks() -> list[Block]:
    return [block for page in pages() for block in blocks(page)]


PYTHON_BLOCKS = [block for block in _all_blocks() if block.language in ("python", "py")]


def _run_page(page: str) -> dict[int, dict]:
    """Run ``page`` in a fresh interpreter; its outcomes by the fence's line."""
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "outcomes.json"
        try:
            done = subprocess.run(
                [sys.executable, str(RUNNER), page, "--json", str(out)],
                cwd=ROOT,
                env={**PAGE_ENV, **os.environ},  # defaults: the environment may override them
                capture_output=True,
                text=True,
                timeout=PAGE_SECONDS,
            )
            log = done.stdout + done.stderr
        except subprocess.TimeoutExpired as timeout:
            partial = timeout.stderr or ""
            if isinstance(partial, bytes):
                partial = partial.decode(errors="replace")
            log = f"{page} ran past {PAGE_SECONDS} s.\n{partial}"
        if not out.exists():
            return {0: {"outcome": "failed", "detail": f"the page's run crashed:\n{log[-6000:]}"}}
        return {outcome["line"]: outcome for outcome in json.loads(out.read_text())}


@pytest.fixture(scope="module")
def page_runs(request):
    """Every page with a selected block, run in parallel (one thread each), as futures."""
    selected = sorted(
        {
            item.callspec.params["block"].page
            for item in request.session.items
            if getattr(item, "originalname", "") == "test_code_block"
            and not item.callspec.params["block"].includes
        }
    )
    with ThreadPoolExecutor(max_workers=max(1, min(len(selected), os.cpu_count() or 1))) as pool:
        yield {page: pool.submit(_run_page, page) for page in selected}


def _ci_globs() -> list[str]:
    """What the CI scripts run: the words of their `for ... in ...; do` loops."""
    return [
        glob
        for script in sorted((ROOT / ".ci").iterdir())
        for loop in re.findall(r"for \w+ in (.+?); do", script.read_text(encoding="utf-8"))
        for glob in loop.split()
    ]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda block: block.id)
def test_code_block(block, page_runs):
    if block.includes:
        ran_by_ci = {path for glob in _ci_globs() for path in ROOT.glob(glob)}
        for include in block.includes:
            assert (ROOT / include).is_file(), f"{block.id} includes {include}, which is missing"
            assert ROOT / include in ran_by_ci, (
                f"{block.id} includes {include}, which no loop of .ci/ runs "
                f"(they run {' '.join(_ci_globs())})"
            )
        return
    outcomes = page_runs[block.page].result()
    outcome = outcomes.get(block.line, outcomes.get(0))
    assert outcome is not None, f"{block.id} was not run"
    if outcome["outcome"] == "skipped":
        pytest.skip(f"{block.id}: {outcome['detail']}")
    if outcome["outcome"] == "failed":
        pytest.fail(f"{block.id} failed:\n{outcome['detail']}", pytrace=False)
    assert outcome["outcome"] == "passed"


@pytest.mark.parametrize("page", pages())
def test_every_fence_names_its_language(page):
    untagged = [block.id for block in blocks(page) if not block.language]
    assert not untagged, f"fences without a language (use python, bash, text, ...): {untagged}"


_CITED = re.compile(
    r"(?:`|\]\()(?P<path>(?:tests|benchmarks|examples|constraints|\.ci)(?:/[\w.*-]+)*?)"
    r"(?:::(?P<test>\w+))?[`)]"
)
_CITED_TEST = re.compile(r"`(?P<test>test_\w+)`")


@functools.cache
def _functions(path: Path) -> frozenset[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return frozenset(
        node.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    )


@pytest.mark.parametrize("page", pages())
def test_cited_files_and_tests_exist(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    missing = []
    for match in _CITED.finditer(text):
        path = ROOT / match["path"]
        if "*" in match["path"]:
            if not list(ROOT.glob(match["path"])):
                missing.append(match["path"])
        elif not path.exists():
            missing.append(match["path"])
        elif match["test"] and match["test"] not in _functions(path):
            missing.append(f"{match['path']}::{match['test']}")
    every_test = frozenset().union(*(_functions(p) for p in (ROOT / "tests").rglob("test_*.py")))
    missing += [m["test"] for m in _CITED_TEST.finditer(text) if m["test"] not in every_test]
    assert not missing, f"{page} cites what does not exist: {missing}"


def _pins() -> dict[str, set[str]]:
    pins: dict[str, set[str]] = {}
    for path in (ROOT / "constraints").glob("*.txt"):
        for line in path.read_text().splitlines():
            name, _, version = line.partition("==")
            if version and not line.startswith("#"):
                pins.setdefault(name.strip().lower(), set()).add(version.strip())
    return pins


@pytest.mark.parametrize("page", pages())
def test_quoted_versions_are_the_pinned_ones(page):
    """A version quoted next to a pinned package ("peft 0.21.2") is the pinned one."""
    text = (ROOT / page).read_text(encoding="utf-8")
    wrong = []
    for name, versions in _pins().items():
        pattern = rf"(?<![\w-]){re.escape(name)}(?: |==)(\d+\.\d+(?:\.\d+)?)\b"
        for quoted in re.findall(pattern, text, flags=re.IGNORECASE):
            if not any(v == quoted or v.startswith(quoted + ".") for v in versions):
                wrong.append(f"{name} {quoted} (constraints/ pins {', '.join(sorted(versions))})")
    assert not wrong, f"{page} quotes versions that are not the tested ones: {wrong}"


REGIONS = [(page, name) for page in pages() for name, _ in docs_numbers.regions(page)]


@pytest.mark.parametrize("page, name", REGIONS, ids=[f"{p}:{n}" for p, n in REGIONS])
def test_generated_text_is_what_the_results_say(page, name):
    written = dict(docs_numbers.regions(page))[name]
    assert written == docs_numbers.generate(name), (
        f"{page}: the region {name!r} no longer matches its source. Regenerate it with "
        "`python tests/docs_numbers.py --write` and read the new text: the prose around it "
        "may need to change too."
    )
