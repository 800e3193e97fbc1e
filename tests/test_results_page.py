"""The Results and Choosing σ pages say what the results files say, number by number.

- ``benchmarks/results/{sigma,sigma_steps,sigma_pretrain,quality}.md`` are what
  ``benchmarks/quality.py`` writes from the JSON next to them (the tables are regenerated here).
- Every table row the pages show with measured values is a row of those files.
- Every number in the pages' prose is one of:
  - part of a claim in ``CLAIMS``, recomputed here from the JSON (a count of significant results,
    a paired difference with its interval and wins, a time);
  - a setting of the runs, read from the JSON's ``config`` and ``arms`` (seeds, σ, epochs...);
  - a constant listed in ``CONSTANTS`` with where it comes from (the confidence level, the
    pilot that chose the rotated task).

A sentence that also says something in words ("none was significant") has that checked too.

After a rerun of the benchmark, this test names each sentence whose numbers have changed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality  # noqa: E402
import quality_real  # noqa: E402
from docs_numbers import _REGION  # noqa: E402

FILES = ("sigma", "sigma_pretrain", "sigma_steps", "quality")
PAGES = ("docs/results.md", "docs/choosing-sigma.md")


@cache
def report(name: str) -> dict:
    data = json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))
    quality.add_holm(data)
    return data


# -- formatting, as the pages write numbers ----------------------------------------------------


def signed(value: float, digits: int = 2) -> str:
    return f"{value:+.{digits}f}".replace("-", "−")


def plain(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}".replace("-", "−")


def diff(name: str, task: str, arm: str, metric: str, digits: int = 2) -> dict[str, str]:
    """A paired difference as the pages quote it: mean, CI bounds, wins and seeds."""
    entry = report(name)["tasks"][task]["summary"][arm][metric]
    d = entry["diff"]
    return {
        "mean": signed(d["mean"], digits),
        "low": signed(d["mean"] - d["ci95"], digits),
        "high": signed(d["mean"] + d["ci95"], digits),
        "wins": str(d["wins"]),
        "n": str(entry["n"]),
    }


def family(name: str) -> list[tuple[str, str, str, dict]]:
    data = report(name)
    return [
        (t, a, m, data["tasks"][t]["summary"][a][m]["diff"]) for t, a, m in quality.family(data)
    ]


def better(metric: str, d: dict) -> bool:
    return (d["mean"] > 0) == quality.higher_is_better(metric)


def nominal(name: str) -> list[tuple[str, str, str, dict]]:
    return [f for f in family(name) if f[3]["p"] < quality.SIGNIFICANT]


def holm_significant(name: str) -> list[tuple[str, str, str, dict]]:
    return [f for f in family(name) if f[3]["p_holm"] < quality.SIGNIFICANT]


# -- the claims ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A sentence of a page: a regex whose named groups are the numbers it quotes, their
    values recomputed from the JSON, and, for a sentence that also says something in words
    ("none is significant"), the check of that statement."""

    page: str
    pattern: str
    expected: Callable[[], dict[str, str]]
    holds: Callable[[], bool] = lambda: True


def ci(prefix: str) -> str:
    """A paired difference written "+0.35 [−0.28, +0.98]"."""
    value = r"[+−]\d+\.\d+"
    return rf"(?P<{prefix}_mean>{value}) \[(?P<{prefix}_low>{value}), (?P<{prefix}_high>{value})\]"


def wins(prefix: str) -> str:
    """The seeds on which the arm did better, of all, written "36 of 40"."""
    return rf"(?P<{prefix}_wins>\d+) of (?P<{prefix}_n>\d+)"


WINS = ("wins", "n")
ALL = ("mean", "low", "high", *WINS)


def quoted(prefix: str, *where: str, digits: int = 2, keys=("mean", "low", "high")) -> dict:
    values = diff(*where, digits=digits)
    return {f"{prefix}_{k}": values[k] for k in keys}


def lower_by(prefix: str, *where: str) -> dict:
    """A difference quoted as an amount "lower by": the negated mean, which must be > 0."""
    d = report(where[0])["tasks"][where[1]]["summary"][where[2]][where[3]]["diff"]
    return {prefix: plain(-d["mean"], 4)}


def mean_of(name: str, task: str, arm: str, metric: str, digits: int) -> str:
    return plain(report(name)["tasks"][task]["summary"][arm][metric]["mean"], digits)


def flat_arms(name: str, condition: Callable[[float], bool] = lambda s: True) -> list[str]:
    return [a["name"] for a in report(name)["arms"] if a["sigma"] > 0 and condition(a["sigma"])]


def no_significant_clean_gain() -> bool:
    for name in ("sigma", "sigma_pretrain"):
        for result in report(name)["tasks"].values():
            for arm in flat_arms(name):
                d = result["summary"][arm]["acc clean"]["diff"]
                if d["p"] < quality.SIGNIFICANT and d["mean"] > 0:
                    return False
    return True


def largest_small_sigma_change() -> dict:
    found = [
        abs(result["summary"][arm]["acc clean"]["diff"]["mean"])
        for result in report("sigma")["tasks"].values()
        for arm in flat_arms("sigma", lambda s: s <= 0.1)
    ]
    return {"max": plain(max(found))}


CHOOSING = "docs/choosing-sigma.md"
CLAIMS: list[Claim] = [
    Claim(
        CHOOSING,
        r"σ = 0\.05 and 0\.1 is within (?P<max>\d+\.\d\d) points of plain LoRA's",
        largest_small_sigma_change,
    ),
    Claim(
        CHOOSING,
        r"At σ = 0\.3 it is lower than plain LoRA's by (?P<rot>\d\.\d{4}) on the rotated digits "
        rf"\({wins('rot')} seeds\) and by (?P<dig>\d\.\d{{4}}) on digits \({wins('dig')}\)",
        lambda: {
            **lower_by("rot", "sigma", "rotated", "Flat 0.30", "sharpness 0.30"),
            **quoted("rot", "sigma", "rotated", "Flat 0.30", "sharpness 0.30", keys=WINS),
            **lower_by("dig", "sigma", "digits", "Flat 0.30", "sharpness 0.30"),
            **quoted("dig", "sigma", "digits", "Flat 0.30", "sharpness 0.30", keys=WINS),
        },
    ),
    Claim(
        CHOOSING,
        rf"σ = 0\.5 changed accuracy at corruption severity 1 by {ci('corr')} points "
        rf"\({wins('corr')} runs\)\. Clean accuracy did not rise significantly on any task",
        lambda: quoted(
            "corr", "sigma_pretrain", "rotated", "Flat 0.50", "acc corrupted-1", keys=ALL
        ),
        no_significant_clean_gain,
    ),
    Claim(
        CHOOSING,
        rf"On vader \(MiniLM\), σ = 0\.5 changed clean accuracy by {ci('vader')} points "
        rf"\({wins('vader')} seeds ahead\)",
        lambda: quoted("vader", "sigma", "vader", "Flat 0.50", "acc clean", keys=ALL),
    ),
    Claim(
        CHOOSING,
        rf"At σ = 0\.5 the clean accuracy on the rotated digits changed by {ci('clean')} points "
        rf"over those runs \({wins('clean')} ahead\)",
        lambda: quoted("clean", "sigma_pretrain", "rotated", "Flat 0.50", "acc clean", keys=ALL),
    ),
    Claim(
        CHOOSING,
        r"After 15 epochs plain LoRA is still climbing \((?P<short>\d+\.\d)% test accuracy, "
        rf"against (?P<long>\d+\.\d)% after 120\), and σ = 0\.5 changes it by {ci('s5')} "
        rf"points \({wins('s5')} seeds ahead\), σ = 0\.3 by {ci('s3')}",
        lambda: {
            "short": mean_of("sigma_steps", "rotated", "LoRA, 15 ep", "acc clean", 1),
            "long": mean_of("sigma_steps", "rotated", "LoRA, 120 ep", "acc clean", 1),
            **quoted("s5", "sigma_steps", "rotated", "Flat 0.50, 15 ep", "acc clean", keys=ALL),
            **quoted("s3", "sigma_steps", "rotated", "Flat 0.30, 15 ep", "acc clean"),
        },
    ),
    Claim(
        CHOOSING,
        rf"After 120 epochs σ = 0\.5 is at {ci('l5')} points \({wins('l5')}\)",
        lambda: quoted("l5", "sigma_steps", "rotated", "Flat 0.50, 120 ep", "acc clean", keys=ALL),
    ),
    Claim(
        CHOOSING,
        rf"dropout 0\.2 changed clean accuracy by {ci('dc')} points and accuracy at corruption "
        rf"severity 2 by {ci('dk')}; Flat-LoRA at σ = 0\.3 by {ci('fc')} and {ci('fk')}\.",
        lambda: {
            **quoted("dc", "sigma", "rotated", "LoRA+dropout", "acc clean"),
            **quoted("dk", "sigma", "rotated", "LoRA+dropout", "acc corrupted-2"),
            **quoted("fc", "sigma", "rotated", "Flat 0.30", "acc clean"),
            **quoted("fk", "sigma", "rotated", "Flat 0.30", "acc corrupted-2"),
        },
    ),
    Claim(
        CHOOSING,
        rf"changed accuracy at corruption severity 3 by {ci('both')} points",
        lambda: quoted(
            "both", "sigma_steps", "rotated", "dropout+Flat 0.30, 120 ep", "acc corrupted-3"
        ),
    ),
]

RESULTS_PAGE = "docs/results.md"
PAPER_SIGMA = 0.15  # the top of the paper's range


def holm(name: str, task: str, arm: str, metric: str) -> float:
    return report(name)["tasks"][task]["summary"][arm][metric]["diff"]["p_holm"]


def sharpness_significant() -> dict:
    """Of every (task, σ ≥ 0.2) pair, how many lowered the sharpness at 0.3 after Holm."""
    pairs = [
        (task, arm)
        for task in report("sigma")["tasks"]
        for arm in flat_arms("sigma", lambda s: s >= 0.2)
    ]
    lowered = [
        (t, a)
        for t, a in pairs
        if holm("sigma", t, a, "sharpness 0.30") < quality.SIGNIFICANT
        and report("sigma")["tasks"][t]["summary"][a]["sharpness 0.30"]["diff"]["mean"] < 0
    ]
    return {"k": str(len(lowered)), "n": str(len(pairs))}


def best_clean() -> dict:
    """The largest paired clean-accuracy gain of any Flat arm of the sweep, and where."""
    found = max(
        (result["summary"][arm]["acc clean"]["diff"]["mean"], task, arm)
        for task, result in report("sigma")["tasks"].items()
        for arm in flat_arms("sigma")
    )
    task, arm = found[1], found[2]
    return {
        **quoted("best", "sigma", task, arm, "acc clean"),
        "best_task": {"rotated": "rotated digits"}.get(task, task),
        "best_sigma": arm.split()[1],
    }


def no_accuracy_change_at_paper_sigma() -> bool:
    for name in ("sigma", "quality"):
        for _, arm, metric, d in family(name):
            sigma = next(a["sigma"] for a in report(name)["arms"] if a["name"] == arm)
            if (
                metric.startswith("acc ")
                and sigma <= PAPER_SIGMA
                and d["p_holm"] < quality.SIGNIFICANT
            ):
                return False
    return True


def falls_with_sigma(task: str) -> bool:
    """The mean sharpness at the probe 0.3 falls from each Flat σ of the sweep to the next."""
    summary = report("sigma")["tasks"][task]["summary"]
    values = [summary[arm]["sharpness 0.30"]["mean"] for arm in flat_arms("sigma")]
    return all(b < a for a, b in zip(values, values[1:]))


def none_significant(name: str, task: str, prefix: str) -> bool:
    return all(
        d["p_holm"] >= quality.SIGNIFICANT
        for t, _, m, d in family(name)
        if t == task and m.startswith(prefix)
    )


def earlier() -> dict:
    """The earlier run: nominal significance, its split, chance, and the best Holm p."""
    found = nominal("quality")
    gains = sum(better(m, d) for _, _, m, d in found)
    size = len(family("quality"))
    return {
        "sig": str(len(found)),
        "family": str(size),
        "gains": str(gains),
        "losses": str(len(found) - gains),
        "chance": f"{size * quality.SIGNIFICANT:.0f}",
        "holm": f"{min(d['p_holm'] for *_, d in family('quality')):.2f}",
    }


def no_clean_difference(name: str) -> bool:
    return all(
        result["summary"][arm]["acc clean"]["diff"]["p"] >= quality.SIGNIFICANT
        for result in report(name)["tasks"].values()
        for arm in result["summary"]
        if arm != "LoRA"
    )


def minutes(name: str) -> str:
    return f"{report(name)['seconds'] / 60:.0f}"


CLAIMS += [
    Claim(
        RESULTS_PAGE,
        r"(?P<k>\d+) of the (?P<n>\d+) task-σ pairs with σ ≥ 0\.2 lowered it significantly "
        r"after the Holm correction",
        sharpness_significant,
    ),
    Claim(
        RESULTS_PAGE,
        rf"the largest point estimate is {ci('best')} points \((?P<best_task>[\w ]+), "
        r"σ = (?P<best_sigma>\d\.\d\d)\)",
        best_clean,
        lambda: no_significant_clean_gain(),
    ),
    Claim(
        RESULTS_PAGE,
        rf"σ = 0\.5 changed accuracy at corruption severity 1 by {ci('corr')} points over 80 runs "
        r"on 8 pretrained models, significant after the Holm correction",
        lambda: quoted("corr", "sigma_pretrain", "rotated", "Flat 0.50", "acc corrupted-1"),
        lambda: (
            holm("sigma_pretrain", "rotated", "Flat 0.50", "acc corrupted-1") < quality.SIGNIFICANT
        ),
    ),
    Claim(
        RESULTS_PAGE,
        r"At the paper's σ \(0\.05 to 0\.15\), no accuracy changed significantly",
        dict,
        no_accuracy_change_at_paper_sigma,
    ),
    Claim(
        RESULTS_PAGE,
        r"of a run \((?P<family>\d+) in the sweep\)",
        lambda: {"family": str(report("sigma")["holm_family"])},
    ),
    Claim(
        RESULTS_PAGE,
        r"The sharpness at the probe σ = 0\.3 fell with every step of σ from 0\.05 to 0\.5 on the "
        r"rotated digits and on digits",
        dict,
        lambda: falls_with_sigma("rotated") and falls_with_sigma("digits"),
    ),
    Claim(
        RESULTS_PAGE,
        rf"at σ = 0\.5 the rotated digits changed by {ci('r5')} points and vader by {ci('v5')} "
        rf"points \({wins('v5')} seeds ahead\), significant after the correction",
        lambda: {
            **quoted("r5", "sigma", "rotated", "Flat 0.50", "acc clean"),
            **quoted("v5", "sigma", "vader", "Flat 0.50", "acc clean", keys=ALL),
        },
        lambda: holm("sigma", "vader", "Flat 0.50", "acc clean") < quality.SIGNIFICANT,
    ),
    Claim(
        RESULTS_PAGE,
        rf"On vader, σ = 0\.5 changed clean accuracy by {ci('vs')} points, significant after the "
        r"Holm correction",
        lambda: quoted("vs", "sigma", "vader", "Flat 0.50", "acc clean"),
        lambda: holm("sigma", "vader", "Flat 0.50", "acc clean") < quality.SIGNIFICANT,
    ),
    Claim(
        RESULTS_PAGE,
        rf"at severity 1, by {ci('r3')} points at σ = 0\.3 \({wins('r3')} seeds\)\. On digits "
        r"the gains were smaller and none was significant after the correction",
        lambda: quoted("r3", "sigma", "rotated", "Flat 0.30", "acc corrupted-1", keys=ALL),
        lambda: (
            none_significant("sigma", "digits", "acc ")
            and report("sigma")["tasks"]["digits"]["summary"]["Flat 0.30"]["acc corrupted-1"][
                "diff"
            ]["mean"]
            < report("sigma")["tasks"]["rotated"]["summary"]["Flat 0.30"]["acc corrupted-1"][
                "diff"
            ]["mean"]
        ),
    ),
    Claim(
        RESULTS_PAGE,
        r"no int4 difference is significant after the correction",
        dict,
        lambda: all(none_significant("sigma", t, "drop int4") for t in report("sigma")["tasks"]),
    ),
    Claim(
        RESULTS_PAGE,
        rf"On the rotated digits it changed clean accuracy by {ci('dc')} points and accuracy at "
        rf"corruption severity 2 by {ci('dk')}; on digits, by (?P<d1>[+−]\d\.\d\d) and "
        r"(?P<d2>[+−]\d\.\d\d) points at severities 1 and 2, against (?P<f1>[+−]\d\.\d\d) "
        r"and (?P<f2>[+−]\d\.\d\d) for Flat-LoRA at σ = 0\.2",
        lambda: {
            **quoted("dc", "sigma", "rotated", "LoRA+dropout", "acc clean"),
            **quoted("dk", "sigma", "rotated", "LoRA+dropout", "acc corrupted-2"),
            "d1": diff("sigma", "digits", "LoRA+dropout", "acc corrupted-1")["mean"],
            "d2": diff("sigma", "digits", "LoRA+dropout", "acc corrupted-2")["mean"],
            "f1": diff("sigma", "digits", "Flat 0.20", "acc corrupted-1")["mean"],
            "f2": diff("sigma", "digits", "Flat 0.20", "acc corrupted-2")["mean"],
        },
    ),
    Claim(
        RESULTS_PAGE,
        rf"The clean gain did not hold: {ci('p3')} points at σ = 0\.3\.",
        lambda: quoted("p3", "sigma_pretrain", "rotated", "Flat 0.30", "acc clean"),
    ),
    Claim(
        RESULTS_PAGE,
        r"sharpness fell \(by (?P<ps>\d\.\d{4}) at σ = 0\.3, on "
        rf"{wins('ps')} runs\), accuracy at corruption severity 1 rose, and σ = 0\.5 cost clean "
        rf"accuracy \({ci('pc')}\)",
        lambda: {
            **lower_by("ps", "sigma_pretrain", "rotated", "Flat 0.30", "sharpness 0.30"),
            **quoted("ps", "sigma_pretrain", "rotated", "Flat 0.30", "sharpness 0.30", keys=WINS),
            **quoted("pc", "sigma_pretrain", "rotated", "Flat 0.50", "acc clean"),
        },
    ),
    Claim(
        RESULTS_PAGE,
        r"\*Clean accuracy:\* no arm differed significantly from plain LoRA on either task",
        dict,
        lambda: no_clean_difference("quality"),
    ),
    Claim(
        RESULTS_PAGE,
        r"(?P<sig>\d+) of the (?P<family>\d+) Flat-vs-LoRA comparisons were nominally "
        r"significant \(p < 0\.05\): (?P<gains>\d+) gains and (?P<losses>\d+) losses, where "
        r"chance alone gives about (?P<chance>\d+)\. None survives the Holm correction: the "
        r"smallest corrected p-value is (?P<holm>\d\.\d\d)",
        earlier,
        lambda: not holm_significant("quality"),
    ),
    Claim(
        RESULTS_PAGE,
        r"the σ sweep took (?P<sweep>\d+) min in all, the pretraining study (?P<pre>\d+) min "
        r"and the training-length study (?P<steps>\d+) min",
        lambda: {
            "sweep": minutes("sigma"),
            "pre": minutes("sigma_pretrain"),
            "steps": minutes("sigma_steps"),
        },
    ),
]


# -- the real-data run (benchmarks/results/quality_real.json) ----------------------------------
# Its numbers are in generated regions (tests/docs_numbers.py); the sentences around them say
# things in words, checked here.


def real_diffs(kind: Optional[str] = None, task: Optional[str] = None) -> list[dict]:
    """The Holm-family differences of the real-data run, of one kind of arm and one task."""
    data = report("quality_real")
    kinds = {a["name"]: a["kind"] for a in data["arms"]}
    return [
        {**data["tasks"][t]["summary"][a][m]["diff"], "metric": m, "arm": a, "task": t}
        for t, a, m in quality.family(data)
        if (kind is None or kinds[a] == kind) and (task is None or t == task)
    ]


def real_held(d: dict) -> bool:
    return d["p_holm"] < quality.SIGNIFICANT


def real_cost(task: str, arm: str) -> float:
    data = report("quality_real")
    return data.get("timing", {}).get(task, data["tasks"][task]["cost"])[arm]["over_lora_median"]


def sam_held_on_mnist() -> bool:
    found = {d["metric"]: d for d in real_diffs("sam", "mnist") if real_held(d)}
    return all(
        m in found and better(m, found[m]) for m in ("acc clean", "nll clean", "acc corrupted-3")
    )


def sam_on_tweets() -> bool:
    found = {d["metric"]: d for d in real_diffs("sam", "tweets")}
    nll, acc = found["nll clean"], found["acc clean"]
    return nll["mean"] + nll["ci95"] < 0 and not real_held(nll) and acc["p"] >= quality.SIGNIFICANT


def largest_sigma_costs_clean() -> bool:
    data = report("quality_real")
    largest = max((a for a in data["arms"] if a["kind"] == "flat"), key=lambda a: a["sigma"])
    return all(
        r["summary"][largest["name"]]["acc clean"]["diff"]["mean"] < 0
        for r in data["tasks"].values()
    )


def small_sigma_moved_nothing() -> bool:
    data = report("quality_real")
    small = {a["name"] for a in data["arms"] if a["kind"] == "flat" and a["sigma"] <= 0.1}
    return all(
        abs(d["mean"]) < 0.25
        for d in real_diffs("flat")
        if d["arm"] in small and d["metric"] in ("acc clean", "f1 clean")
    )


CLAIMS += [
    Claim(
        RESULTS_PAGE,
        r"On the tweets it lowered the test NLL, an interval that excludes 0 but does not "
        r"survive the correction, and left accuracy where plain LoRA had it",
        dict,
        sam_on_tweets,
    ),
    Claim(
        CHOOSING,
        r"On these tasks no training σ changed any metric significantly after the Holm "
        r"correction",
        dict,
        lambda: not any(real_held(d) for d in real_diffs("flat")),
    ),
    Claim(
        CHOOSING,
        r"up to σ = 0\.1 clean accuracy and macro-F1 moved by less than a quarter of a point, "
        r"and the largest σ cost clean accuracy on both tasks",
        dict,
        lambda: small_sigma_moved_nothing() and largest_sigma_costs_clean(),
    ),
    Claim(
        RESULTS_PAGE,
        r"no Flat arm differed from plain LoRA significantly after the Holm correction, on "
        r"either task",
        dict,
        lambda: not any(real_held(d) for d in real_diffs("flat")),
    ),
    Claim(
        RESULTS_PAGE,
        r"On MNIST, LoRA-SAM held after the correction in clean accuracy, test NLL and accuracy "
        r"under the strongest corruptions",
        dict,
        sam_held_on_mnist,
    ),
    Claim(
        RESULTS_PAGE,
        r"a Flat step cost more than a LoRA step on both tasks",
        dict,
        lambda: all(
            real_cost(t, a["name"]) > 1.0
            for t in report("quality_real")["tasks"]
            for a in report("quality_real")["arms"]
            if a["kind"] == "flat"
        ),
    ),
]


# Numbers on the pages that are not results of these runs, and where they come from.
CONSTANTS = {
    RESULTS_PAGE: {
        "95": "the confidence level",
        "90": "the pilot's other rotation angle",
        "19": "the pilot's seeds, 0-19",
        "2006": "the year of the BBC News set's paper (Greene and Cunningham, ICML 2006)",
    },
    CHOOSING: {
        "95": "the confidence level",
        "1": "the (1 + σ²) of the noise law",
        "2": "the advice: 2 or 3 seeds",
        "3": "the advice: 2 or 3 seeds",
    },
}


# -- reading a page -----------------------------------------------------------------------------

_FENCE = re.compile(r"^(`{3,}|~{3,}).*?^\1", re.DOTALL | re.MULTILINE)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_LINK = re.compile(r"\]\([^)]*\)")
_CODE = re.compile(r"`[^`\n]*`")
# A number on its own: not part of a name or a unit ("int4", "ViT-B/32" is, "22.7M", "7B").
_NUMBER = re.compile(r"(?<![\w./])\d+(?:\.\d+)?(?![\w]|\.\d)")


def generated_lines() -> set[str]:
    lines: set[str] = set()
    for name in FILES:
        lines.update((RESULTS / f"{name}.md").read_text(encoding="utf-8").splitlines())
    return lines


def prose(page: str) -> str:
    """The page without code, comments, link targets and generated table rows; one line."""
    text = (ROOT / page).read_text(encoding="utf-8")
    # A generated region is checked whole against its generator by tests/test_docs.py.
    text = _REGION.sub(" ", text)
    text = _COMMENT.sub(" ", _FENCE.sub(" ", text))
    generated = generated_lines()
    kept = [line for line in text.splitlines() if line not in generated]
    text = _CODE.sub(" ", _LINK.sub("]", "\n".join(kept)))
    return re.sub(r"\s+", " ", text)


def settings() -> set[str]:
    """Every number in the runs' settings, written the ways a page may write it."""
    found: set[str] = set()

    def walk(value) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found.update({f"{value:g}", f"{value:.2f}", f"{value:.1f}"})

    for name in FILES:
        data = report(name)
        walk(data["config"])
        walk(data["arms"])
        for result in data["tasks"].values():
            for note in result["notes"]:  # the setup the run describes: "449 rotated images"
                walk([float(n) for n in _NUMBER.findall(note)])
            walk(result.get("training", {}))
            walk(result.get("seeds", []))
            walk(result.get("pretrain_seeds", []))
            walk(result["summary"][next(iter(result["summary"]))]["acc clean"]["n"])
            walk(result.get("epochs"))
    return found


# -- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_the_tables_are_what_the_benchmark_writes_from_the_json(name):
    written = (RESULTS / f"{name}.md").read_text(encoding="utf-8")
    assert written == quality.markdown(copy.deepcopy(report(name))), (
        f"benchmarks/results/{name}.md is stale: run python benchmarks/quality.py --replot "
        f"benchmarks/results/{name}.json"
    )


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: f"{c.page}:{c.pattern[:40]}")
def test_each_claim_quotes_the_json(claim):
    match = re.search(claim.pattern, prose(claim.page))
    assert match, f"{claim.page} no longer says: {claim.pattern}"
    found = {k: v for k, v in match.groupdict().items() if v is not None}
    assert found == claim.expected(), f"{claim.page}: {match.group(0)!r}"
    assert claim.holds(), f"{claim.page}: the results no longer say {match.group(0)!r}"


@pytest.mark.parametrize("page", PAGES)
def test_every_number_in_the_prose_is_checked(page):
    text = prose(page)
    covered: list[tuple[int, int]] = []
    for claim in (c for c in CLAIMS if c.page == page):
        match = re.search(claim.pattern, text)
        if match:
            covered += [match.span(k) for k in match.groupdict() if match.group(k) is not None]
    allowed = settings() | set(CONSTANTS[page])
    unchecked = [
        (m.group(0), text[max(0, m.start() - 40) : m.end() + 20])
        for m in _NUMBER.finditer(text)
        if m.group(0) not in allowed and not any(a <= m.start() < b for a, b in covered)
    ]
    assert not unchecked, f"{page}: numbers no claim checks: {unchecked}"


def test_holm_adjusts_by_rank_and_keeps_the_order():
    # Five tests, a NaN p counting as 1. By rank: 0.005·5, 0.01·4, 0.03·3, then
    # max(0.09, 0.04·2) = 0.09 (never below an earlier rank), then 1.
    adjusted = quality.holm([0.01, 0.04, 0.03, 0.005, math.nan])
    expected = [0.04, 0.09, 0.09, 0.025, 1.0]
    assert adjusted == pytest.approx(expected)


def test_a_task_with_one_corruption_counts_its_averages_once():
    # vader's "corrupted-k" average is its one corruption, "typos-k": counted once.
    data = report("quality")
    flat = [a["name"] for a in data["arms"] if a["sigma"] > 0]
    per_task = {
        task: len(
            [
                m
                for m in r["summary"]["LoRA"]
                if not (len(r["corruptions"]) == 1 and m.startswith("acc corrupted-"))
            ]
        )
        for task, r in data["tasks"].items()
    }
    assert len(family("quality")) == len(flat) * sum(per_task.values())
    assert all(m != "acc corrupted-1" for t, _, m, _ in family("quality") if t == "vader")


@pytest.mark.parametrize("out", [None, "/tmp/quality_smoke.json"])
def test_a_smoke_run_writes_outside_the_committed_results(out):
    args = argparse.Namespace(smoke=True, preset="paper", out=None if out is None else Path(out))
    path = quality.output_path(args, argparse.ArgumentParser()).resolve()
    assert RESULTS.resolve() not in path.parents


def test_a_smoke_run_refuses_to_overwrite_the_committed_results(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = Path("benchmarks/results/quality.json")
    args = argparse.Namespace(smoke=True, preset="paper", out=out)
    with pytest.raises(SystemExit):
        quality.output_path(args, argparse.ArgumentParser())
    assert "would overwrite the committed results" in capsys.readouterr().err


def test_a_full_run_writes_its_preset_file():
    args = argparse.Namespace(smoke=False, preset="sigma", out=None)
    assert quality.output_path(args, argparse.ArgumentParser()) == RESULTS / "sigma.json"


def test_the_real_data_tables_are_what_the_benchmark_writes_from_the_json():
    data = json.loads((RESULTS / "quality_real.json").read_text(encoding="utf-8"))
    written = (RESULTS / "quality_real.md").read_text(encoding="utf-8")
    assert written == quality_real.markdown(data), (
        "benchmarks/results/quality_real.md is stale: run python benchmarks/quality_real.py "
        "--replot benchmarks/results/quality_real.json"
    )


def test_the_real_data_holm_family_is_every_arm_against_plain_lora():
    data = json.loads((RESULTS / "quality_real.json").read_text(encoding="utf-8"))
    size = quality.add_holm(data)
    compared = {arm for _, arm, _ in quality.family(data)}
    assert compared == {a["name"] for a in data["arms"]} - {"LoRA"}
    assert size == data["holm_family"]


@pytest.mark.parametrize("out", [None, "/tmp/quality_real_smoke.json"])
def test_a_real_data_smoke_run_writes_outside_the_committed_results(out):
    args = argparse.Namespace(smoke=True, out=None if out is None else Path(out))
    path = quality_real.output_path(args, argparse.ArgumentParser()).resolve()
    assert RESULTS.resolve() not in path.parents
