"""Run the Python code blocks of a documentation page: the whole page as one script.

``tests/test_docs.py`` runs every page of README.md and docs/*.md through this file, each page in
a fresh interpreter, and reports every block as a test of its own. Run a page by hand with

    python tests/docs_runner.py docs/index.md

The rules a page follows:

- Every fenced block whose language is ``python`` (or ``py``) runs, in page order, in one shared
  namespace: a page is one script, and a later block may use what an earlier one defined. The
  working directory is an empty temporary folder, so a block that writes files leaves nothing in
  the repository.
- A block that only includes a file (``--8<-- "examples/recipes/amp.py"``, pymdownx.snippets) is
  not run here: ``tests/test_docs.py`` checks that the file exists and that a ``.ci/`` script
  runs it.
- A block that needs something CI may not have says so in an HTML comment on the line above its
  fence, which renders as nothing: ``<!-- needs: cuda -->``, ``<!-- needs: download -->`` or
  ``<!-- needs: peft transformers -->`` (import names). ``<!-- page-needs: ... -->`` anywhere
  on a page applies to every block of it. When a need is unmet the block is skipped, and the skip
  is reported with its reason. A need named in the environment variable ``FLATOPT_DOCS_REQUIRE``
  (space-separated) must be met: unmet, the block fails. Downloads are off unless
  ``FLATOPT_DOCS_DOWNLOADS=1``.
- A warning that flatopt raises and the block does not catch fails the block: a page must not
  show code that flatopt itself flags (a step that was never perturbed, say).
- After a failed block the page goes on, so that every failure is reported; a later failure
  may then follow from the first.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>.*)$")
_NEEDS = re.compile(r"^\s*<!--\s*needs:\s*(?P<needs>.+?)\s*-->\s*$")
_PAGE_NEEDS = re.compile(r"<!--\s*page-needs:\s*(?P<needs>.+?)\s*-->")
_INCLUDE = re.compile(r'^\s*--8<--\s+"(?P<path>[^"]+)"\s*$')
PYTHON = ("python", "py")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page.

    ``line`` is the 1-based line of the opening fence; the code's first line is ``line + 1``.
    """

    page: str
    line: int
    language: str
    code: str
    needs: tuple[str, ...] = ()
    includes: tuple[str, ...] = ()

    @property
    def runs(self) -> bool:
        return self.language in PYTHON and not self.includes

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[str]:
    """README.md and every page under docs/, as paths relative to the repository root."""
    docs = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "docs").rglob("*.md"))
    return [page for page in ("README.md", *docs) if (ROOT / page).is_file()]


def _dedent(line: str, indent: str) -> str:
    return line[len(indent) :] if line.startswith(indent) else line.lstrip(" \t")


def blocks(page: str) -> list[Block]:
    """Every fenced block of ``page``, in order, with its language, needs and includes.

    Raises:
        ValueError: a fence is never closed, or a block mixes includes with code.
    """
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    page_needs = tuple(
        need for match in _PAGE_NEEDS.finditer("\n".join(lines)) for need in match["needs"].split()
    )
    found = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        language = (opening["info"].split() or [""])[0].strip("{}.").lower()
        start = index
        body: list[str] = []
        index += 1
        while index < len(lines):
            closing = _FENCE.match(lines[index])
            if (
                closing
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            body.append(_dedent(lines[index], indent))
            index += 1
        else:
            raise ValueError(f"{page}:{start + 1}: the code fence {fence} is never closed.")
        index += 1
        needs = page_needs
        above = start - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        if above >= 0 and (match := _NEEDS.match(lines[above])):
            needs = needs + tuple(match["needs"].split())
        includes = tuple(m["path"] for line in body if (m := _INCLUDE.match(line)))
        if includes and len(includes) != len([line for line in body if line.strip()]):
            raise ValueError(
                f"{page}:{start + 1}: a block either includes files (--8<--) or holds code, "
                "not both; split it."
            )
        found.append(Block(page, start + 1, language, "\n".join(body), needs, includes))
    return found


def unmet(need: str) -> str | None:
    """Why ``need`` is not met here, or None if it is."""
    if need == "cuda":
        import torch

        return None if torch.cuda.is_available() else "no CUDA device"
    if need == "download":
        if os.environ.get("FLATOPT_DOCS_DOWNLOADS") == "1":
            return None
        return "downloads are off (FLATOPT_DOCS_DOWNLOADS=1 turns them on)"
    try:
        found = importlib.util.find_spec(need) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"{need} is not installed"


class _FlatoptWarnings:
    """Remembers the text of every warning that flatopt's own code raises."""

    def __init__(self) -> None:
        self.messages: set[str] = set()
        self._warn = warnings.warn

    def __call__(self, message, category=None, stacklevel=1, source=None, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller == "flatopt" or caller.startswith("flatopt."):
            self.messages.add(str(message))
        return self._warn(message, category, stacklevel + 1, source, **kwargs)


def run_page(page: str) -> list[dict]:
    """Run the page's blocks in order in one namespace; one outcome per runnable block."""
    required = set(os.environ.get("FLATOPT_DOCS_REQUIRE", "").split())
    flatopt_warnings = _FlatoptWarnings()
    warnings.warn = flatopt_warnings
    path = str(ROOT / page)
    namespace: dict = {"__name__": "__main__", "__file__": path}
    outcomes = []
    for block in blocks(page):
        if not block.runs:
            continue
        outcome = {"line": block.line, "id": block.id}
        reasons = [f"needs {need}: {why}" for need in block.needs if (why := unmet(need))]
        if reasons:
            must = [need for need in block.needs if need in required and unmet(need)]
            outcome["outcome"] = "failed" if must else "skipped"
            outcome["detail"] = "; ".join(reasons) + (
                f" (FLATOPT_DOCS_REQUIRE requires {' '.join(must)})" if must else ""
            )
            outcomes.append(outcome)
            continue
        # The page's own line numbers: a traceback points at the line in the Markdown file.
        code = compile("\n" * block.line + block.code, path, "exec")
        began = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                exec(code, namespace)
                outcome["outcome"] = "passed"
            except BaseException:
                outcome["outcome"] = "failed"
                outcome["detail"] = traceback.format_exc()
        outcome["seconds"] = round(time.perf_counter() - began, 3)
        flagged = [w for w in caught if str(w.message) in flatopt_warnings.messages]
        others = [w for w in caught if w not in flagged]
        for w in others:
            print(f"{block.id}: {w.category.__name__}: {w.message}", file=sys.stderr)
        if flagged and outcome["outcome"] == "passed":
            outcome["outcome"] = "failed"
            outcome["detail"] = "flatopt warned, and the block does not catch it:\n" + "\n".join(
                f"  {w.category.__name__}: {w.message}" for w in flagged
            )
        outcomes.append(outcome)
        print(f"{block.id} {outcome['outcome']} ({outcome['seconds']} s)", file=sys.stderr)
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description="Run one page's Python blocks as one script.")
    parser.add_argument("page", help="a page, relative to the repository root")
    parser.add_argument("--json", help="write the outcomes here")
    args = parser.parse_args()
    page = str(Path(args.page).resolve().relative_to(ROOT))
    with tempfile.TemporaryDirectory(prefix="flatopt-docs-") as work:
        os.chdir(work)
        outcomes = run_page(page)
        os.chdir(ROOT)
    if args.json:
        Path(args.json).write_text(json.dumps(outcomes, indent=1))
    for outcome in outcomes:
        if outcome["outcome"] != "passed":
            print(f"{outcome['id']} {outcome['outcome']}: {outcome.get('detail', '')}")
    sys.exit(any(outcome["outcome"] == "failed" for outcome in outcomes))


if __name__ == "__main__":
    main()
