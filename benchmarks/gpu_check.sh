#!/usr/bin/env bash
# The GPU check: the CUDA test subset, the benchmarks with --device cuda and a profile of the
# GPU step, in at most 8 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default OUT_DIR: benchmarks/results/gpu)
#
# Run from anywhere, with the project's venv active (a CUDA build of torch, pytest and hypothesis;
# `python`, else `python3`); it installs nothing, and puts this checkout first on PYTHONPATH so
# that its flatopt is the one tested, installed or not. It stops at once, exit 2, where no CUDA
# device is visible. Each step has its own time limit, and together they fit in 8 minutes (the
# limits shrink if time runs short; a step that finds no time left is recorded as skipped).
# OUT_DIR receives:
#   gpu_check.json       the verdict; torch, CUDA and the GPU; the summary of the tests (counts,
#                        and each failure with its message); every step's command, exit status,
#                        seconds, and whether it timed out
#   tests.xml            `pytest --device cuda` in full (JUnit XML)
#   overhead.json        benchmarks/overhead.py --device cuda (the GPU reference configuration)
#   memory.json          benchmarks/memory.py --device cuda
#   overhead_profile.json  the same with --profile, fewer rounds: GPU time by aten op (optional)
#   gpu_profile.json     benchmarks/gpu_profile.py: host vs kernel time, launches, syncs and
#                        kernels per method, FlatPerturb's extra per target (optional)
#   overhead_tokens16384.json, overhead_accumulation4.json, overhead_width4096.json
#                        overhead.py --device cuda --rounds 5 with --tokens 16384, with
#                        --accumulation 4, and with --width 4096 --layers 4 --heads 32
#                        --tokens 8192 (optional)
#   gpu_check.log        what every step printed
# The exit status is 0 when every required step passed, 1 otherwise.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/benchmarks/results/gpu}
budget=470 # seconds for everything; 8 minutes less the time to start Python a few times
export PYTHONUNBUFFERED=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
python=$(command -v python || command -v python3) || {
  echo "gpu_check.sh: no python or python3 on PATH; activate the project's venv first." >&2
  exit 2
}

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check.sh: no CUDA device: torch.cuda.is_available() is False (or torch is missing)." >&2
  echo "Run it on a machine with an NVIDIA GPU, with the project's venv (a CUDA build of torch) active." >&2
  exit 2
fi
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
cd "$root" || exit 2
: >"$out/gpu_check.log"
steps_file=$(mktemp)
environment_file=$(mktemp)

"$python" - "$environment_file" <<'EOF'
import json, platform, sys, torch
props = torch.cuda.get_device_properties(0)
json.dump({
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version(),
    "gpu": torch.cuda.get_device_name(0),
    "gpu_memory_gib": round(props.total_memory / 2**30, 1),
    "gpu_count": torch.cuda.device_count(),
    "python": platform.python_version(),
}, open(sys.argv[1], "w"), indent=2)
EOF

failed=0

# run NAME LIMIT_S REQUIRED COMMAND...: one step under `timeout`, its output shown and appended
# to $out/gpu_check.log, recorded in $steps_file.
run() {
  local name=$1 limit=$2 required=$3
  shift 3
  local left=$((budget - SECONDS))
  if ((left < 20)); then
    echo "== $name: skipped, the 8-minute budget is spent" >&2
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" skipped "$required" 0 0 "$*" >>"$steps_file"
    [[ $required == required ]] && failed=1
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (at most ${limit} s): $*" | tee -a "$out/gpu_check.log" >&2
  local began=$SECONDS status
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$out/gpu_check.log"
  status=${PIPESTATUS[0]}
  local took=$((SECONDS - began))
  local timed_out=0
  ((status == 124 || status == 137)) && timed_out=1
  echo "== $name: exit $status in ${took} s" | tee -a "$out/gpu_check.log" >&2
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$required" "$took" "$timed_out" "$*" >>"$steps_file"
  if ((status != 0)) && [[ $required == required ]]; then
    failed=1
  fi
}

run tests 140 required "$python" -m pytest -p no:cacheprovider --device cuda -q -rfE tests \
  --junitxml "$out/tests.xml" -o junit_family=xunit2
run overhead 60 required "$python" benchmarks/overhead.py --device cuda --out "$out/overhead.json"
run memory 40 required "$python" benchmarks/memory.py --device cuda --out "$out/memory.json"
run overhead_profile 40 optional "$python" benchmarks/overhead.py --device cuda --profile \
  --rounds 3 --out "$out/overhead_profile.json"
run gpu_profile 60 optional "$python" benchmarks/gpu_profile.py --out "$out/gpu_profile.json"
run overhead_tokens16384 40 optional "$python" benchmarks/overhead.py --device cuda --rounds 5 \
  --tokens 16384 --out "$out/overhead_tokens16384.json"
run overhead_accumulation4 50 optional "$python" benchmarks/overhead.py --device cuda --rounds 5 \
  --accumulation 4 --out "$out/overhead_accumulation4.json"
run overhead_width4096 40 optional "$python" benchmarks/overhead.py --device cuda --rounds 5 \
  --width 4096 --layers 4 --heads 32 --tokens 8192 --out "$out/overhead_width4096.json"

"$python" - "$out" "$steps_file" "$environment_file" "$SECONDS" <<'EOF' || failed=1
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, steps_file, environment_file = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
seconds = int(sys.argv[4])
steps = []
for line in steps_file.read_text().splitlines():
    name, status, required, took, timed_out, command = line.split("\t", 5)
    steps.append({
        "step": name,
        "exit_status": None if status == "skipped" else int(status),
        "skipped": status == "skipped",
        "required": required == "required",
        "seconds": int(took),
        "timed_out": timed_out == "1",
        "command": command,
    })

tests = {"junit": None}
junit = out / "tests.xml"
if junit.exists():
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = lambda key: sum(int(s.get(key, 0)) for s in suites)
    problems = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                problems.append({
                    "test": f"{case.get('classname')}::{case.get('name')}",
                    "kind": kind,
                    "message": (node.get("message") or "")[:500],
                })
    tests = {
        "junit": str(junit),
        "tests": count("tests"),
        "failures": count("failures"),
        "errors": count("errors"),
        "skipped": count("skipped"),
        "seconds": sum(float(s.get("time", 0)) for s in suites),
        "problems": problems,
    }
    tests["passed"] = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]

tests_ok = tests.get("tests", 0) > 0 and not tests.get("failures") and not tests.get("errors")
ok = tests_ok and all(s["exit_status"] == 0 for s in steps if s["required"])
environment = json.loads(environment_file.read_text() or "null")
summary = {
    "ok": ok,
    "seconds": seconds,
    "environment": environment,
    "tests": tests,
    "steps": steps,
}
for name in ("overhead", "memory", "overhead_profile", "gpu_profile", "overhead_tokens16384",
             "overhead_accumulation4", "overhead_width4096"):
    path = out / f"{name}.json"
    summary[f"{name}_json"] = str(path) if path.exists() else None
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"tests: {tests.get('passed', 0)} passed, {tests.get('failures', 0)} failed, "
      f"{tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped")
for step in steps:
    print(f"{step['step']}: exit {step['exit_status']}, {step['seconds']} s"
          + (" (timed out)" if step["timed_out"] else ""))
print(f"{'OK' if ok else 'FAILED'} in {seconds} s; JSON in {out}")
sys.exit(0 if ok else 1)
EOF
rm -f "$steps_file" "$environment_file"
exit "$failed"
