"""The Methods page quotes benchmarks/results/methods.json: every ratio in its cost table."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = {"Flat-LoRA": "flat-lora", "Bi-LoRA": "bi-lora", "LoRA-SAM": "lora-sam"}


def test_the_cost_table_is_what_the_benchmark_measured():
    results = json.loads((ROOT / "benchmarks/results/methods.json").read_text())["methods"]
    page = (ROOT / "docs/methods.md").read_text(encoding="utf-8")
    rows = re.findall(
        r"^\| (Flat-LoRA|Bi-LoRA|LoRA-SAM) \| ([\d.]+) × \| ([\d.]+) × \|$", page, re.M
    )
    assert [name for name, _, _ in rows] == list(NAMES)
    for name, time_ratio, peak_ratio in rows:
        measured = results[NAMES[name]]
        assert time_ratio == f"{measured['time_vs_lora']:.2f}", name
        assert peak_ratio == f"{measured['peak_vs_lora']:.2f}", name
