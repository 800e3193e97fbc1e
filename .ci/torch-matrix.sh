#!/usr/bin/env bash
# The main suite (the README's `python -m pytest`) on each torch version flatopt supports, one
# virtual environment per version: .venv-torch-<version>. Run by hand, not from .ci/run: every
# version but 2.13.0 is a CUDA build of several GB (the tests run on the CPU all the same).
#
#   bash .ci/torch-matrix.sh                 # the lowest supported, 2.13.0 and the newest
#   bash .ci/torch-matrix.sh 2.7.1 2.15.0    # just these (one below the supported range is
#                                            # installed with --no-deps, to show what breaks)
#
# Rerunnable: a venv that already holds the asked torch is kept, and only flatopt is
# reinstalled. Prints one summary line per version, keeps each version's pytest log in its venv
# (.venv-torch-<version>/pytest.log) and records the counts and failing tests in
# benchmarks/results/torch-matrix.json (other versions' entries are kept). Exits non-zero if
# any version failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg

# The lowest torch flatopt supports (keep it equal to the bound in pyproject.toml): 2.8 is the
# first with torch._C._autograd._top_saved_tensors_default_hooks, which flatopt needs to chain
# the saved-tensor hooks around its own and to unwind them after an interrupted forward.
LOWEST=2.8.0
NEWEST=2.15.0
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=("$LOWEST" 2.13.0 "$NEWEST")
results=benchmarks/results/torch-matrix.json
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "${SOURCE_COMMIT:-unknown}")
if git rev-parse HEAD >/dev/null 2>&1 && [ -n "$(git status --porcelain -- flatopt tests)" ]; then
  commit="$commit+dirty"
fi
start=$SECONDS
summary=()
status=0

# setup VERSION VENV: VENV holds torch VERSION and flatopt[dev] under a constraint that pins it.
setup() {
  local version=$1 venv=$2 pins
  if ! "$venv/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$version')" 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv" || return 1
  fi
  pins="$venv/constraints.txt"
  echo "torch==$version" > "$pins"
  "$venv/bin/pip" install -q -c "$pins" "torch==$version" || return 1
  if [ "$(printf '%s\n' "$version" "$LOWEST" | sort -V | head -1)" = "$LOWEST" ]; then
    "$venv/bin/pip" install -q -c "$pins" -e ".[dev]"
  else
    # Below pyproject's bound pip refuses flatopt, rightly: install it without its
    # dependencies to see what breaks there, and the dev extra on its own.
    "$venv/bin/pip" install -q --no-deps -e . &&
      "$venv/bin/pip" install -q -c "$pins" $("$venv/bin/python" -c \
        'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"])')
  fi
}

for version in "${versions[@]}"; do
  venv=".venv-torch-$version"
  echo "== torch $version ($venv)"
  t0=$SECONDS
  if ! setup "$version" "$venv"; then
    summary+=("torch $version: install failed")
    status=1
    continue
  fi
  t1=$SECONDS
  "$venv/bin/python" -m pytest -p no:cacheprovider --junitxml="$venv/junit.xml" 2>&1 |
    tee "$venv/pytest.log"
  code=${PIPESTATUS[0]}
  t2=$SECONDS
  [ "$code" -eq 0 ] || status=1
  line=$("$venv/bin/python" - "$results" "$version" "$venv" "$code" "$((t1 - t0))" \
    "$((t2 - t1))" "$commit" "$LOWEST" <<'EOF'
import datetime, json, os, platform, sys
import xml.etree.ElementTree as ET

import torch

path, version, venv, code, setup_s, test_s, commit, lowest = sys.argv[1:]


def key(v):
    return [int(part) for part in v.split(".")]


counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
failing, skipped = [], {}
if os.path.exists(f"{venv}/junit.xml"):
    for case in ET.parse(f"{venv}/junit.xml").iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            counts["failed"] += 1
            failing.append(name)
        elif "error" in kinds:
            counts["errors"] += 1
            failing.append(name)
        elif "skipped" in kinds:
            counts["skipped"] += 1
            reason = case.find("skipped").get("message", "")
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            counts["passed"] += 1
data = {}
if os.path.exists(path):
    with open(path) as f:
        data = json.load(f)
data["supported"] = f"torch>={lowest}"
data["command"] = "python -m pytest"
data.setdefault("runs", {})[version] = {
    "torch": torch.__version__,
    "python": platform.python_version(),
    "flatopt": commit,
    "date": datetime.date.today().isoformat(),
    "in_supported_range": key(version) >= key(lowest),
    "pytest_exit_code": int(code),
    **counts,
    "failing": failing,
    "skip_reasons": skipped,
    "install_s": int(setup_s),
    "test_s": int(test_s),
}
data["runs"] = dict(sorted(data["runs"].items(), key=lambda kv: key(kv[0])))
for run_version, run in data["runs"].items():
    run["in_supported_range"] = key(run_version) >= key(lowest)
with open(path, "w") as f:
    json.dump(data, f, indent=2)
    f.write("\n")
verdict = "ok" if int(code) == 0 else f"FAILED (pytest exit {code})"
if key(version) < key(lowest):
    verdict += f", below the supported torch>={lowest}"
print(
    f"torch {torch.__version__}: {counts['passed']} passed, {counts['failed']} failed, "
    f"{counts['errors']} errors, {counts['skipped']} skipped in {test_s} s "
    f"(install {setup_s} s): {verdict}"
)
EOF
  ) || line="torch $version: no result (pytest exit $code)"
  summary+=("$line")
done

echo "== torch matrix ($((SECONDS - start)) s, results in $results)"
printf '%s\n' "${summary[@]}"
exit $status
