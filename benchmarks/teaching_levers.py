"""The teaching-size benchmark on successive versions of flatopt: before and after each lever.

Each listed commit's ``flatopt/`` is extracted from git into a temporary folder, and this
checkout's ``benchmarks/overhead.py --teaching`` runs against it in a fresh process (same
model, same draws, same clocks). The rows are cumulative: each commit adds its lever to the one
before. Needs a git checkout; one run takes about 12 s per commit on an idle machine.

    python benchmarks/teaching_levers.py --out benchmarks/results/teaching_levers.json
    python benchmarks/teaching_levers.py --smoke --out /tmp/levers.json   # this checkout, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (commit, the lever it adds), oldest first.
LEVERS = [
    ("2f4465f", "before: closure hooks wrapped in torch.compiler.disable, identity row norms"),
    (
        "55ed6da",
        "hooks as small classes that test one attribute when unarmed; small weights' row "
        "norms from W' (one addmm + one norm); saved-tensor hooks pushed directly",
    ),
    (
        "50e9c39",
        "no torch.no_grad() decorators on the draw and the norms; no no-op reshape/to calls",
    ),
    (
        "e2d3ac2",
        "correctness and warnings: torch.func checks, the armed path always inside the "
        "compile-proof wrapper (a compiled model's eager frames must not be compiled), and "
        "unarmed training forwards counted for the never-silent warning",
    ),
    ("cdaa89d", "σ/√n carried by the addmm; grad mode switched off without a no_grad object"),
]


def run(commit: str, smoke: bool) -> dict:
    if smoke:  # the installed flatopt, no git needed: the script keeps working
        with tempfile.TemporaryDirectory() as folder:
            result = Path(folder) / "teaching.json"
            script = ROOT / "benchmarks" / "overhead.py"
            command = [sys.executable, str(script), "--teaching", "--smoke", "--out", str(result)]
            subprocess.run(command, check=True)
            return json.loads(result.read_text())["teaching"]
    with tempfile.TemporaryDirectory() as folder:
        tar = subprocess.run(
            ["git", "archive", commit, "flatopt"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=tar, check=True)
        result = Path(folder) / "teaching.json"
        command = [sys.executable, "-P", str(ROOT / "benchmarks" / "overhead.py"), "--teaching"]
        command += ["--smoke"] if smoke else []
        env = {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{ROOT / 'benchmarks'}"}
        subprocess.run([*command, "--out", str(result)], cwd=folder, env=env, check=True)
        return json.loads(result.read_text())["teaching"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="this checkout only, smoke size")
    parser.add_argument("--out", help="JSON output")
    args = parser.parse_args()
    levers = [("installed", "the flatopt this checkout installs")] if args.smoke else LEVERS
    rows = []
    for commit, lever in levers:
        teaching = run(commit, args.smoke)
        summary = teaching["cpu_summary"]
        rows.append({"commit": commit, "lever": lever, "summary": summary})
        print(
            f"{commit}: flat/lora {summary['flat_over_lora']:.3f}, "
            f"extra {summary['flat_extra_us_per_target']:.1f} µs/target, unarmed hooks "
            f"{summary['unarmed_hooks_us_per_target']:.1f} µs/target ({lever})"
        )
    if args.out:
        report = {
            "benchmark": "teaching_levers",
            "command": " ".join(sys.argv),
            "clock": "thread CPU time, medians of per-round values",
            "rows": rows,
            "load_average": os.getloadavg(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
