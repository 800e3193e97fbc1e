"""The numbers the documentation quotes, generated from the results files.

A page quotes a measured number only inside a generated region:

    <!-- generated: drift -->

    ...text made by the generator "drift"...

    <!-- /generated -->

``tests/test_docs.py`` fails when a region differs from what its generator makes of the results
files now, so a rerun benchmark cannot leave a stale number behind. After a rerun:

    python tests/docs_numbers.py --write     # rewrite every region of README.md and docs/*.md

A generator is a function ``() -> str`` in ``GENERATORS``. It reads ``benchmarks/results/*.json``
and words the qualitative part too (which arms are significant, for example), so the sentence
always says what the file says.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SIGNIFICANT = 0.05  # the paired t-test level the pages use

_REGION = re.compile(
    r"<!-- generated: (?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /generated -->", re.DOTALL
)


@cache
def results(name: str) -> dict:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def _sci(value: float) -> str:
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _signed(value: float, digits: int = 2) -> str:
    text = f"{value:+.{digits}f}"
    return text.replace("-", "−")  # the pages' minus sign


def _sub(number: int) -> str:
    return str(number).translate(str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉"))


def _span(values: list[float], form) -> str:
    """One value when every value reads the same in ``form``, else "low–high"."""
    low, high = form(min(values)), form(max(values))
    return low if low == high else f"{low}–{high}"


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def drift() -> str:
    """The in-place drift against flatopt: ``benchmarks/results/drift.json``."""
    data = results("drift.json")
    config, runs = data["config"], data["results"]
    dtypes = list(runs)
    size, steps, sigma = config["size"], config["steps"], config["sigma"]
    lines = [
        "- **Weight.** "
        f"{size} × {size}, {config['weight_init'].split(' after')[0]}, σ = {sigma}, the "
        "row-norm law above.",
        f"- **In place.** {steps} round trips `W.add_(ε); W.sub_(ε)` with a fresh ε each step, "
        "ε regenerated from its seed for the subtraction, as the paper's code does.",
        f'- **flatopt.** The same {steps} steps through `FlatPerturb` (`schedule="constant"`) '
        "around a `LoRALinear` on the same weight. Each step is perturb, forward, backward, "
        "restore, SGD step.",
        f"- **Machine.** torch {data['torch'].split('+')[0]} on CPU, {data['threads']} threads.",
        "",
        f"| dtype | in place, 1 round trip: entries changed | in place, {steps} steps: entries "
        f"changed | in place, {steps} steps: ‖W{_sub(steps)} − W₀‖/‖W₀‖ | flatopt, {steps} "
        "steps: entries changed |",
        "|---|---:|---:|---:|---:|",
    ]
    for dtype in dtypes:
        in_place, flat = runs[dtype]["in_place"], runs[dtype]["flatopt"]
        lines.append(
            f"| {dtype} | {_percent(in_place['round_trip_changed_fraction'])} | "
            f"{_percent(in_place['changed_fraction'])} | {_sci(in_place['relative_drift'])} | "
            f"{flat['changed_fraction'] * size * size:.0f} |"
        )
    histories = {dtype: runs[dtype]["in_place"]["history"] for dtype in dtypes}
    marks = [entry["step"] for entry in histories[dtypes[0]]]
    growth = []
    for history in histories.values():
        first, last = history[0], history[-1]
        decades = math.log10(last["step"] / first["step"])
        growth.append((last["relative_drift"] / first["relative_drift"]) ** (1 / decades))
    ratio = _span(growth, lambda value: f"{value:.1f}")
    lines += [
        "",
        f"The relative drift keeps growing, by {ratio}× per tenfold more steps (a pure random "
        f"walk would give √10 ≈ {math.sqrt(10):.1f}×):",
        "",
        "| dtype | " + " | ".join(f"after {m} step{'s' if m > 1 else ''}" for m in marks) + " |",
        "|---|" + "---:|" * len(marks),
    ]
    for dtype, history in histories.items():
        cells = " | ".join(_sci(entry["relative_drift"]) for entry in history)
        lines.append(f"| {dtype} | {cells} |")
    linear = {dtype: _percent(runs[dtype]["round_trip_nn_linear_init"]) for dtype in dtypes}
    by_value: dict[str, list[str]] = {}
    for dtype, value in linear.items():
        by_value.setdefault(value, []).append(dtype)
    shares = _listing([f"{value} in {_listing(names)}" for value, names in by_value.items()])
    lines += [
        "",
        "How many entries one round trip changes depends on the weights' values: with "
        f"`nn.Linear`'s default init U(±1/{int(math.sqrt(size))}) at n = {size}, whose bound is "
        f"a power of two, it is {shares}.",
        "",
    ]
    exact = all(
        runs[d]["flatopt"]["exact"] and not runs[d]["flatopt"]["version_moved"] for d in dtypes
    )
    change = _span(
        [runs[d]["flatopt"]["perturbed_output_relative_change"] for d in dtypes], _percent
    )
    if exact and data["flatopt_exact"]:
        lines.append(
            f"With flatopt, in every dtype the base weight came back bitwise identical after the "
            f"{steps} steps, with an unmoved `._version` counter, while the perturbed forward's "
            f"output differed from the clean one by {change} (relative): the noise was really "
            "applied."
        )
    else:
        broken = [d for d in dtypes if not runs[d]["flatopt"]["exact"]]
        lines.append(f"**flatopt changed the base weight in {_listing(broken or dtypes)}.**")
    return "\n".join(lines)


def _arms(task: dict) -> list[str]:
    return [arm for arm in task["summary"] if arm != "LoRA"]


def _diff(task: dict, arm: str, metric: str) -> dict:
    return task["summary"][arm][metric]["diff"]


def _significant(
    task_name: str, task: dict, metric: str, sign: int, flat_only: bool, where: str = ""
) -> list[str]:
    """The arms whose paired difference in ``metric`` is significant with the given sign."""
    found = []
    for arm in _arms(task):
        if flat_only and not arm.startswith("Flat"):
            continue
        diff = _diff(task, arm, metric)
        if diff["p"] < SIGNIFICANT and sign * diff["mean"] > 0:
            found.append(f"{task_name} {arm}{where} (p = {diff['p']:.3f})")
    return found


_SHARPNESS_OVER = {"sharpness lora": ", LoRA layers", "sharpness lora+head": ", LoRA layers + head"}


def quality() -> str:
    """Clean accuracy against plain LoRA, and what was significant: ``quality.json``."""
    data = results("quality.json")
    tasks = data["tasks"]
    seeds = {"digits": data["config"]["digits_seeds"], "vader": data["config"]["vader_seeds"]}
    names = {"digits": "digits", "vader": "vader (MiniLM)"}
    order = [name for name in ("digits", "vader") if name in tasks]
    lines = [
        "| arm | " + " | ".join(f"{names[t]}, {seeds[t]} seeds" for t in order) + " |",
        "|---|" + "---|" * len(order),
    ]
    for arm in _arms(tasks[order[0]]):
        cells = []
        for name in order:
            diff = _diff(tasks[name], arm, "acc clean")
            low, high = diff["mean"] - diff["ci95"], diff["mean"] + diff["ci95"]
            cells.append(
                f"{_signed(diff['mean'])} [{_signed(low)}, {_signed(high)}], "
                f"{diff['wins']}/{seeds[name]}"
            )
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")

    def said(found: list[str], none: str, some: str) -> str:
        return none if not found else some + " " + _listing(found) + "."

    better = [f for t in order for f in _significant(t, tasks[t], "acc clean", +1, False)]
    worse = [f for t in order for f in _significant(t, tasks[t], "acc clean", -1, False)]
    sharp = [m for m in tasks[order[0]]["summary"]["LoRA"] if m.startswith("sharpness")]
    flatter, sharper = (
        [
            found
            for t in order
            for m in sharp
            for found in _significant(t, tasks[t], m, sign, True, _SHARPNESS_OVER.get(m, m))
        ]
        for sign in (-1, +1)
    )
    int4_less = [f for t in order for f in _significant(t, tasks[t], "drop int4", -1, True)]
    int4_more = [f for t in order for f in _significant(t, tasks[t], "drop int4", +1, True)]
    lines += [
        "",
        "- *Clean accuracy.* "
        + said(
            better,
            f"No arm is significantly better than plain LoRA (paired t-test, p < {SIGNIFICANT}).",
            "Significantly better than plain LoRA:",
        )
        + " "
        + said(worse, "None is significantly worse.", "Significantly worse:"),
        "- *Sharpness.* "
        + said(
            flatter,
            "No Flat arm lowered the measured sharpness significantly.",
            "Flat arms with a significantly lower sharpness:",
        )
        + " "
        + said(sharper, "", "Significantly higher:"),
        "- *int4 rounding.* "
        + said(
            int4_less,
            "No Flat arm made the int4 drop significantly smaller.",
            "Flat arms with a significantly smaller int4 drop:",
        )
        + " "
        + said(int4_more, "", "Significantly larger:"),
    ]
    return "\n".join(line.rstrip() for line in lines)


def quality_headline() -> str:
    """Clean accuracy over every task and arm, in one sentence: ``quality.json``."""
    data = results("quality.json")
    tasks = data["tasks"]
    comparisons = [(t, arm) for t in tasks for arm in _arms(tasks[t])]
    better = [f for t in tasks for f in _significant(t, tasks[t], "acc clean", +1, False)]
    seeds = ", ".join(f"{data['config'][t + '_seeds']} seeds on {t}" for t in tasks)
    if better:
        verdict = f"significantly better than plain LoRA: {_listing(better)}"
    else:
        verdict = "none was significantly better than plain LoRA"
    return (
        f"in clean test accuracy, of {len(comparisons)} arm-task comparisons ({seeds}), "
        f"{verdict} (paired t-test, p < {SIGNIFICANT})."
    )


def memory() -> str:
    """flatopt's persistent state on the memory benchmark's model: ``memory.json``."""
    data = results("memory.json")
    config, persistent = data["config"], data["persistent"]
    return (
        f"Measured on the memory benchmark's model ({config['layers']} layers of width "
        f"{config['width']}, {data['target_bytes'] / 2**20:.0f} MiB of target weights): "
        f"{persistent['total_bytes'] / 2**10:.0f} KiB of persistent state, "
        f"{100 * data['persistent_fraction_of_targets']:.2f}% of the target weights' bytes."
    )


GENERATORS = {
    "drift": drift,
    "quality": quality,
    "quality-headline": quality_headline,
    "memory": memory,
}


def generate(name: str) -> str:
    if name not in GENERATORS:
        raise KeyError(f"No generator {name!r}; tests/docs_numbers.py has {sorted(GENERATORS)}.")
    return GENERATORS[name]().strip()


def regions(page: str) -> list[tuple[str, str]]:
    """The generated regions of ``page``: (generator name, the text written there now)."""
    text = (ROOT / page).read_text(encoding="utf-8")
    return [(m["name"], m["body"].strip()) for m in _REGION.finditer(text)]


def write(page: str) -> bool:
    """Rewrite the regions of ``page`` from the results; True if the page changed."""
    path = ROOT / page
    text = path.read_text(encoding="utf-8")

    def region(match: re.Match) -> str:
        name = match["name"]
        return f"<!-- generated: {name} -->\n\n{generate(name)}\n\n<!-- /generated -->"

    new = _REGION.sub(region, text)
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def main() -> None:
    from docs_runner import pages

    parser = argparse.ArgumentParser(description="Check or rewrite the generated regions.")
    parser.add_argument("--write", action="store_true", help="rewrite stale regions in place")
    args = parser.parse_args()
    stale = []
    for page in pages():
        for name, body in regions(page):
            if body != generate(name):
                stale.append(f"{page}: {name}")
        if args.write:
            write(page)
    if not stale:
        print("every generated region is current")
    elif args.write:
        print("rewrote:\n" + "\n".join(stale))
    else:
        print("stale (python tests/docs_numbers.py --write):\n" + "\n".join(stale))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
