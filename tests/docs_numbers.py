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


def _ms(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


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


def _verdict(value: float, target: float) -> str:
    return "meets" if value <= target else "**misses**"


def perf_teaching() -> str:
    """The teaching-size model before and after, and the verdicts: overhead_teaching*.json."""
    rows = []
    for label, name in (
        ("before (`2f4465f`)", "overhead_teaching_before.json"),
        ("now", "overhead_teaching.json"),
    ):
        t = results(name)["teaching"]["cpu_summary"]
        rows.append(
            f"| {label} | {t['t_lora_us']:.0f} | {t['t_flat_us']:.0f} | "
            f"{t['t_lora_draws_us']:.0f} | {t['flat_over_lora']:.2f} | "
            f"{t['floor_lora_plus_draws_over_lora']:.2f} | {t['flat_extra_us_per_target']:.0f} | "
            f"{t['unarmed_hooks_us_per_target']:.2f} |"
        )
    now = results("overhead_teaching.json")["teaching"]["cpu_summary"]
    return "\n".join(
        [
            "| flatopt | t_lora (µs) | t_flat (µs) | t_lora + draws (µs) | flat / lora | "
            "floor: (lora + draws) / lora | extra µs per target | unarmed hooks, µs per target |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"Against the targets: t_flat ≤ 1.25 × t_lora {_verdict(now['flat_over_lora'], 1.25)} "
            f"({now['flat_over_lora']:.2f}; the draws alone give "
            f"{now['floor_lora_plus_draws_over_lora']:.2f}); unarmed hooks ≤ 2 µs per target "
            f"{_verdict(now['unarmed_hooks_us_per_target'], 2.0)} "
            f"({now['unarmed_hooks_us_per_target']:.2f} µs).",
        ]
    )


def perf_breakdown() -> str:
    """Where the teaching-size step's extra time goes: overhead_teaching.json."""
    data = results("overhead_teaching.json")["teaching"]["breakdown_us_per_step"]
    extra = data["flat_minus_lora"]
    rows = [
        f"| {'↳ ' if name.startswith(' ') else ''}{name.strip()} | {value:.0f} | "
        f"{value / 4:.1f} | {_percent(value / extra)} |"
        for name, value in data["components"].items()
    ]
    return "\n".join(
        [
            f"FlatPerturb minus plain LoRA: {extra:.0f} µs per step ({data['clock']}).",
            "",
            "| component | µs / step | µs / target / step | share of the extra |",
            "|---|---:|---:|---:|",
            *rows,
        ]
    )


def perf_levers() -> str:
    """The teaching-size benchmark on each commit that added a lever: teaching_levers.json."""
    data = results("teaching_levers.json")
    rows = []
    for row in data["rows"]:
        t = row["summary"]
        rows.append(
            f"| `{row['commit']}` | {row['lever']} | {t['flat_over_lora']:.2f} | "
            f"{t['flat_extra_us_per_target']:.0f} | {t['unarmed_hooks_us_per_target']:.1f} |"
        )
    return "\n".join(
        [
            "| commit | lever | flat / lora | extra µs per target | unarmed hooks, µs per target |",
            "|---|---|---:|---:|---:|",
            *rows,
        ]
    )


def perf_reference() -> str:
    """The CPU reference configuration against its targets: two runs of the same command."""
    rows, verdicts = [], []
    for label, name in (
        ("`overhead.json`", "overhead.json"),
        ("`overhead_profile.json` (5 rounds)", "overhead_profile.json"),
    ):
        data = results(name)
        s = data["summary"]
        over_rng = s["overhead_over_rng_paired_median"]
        inplace, sam = s["flat_over_inplace_paired_median"], s["flat_over_sam_paired_median"]
        rows.append(
            f"| {label} | {data['load_average_before'][0]:.1f} | {s['t_lora']:.3f} | "
            f"{s['t_flat']:.3f} | {s['t_inplace']:.3f} | {s['t_sam']:.3f} | {s['t_rng']:.4f} | "
            f"{s['flat_over_lora_paired_median']:.3f} | {inplace:.3f} | {sam:.3f} | "
            f"{over_rng:.2f} |"
        )
        verdicts.append(
            f"{label}: (t_flat − t_lora) ≤ 1.10 · t_rng {_verdict(over_rng, 1.10)} "
            f"({over_rng:.2f}), t_flat ≤ 1.0 × in-place {_verdict(inplace, 1.0)} "
            f"({inplace:.3f}), t_flat ≤ 0.55 × LoRA-SAM {_verdict(sam, 0.55)} ({sam:.3f})."
        )
    return "\n".join(
        [
            "| run | load | t_lora (s) | t_flat (s) | t_inplace (s) | t_sam (s) | t_rng (s) | "
            "flat / lora | flat / in-place | flat / SAM | (flat − lora) / t_rng |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            "Times are medians over rounds, ratios medians of per-round ratios. Against the "
            "targets:",
            "",
            *(f"- {verdict}" for verdict in verdicts),
        ]
    )


def perf_memory() -> str:
    """Peak memory of a step per method: memory.json."""
    data = results("memory.json")
    rss = data["tables"]["rss"]
    names = {
        "lora": "plain LoRA",
        "flat": "**FlatPerturb**",
        "inplace": "in-place (inexact)",
        "sam": "LoRA-SAM",
        "copy": "copy (exact, heavy)",
    }
    rows = [
        f"| {names[m]} | {r['built_mib']:.1f} | {r['peak_mib']:.1f} | {r['extra_mib']:+.1f} | "
        f"{r['extra_in_largest_targets']:+.2f} |"
        for m, r in rss.items()
    ]
    flat = rss["flat"]["extra_in_largest_targets"]
    return "\n".join(
        [
            "| method | RSS after building (MiB) | peak RSS of 2 steps (MiB) | extra over LoRA "
            "(MiB) | in largest target weights |",
            "|---|---:|---:|---:|---:|",
            *rows,
            "",
            f"Peak extra memory ≤ 1.0 × the largest target weight {_verdict(flat, 1.0)} "
            f"({flat:.2f}); persistent state ≤ 1% of the target weights "
            f"{_verdict(data['persistent_fraction_of_targets'], 0.01)} "
            f"({100 * data['persistent_fraction_of_targets']:.2f}%, "
            f"{data['persistent']['total_bytes']:,} bytes).",
        ]
    )


def perf_fsdp() -> str:
    """Peak memory per rank under FSDP2: fsdp_memory.json."""
    data = results("fsdp_memory.json")
    config = data["config"]
    rows = [
        f"| {r['rank']} | {r['params_held_bytes'] / 2**20:.0f} | "
        f"{r['peak_above_start_bytes']['lora'] / 2**20:.1f} | "
        f"{r['peak_above_start_bytes']['flat'] / 2**20:.1f} | "
        f"{r['flat_minus_lora_bytes'] / 2**20:+.1f} | {r['in_largest_target_weights']:+.2f} |"
        for r in data["ranks"]
    ]
    return "\n".join(
        [
            f"{config['blocks']} residual blocks of width {config['width']} (MLP 4d, LoRA rank 8 "
            f"on every linear layer), each block and the root `fully_shard`ed over "
            f"{config['world_size']} gloo ranks, {config['tokens']} tokens per step; largest "
            f"target weight {data['largest_target_weight_bytes'] / 2**20:.0f} MiB; median of "
            f"{config['repeat']} fresh runs.",
            "",
            "| rank | parameters held (MiB) | plain LoRA: peak above the pre-step RSS (MiB) | "
            "FlatPerturb (MiB) | difference (MiB) | in largest target weights |",
            "|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )


def perf_seed_space() -> str:
    """The cost of seeding torch's CPU generator with all 64 bits: seed_space.json."""
    data = results("seed_space.json")["seed_space"]
    rows = []
    for label, shape in data["shapes"].items():
        us = shape["us"]
        rows.append(
            f"| {label} | {us['seed32']:.1f} | {us['xor_state']:.1f} "
            f"({shape['xor_state_extra_percent_of_w_plus_eps']:+.0f}% of W + ε) | "
            f"{us['sum_of_two']:.1f} ({shape['sum_of_two_extra_percent_of_w_plus_eps']:+.0f}%) |"
        )
    return "\n".join(
        [
            "| shape | 32-bit seed (µs) | 64-bit: XOR of two seeded states (µs) | "
            "(z₁ + z₂)/√2 from two seeds (µs) |",
            "|---|---:|---:|---:|",
            *rows,
        ]
    )


def perf_sweep() -> str:
    """The tokens × width × accumulation sweep: overhead_sweep.json."""
    data = results("overhead_sweep.json")
    rows = []
    for cell in data["cells"]:
        t = cell["summary"]
        rows.append(
            f"| {cell['width']} | {cell['tokens']} | {cell['accumulation']} | {cell['rounds']} | "
            f"{cell['load_average_before'][0]:.1f} | {t['t_lora']:.3f} | "
            f"{t['rng_over_lora_paired_median']:.3f} | {t['flat_over_lora_paired_median']:.3f} | "
            f"{t['flat_over_inplace_paired_median']:.3f} | {t['flat_over_sam_paired_median']:.3f} "
            f"| {t['overhead_over_rng_paired_median']:.2f} |"
        )
    skipped = data.get("skipped_cells", [])
    return "\n".join(
        [
            "| d | tokens / micro-batch | GA | rounds | load | t_lora (s) | t_rng / t_lora | "
            "flat / lora | flat / in-place | flat / SAM | (flat − lora) / t_rng |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"{data['threads']} thread(s); {len(data['cells'])} cells run, {len(skipped)} skipped "
            "as heavier than the reference step (`--max-cost`).",
        ]
    )


GPU_RUN = "gpu/267cd22"  # the GPU measurement: flatopt at commit 267cd22 on an H200
GPU_CONFIGS = (
    ("d = 1024, 24 layers, 4096 tokens (the reference)", "overhead.json"),
    ("the same, second run (`--profile --rounds 3`)", "overhead_profile.json"),
    ("d = 1024, 24 layers, 16384 tokens", "o_tokens16384.json"),
    ("d = 1024, 24 layers, 4096 tokens × 4 micro-batches", "o_accumulation4.json"),
    ("d = 4096, 4 layers, 32 heads, 8192 tokens", "o_width4096layers4heads32tokens8192.json"),
    ("reference, bf16 row norms patched in", "o_bf16_rownorm_patch.json"),
)


def perf_gpu() -> str:
    """The H200 measurement of commit 267cd22: benchmarks/results/gpu/267cd22/*.json."""
    check = results(f"{GPU_RUN}/gpu_check.json")
    memory_run = results(f"{GPU_RUN}/memory.json")
    reference = results(f"{GPU_RUN}/overhead.json")
    rows = []
    for label, name in GPU_CONFIGS:
        data = results(f"{GPU_RUN}/{name}")
        s = data["summary"]
        rows.append(
            f"| {label} | {data['cells'][0]['rounds']} | {1e3 * s['t_lora']:.1f} | "
            f"{1e3 * s['t_flat']:.1f} | {s['flat_over_lora_paired_median']:.2f} | "
            f"{s['flat_over_inplace_paired_median']:.2f} | {s['flat_over_sam_paired_median']:.2f} "
            f"| {1e3 * s['t_rng']:.1f} |"
        )
    env = check["environment"]
    s = reference["summary"]
    flat_lora = [
        results(f"{GPU_RUN}/{name}")["summary"]["flat_over_lora_paired_median"]
        for name in ("overhead.json", "overhead_profile.json")
    ]
    extra = memory_run["tables"]["cuda"]["flat"]["extra_in_largest_targets"]
    tests = check["tests"]
    return "\n".join(
        [
            f"{env['gpu']}, torch build {env['torch']}, CUDA {env['cuda']}, bf16, flatopt at "
            f"commit `267cd22`; {tests['passed']} CUDA tests passed, {tests['failures']} failed. "
            "Times are medians over rounds (3 steps each), ratios medians of per-round ratios:",
            "",
            "| configuration | rounds | t_lora (ms) | t_flat (ms) | flat / LoRA | flat / in-place "
            "| flat / LoRA-SAM | t_rng (ms) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            "Against the GPU targets at the reference configuration: t_flat ≤ 1.10 × t_lora "
            f"{_verdict(max(flat_lora), 1.10)} ({_span(flat_lora, lambda v: f'{v:.2f}')}), "
            "t_flat ≤ 0.55 × LoRA-SAM "
            f"{_verdict(s['flat_over_sam_paired_median'], 0.55)} "
            f"({s['flat_over_sam_paired_median']:.2f}), t_flat ≤ 1.0 × in-place "
            f"{_verdict(s['flat_over_inplace_paired_median'], 1.0)} "
            f"({s['flat_over_inplace_paired_median']:.2f}); peak memory ≤ +1 largest layer "
            f"{_verdict(extra, 1.0)} (+{extra:.2f}, `torch.cuda.max_memory_allocated`).",
        ]
    )


def _kernel_label(name: str) -> str:
    for key, label in (
        ("simt_sgemm", "fp32 SIMT GEMM (`cutlass_80_simt_sgemm_*`)"),
        ("splitKreduce", "cuBLASLt split-K reduction"),
        ("direct_copy_kernel", "dtype copy (`direct_copy_kernel_cuda`)"),
        ("addcmul", "`addcmul` (W + z·std)"),
        ("normal_and_transform", "`normal_` draw"),
        ("Memcpy DtoD", "device-to-device copy"),
    ):
        if key in name:
            return label
    return "other kernels"


_HOST_ROWS = ("aten::", "Optimizer.", "profiler::", "cuda", "Activity", "Buffer", "Memset")


def perf_gpu_profile() -> str:
    """FlatPerturb's extra GPU kernels per step: gpu/267cd22/overhead_profile.json.

    That file lists aten ops and kernels side by side, each aten op with the GPU time of its
    kernels: the GPU time of a step is the sum over the kernel rows alone."""
    data = results(f"{GPU_RUN}/overhead_profile.json")
    cell = data["cells"][0]
    profile, targets = cell["profile"], cell["num_targets"]
    wall = profile["wall_ms_per_step"]
    kernels = [r for r in profile["ops_by_extra_time"] if not r["op"].startswith(_HOST_ROWS)]
    gpu = {m: sum(r[f"self_ms_{m}"] for r in kernels) for m in ("lora", "flat")}
    groups: dict[str, list[float]] = {}
    for row in kernels:
        if row["extra_ms"] <= 0:
            continue
        label = _kernel_label(row["op"])
        count, ms = groups.get(label, [0, 0.0])
        groups[label] = [count + row["calls_flat"] - row["calls_lora"], ms + row["extra_ms"]]
    ordered = sorted(groups.items(), key=lambda item: -item[1][1])
    rows = [
        f"| {label} | {count:,} | {count / targets:.1f} | {ms:.1f} | {1e3 * ms / targets:.0f} |"
        for label, (count, ms) in ordered
    ]
    summary = cell["summary"]
    extra_wall = 1e3 * (summary["t_flat"] - summary["t_lora"])
    extra_gpu = gpu["flat"] - gpu["lora"]
    return "\n".join(
        [
            f"Under the profiler ({profile['steps_per_method']} steps each), a plain LoRA step "
            f"took {wall['lora']:.0f} ms of wall time for {gpu['lora']:.0f} ms of kernels, a "
            f"FlatPerturb step {wall['flat']:.0f} ms for {gpu['flat']:.0f} ms. Unprofiled, in "
            f"the same run, FlatPerturb added {extra_wall:.0f} ms per step, of which its "
            f"kernels account for {extra_gpu:.0f} ms ({_percent(extra_gpu / extra_wall)}). The "
            "kernels it adds, per step:",
            "",
            "| kernel | extra launches per step | per target | extra GPU ms per step | µs per "
            "target |",
            "|---|---:|---:|---:|---:|",
            *rows,
        ]
    )


def _host_reads(config: dict) -> int:
    reads = config["host_reads"]
    return max(reads["flat_minus_lora"], reads["from_flatopt"])


_OPS_COLUMNS = (  # (value of one configuration's record, format)
    (lambda c: c["per_target"]["ops_per_micro_batch"], "{:.1f}"),
    (lambda c: c["per_target"]["kernel_ops_per_micro_batch"], "{:.1f}"),
    (lambda c: c["per_target"]["ops_per_step"], "{:.1f}"),
    (lambda c: c["per_target"]["kernel_ops_per_step"], "{:.1f}"),
    (_host_reads, "{}"),
    (lambda c: c["weight_sized_alive_max"]["flatopt"], "{}"),
)


def _ops_rows(before: dict, after: dict | None) -> list[str]:
    now = {c["config"]: c for c in after["configs"]} if after else {}
    rows = []
    for config in before["configs"]:
        later = now.get(config["config"])
        cells = []
        for get, form in _OPS_COLUMNS:
            text = form.format(get(config))
            cells.append(text if later is None else f"{text} → {form.format(get(later))}")
        one = config["draw_layout"].startswith("one block")
        draws = "one block, as on CUDA" if one else "in blocks, as on CPU"
        rows.append(
            f"| `{config['config']}` | {config['targets']} | {draws} | " + " | ".join(cells) + " |"
        )
    return rows


def perf_ops() -> str:
    """Aten ops per target: ops_per_step_before.json, and ops_per_step.json once it exists."""
    before = results("ops_per_step_before.json")
    after = results("ops_per_step.json") if (RESULTS / "ops_per_step.json").exists() else None
    if after is None:
        head = (
            f"flatopt at commit `{before['flatopt_commit']}` (no later count is recorded yet), "
            f"torch {before['torch'].split('+')[0]} on CPU, one thread:"
        )
    else:
        later = after.get("flatopt_commit") or "unknown"
        dirty = " with uncommitted changes" if after.get("flatopt_uncommitted_changes") else ""
        head = (
            f"Each cell is flatopt at commit `{before['flatopt_commit']}` → at `{later}`{dirty}; "
            f"torch {after['torch'].split('+')[0]} on CPU, one thread:"
        )
    targets = before["targets"]
    return "\n".join(
        [
            head,
            "",
            "| configuration | targets | draws | ops / target / micro-batch | of which "
            "launch a kernel | ops / target / step | of which launch a kernel | host reads | "
            "weight-sized temporaries alive at most |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|",
            *_ops_rows(before, after),
            "",
            f"The targets: ≤ {targets['ops_per_target_per_micro_batch']} aten ops per target per "
            f"micro-batch for a plain LoRA Linear, {targets['host_reads']} host reads, ≤ "
            f"{targets['weight_sized_alive']} weight-sized temporaries alive at once.",
        ]
    )


# -- real data: benchmarks/quality_real.py ------------------------------------------------------

REAL = "quality_real.json"
REAL_COLUMNS = (
    ("acc clean", 2),
    ("f1 clean", 2),
    ("nll clean", 3),
    ("acc corrupted-3", 2),
    ("drop int4", 2),
    ("sharpness 0.30", 4),
)
REAL_TASKS = {"tweets": "tweets (MiniLM-L6)", "mnist": "MNIST (CNN)", "bbc": "BBC News (MiniLM-L6)"}


def _real() -> dict:
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    data = json.loads(json.dumps(results(REAL)))  # a copy: the Holm values are added to it
    quality.add_holm(data)
    return data


def _real_cell(d: dict, digits: int, n: int) -> str:
    low, high = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
    text = f"{_signed(d['mean'], digits)} [{_signed(low, digits)}, {_signed(high, digits)}]"
    if d["ci95"] > 0 and (low > 0 or high < 0):
        text = f"**{text}**"
    return f"{text}{'†' if d['p_holm'] < SIGNIFICANT else ''} {d['wins']}/{n}"


_REAL_WORDS = {
    "acc clean": "clean accuracy",
    "f1 clean": "macro-F1",
    "nll clean": "test NLL",
    "drop int4": "int4 drop",
}


def _real_metric(metric: str) -> str:
    if metric in _REAL_WORDS:
        return _REAL_WORDS[metric]
    if metric.startswith("acc corrupted-"):
        return f"accuracy at corruption severity {metric[-1]}"
    if metric.startswith("acc "):
        return f"accuracy on {metric[4:]}"
    if metric.startswith("sharpness "):
        return f"sharpness at probe σ = {float(metric.split()[1]):g}"
    return metric


def quality_real() -> str:
    """The real-data run, per task: every arm against plain LoRA, its cost, what held."""
    data = _real()
    tasks = data["tasks"]
    arms = [a["name"] for a in data["arms"]]
    seeds = {t: r["summary"]["LoRA"]["acc clean"]["n"] for t, r in tasks.items()}
    missing = data.get("arms_missing", [])
    timed = "timing" in data
    short = [
        f"the {t} task after {seeds[t]} of its {data['config'][t + '_seeds']} seeds"
        for t in tasks
        if seeds[t] < data["config"][t + "_seeds"]
    ]
    stopped = (
        f" The run was stopped, {_listing(short)}: the machine was shared with other jobs, "
        "which slowed every run, and the time set aside for it ran out."
        if short
        else ""
    )
    lines = [
        f"Arms that ran: {_listing(arms)}"
        + (f"; not in flatopt when the run started: {_listing(missing)}." if missing else ".")
        + " Seeds: "
        + _listing([f"{seeds[t]} on {t}" for t in tasks])
        + f", every arm on the same seeds. The run took {data['seconds'] / 60:.0f} min "
        f"({data['machine']})." + stopped,
    ]
    for task, result in tasks.items():
        summary, cost, n = result["summary"], result["cost"], seeds[task]
        columns = [(m, d) for m, d in REAL_COLUMNS if m in summary["LoRA"]]
        if len(result["corruptions"]) == 1:  # its one corruption's own set, as Holm counts it
            only = f"acc {result['corruptions'][0]}-3"
            columns = [(only if m == "acc corrupted-3" else m, d) for m, d in columns]
        heads = {
            "acc typos-3": "typos 3 acc %",
            "acc corrupted-3": "corr. 3 acc %",
            "sharpness 0.30": "sharp. @0.3",
        }
        lines += [
            "",
            f"**{REAL_TASKS.get(task, task)}, {n} seeds.** "
            + "; ".join(note.rstrip(".") for note in result["notes"])
            + ".",
            "",
            "| arm | "
            + " | ".join(heads.get(m) or _REAL_COLUMN_HEADS[m] for m, _ in columns)
            + (" |" if timed else " | ms / step | × LoRA |"),
            "|---|" + "---|" * len(columns) + ("" if timed else "---:|---:|"),
        ]
        for arm in summary:
            if arm == "LoRA":
                cells = [
                    f"{summary[arm][m]['mean']:.{d}f} ± {summary[arm][m]['ci95']:.{d}f}".replace(
                        "-", "−"
                    )
                    for m, d in columns
                ]
            else:
                cells = [_real_cell(summary[arm][m]["diff"], d, n) for m, d in columns]
            per_run = f" {cost[arm]['ms_per_step']:.0f} | {cost[arm]['over_lora_median']:.2f} |"
            lines.append(f"| {arm} | " + " | ".join(cells) + (" |" if timed else f" |{per_run}"))
    if timed:
        timing = data["timing"]
        first = next(iter(timing.values()))
        arms_timed = list(first)
        rounds, steps = first["LoRA"]["rounds"], first["LoRA"]["steps_per_round"]
        lines += [
            "",
            f"**Cost per step**, timed apart from the runs above: every arm built on the same "
            f"seed, then {rounds} rounds in which each arm takes {steps} training steps in "
            f"turn; the median over the rounds of the ms per step, and of its ratio to plain "
            f"LoRA's in the same round ({data['timing_machine']}):",
            "",
            "| arm | " + " | ".join(f"{t}: ms / step | {t}: × LoRA" for t in timing) + " |",
            "|---|" + "---:|---:|" * len(timing),
        ]
        for arm in arms_timed:
            cells = [
                f"{_ms(timing[t][arm]['ms_per_step'])} | {timing[t][arm]['over_lora_median']:.2f}"
                for t in timing
            ]
            note = "" if arm in arms else " (timed only)"
            lines.append(f"| {arm}{note} | " + " | ".join(cells) + " |")
    held = []
    for task, result in tasks.items():
        for arm, metrics in result["summary"].items():
            found = []
            for metric, entry in metrics.items():
                d = entry.get("diff")
                if d is None or "p_holm" not in d or d["p_holm"] >= SIGNIFICANT:
                    continue
                low, high = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
                digits = 4 if metric.startswith("sharp") else 3 if "nll" in metric else 2
                found.append(
                    f"{_real_metric(metric)} {_signed(d['mean'], digits)} "
                    f"[{_signed(low, digits)}, {_signed(high, digits)}] ({d['wins']}/{seeds[task]})"
                )
            if found:
                held.append(f"**{task}, {arm}:** " + "; ".join(found) + ".")
    lines += [
        "",
        f"Significant after the Holm correction over all {data['holm_family']} comparisons "
        "(every arm, metric and task of the run; in brackets the 95% CI, then the seeds on "
        "which the arm did better)" + (":" if held else ": none."),
        "",
        *[f"- {h}" for h in held],
    ]
    return "\n".join(line.rstrip() for line in lines).rstrip()


_REAL_COLUMN_HEADS = {
    "acc clean": "clean acc %",
    "f1 clean": "macro-F1 %",
    "nll clean": "NLL",
    "drop int4": "int4 drop",
}


def quality_real_flat() -> str:
    """Flat-LoRA on the real data, in sentences: best σ, nominal results, cost."""
    data = _real()
    tasks = data["tasks"]
    flat = [a["name"] for a in data["arms"] if a["kind"] == "flat"]
    lines = []
    for task, result in tasks.items():
        summary, n = result["summary"], result["summary"]["LoRA"]["acc clean"]["n"]
        best = max(flat, key=lambda a: summary[a]["acc clean"]["diff"]["mean"])
        d = summary[best]["acc clean"]["diff"]
        low, high = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
        counted = [  # the comparisons of the Holm family (a repeated test set counts once)
            (arm, m, e["diff"]) for arm in flat for m, e in summary[arm].items()
            if "p_holm" in e["diff"]
        ]  # fmt: skip
        nominal = [c for c in counted if c[2]["p"] < SIGNIFICANT]
        gains = sum((x["mean"] > 0) == m.startswith(("acc", "f1")) for _, m, x in nominal)
        held = sum(x["p_holm"] < SIGNIFICANT for _, _, x in nominal)
        cost = data.get("timing", {}).get(task) or result["cost"]
        ratios = [cost[a]["over_lora_median"] for a in flat]
        lines.append(
            f"- **{REAL_TASKS.get(task, task)}.** The best Flat σ in clean accuracy was "
            f"{best.split()[1]}: {_signed(d['mean'])} [{_signed(low)}, {_signed(high)}] "
            f"points, {d['wins']} of {n} seeds better. Of the Flat arms' "
            f"{len(counted)} comparisons, {len(nominal)} were nominally "
            f"significant (p < {SIGNIFICANT}; {gains} gains, {len(nominal) - gains} losses) and "
            f"{held} held after the Holm correction. A Flat step cost "
            f"{_span(ratios, lambda v: f'{v:.2f}')}× a LoRA step."
        )
    return "\n".join(lines)


def quality_real_sigma() -> str:
    """Each Flat σ against plain LoRA on the real data: clean, robustness, sharpness."""
    data = _real()
    tasks = data["tasks"]
    flat = [a["name"] for a in data["arms"] if a["kind"] == "flat"]
    heads, keys = [], []
    for task, result in tasks.items():
        corrupt = (
            f"acc {result['corruptions'][0]}-3"
            if len(result["corruptions"]) == 1
            else "acc corrupted-3"
        )
        where = "typos 3" if corrupt == "acc typos-3" else "corr. 3"
        n = result["summary"]["LoRA"]["acc clean"]["n"]
        heads += [
            f"{task}: Δ clean acc ({n} seeds)",
            f"{task}: Δ {where} acc",
            f"{task}: Δ sharp. @0.3",
        ]
        keys += [(task, "acc clean", 2), (task, corrupt, 2), (task, "sharpness 0.30", 4)]
    lines = [
        "| training σ | " + " | ".join(heads) + " |",
        "|---|" + "---|" * len(heads),
    ]
    for arm in flat:
        cells = []
        for task, metric, digits in keys:
            entry = tasks[task]["summary"][arm][metric]
            cells.append(_real_cell(entry["diff"], digits, entry["n"]))
        lines.append(f"| {arm.split()[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


GENERATORS = {
    "perf-sweep": perf_sweep,
    "drift": drift,
    "quality": quality,
    "quality-headline": quality_headline,
    "memory": memory,
    "perf-teaching": perf_teaching,
    "perf-breakdown": perf_breakdown,
    "perf-levers": perf_levers,
    "perf-reference": perf_reference,
    "perf-memory": perf_memory,
    "perf-fsdp": perf_fsdp,
    "perf-seed-space": perf_seed_space,
    "perf-gpu": perf_gpu,
    "perf-gpu-profile": perf_gpu_profile,
    "perf-ops": perf_ops,
    "quality-real": quality_real,
    "quality-real-flat": quality_real_flat,
    "quality-real-sigma": quality_real_sigma,
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
