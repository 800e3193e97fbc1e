"""Plot the overhead sweep: extra time per step over plain LoRA vs tokens per micro-batch.

Reads the JSON written by ``overhead.py --sweep`` and draws one panel per (gradient
accumulation, width): the extra step time of FlatPerturb, of the in-place method and of
LoRA-SAM over plain LoRA, as a fraction of the plain LoRA step, against the floor t_rng / t_lora
(drawing the noise alone) and the target 1.10 · t_rng / t_lora: the medians of the per-round
ratios. Log-log axes; cells the sweep skipped are named in their panel.

Run (writes docs/img/overhead.png), and smoke test (plots the committed sweep into a
temporary PNG next to ``--out``; skips when matplotlib is missing):

    python benchmarks/plot_performance.py
    python benchmarks/plot_performance.py --smoke --out /tmp/plot_performance.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SERIES = (  # (label, colour, the cell's median of per-round ratios to plain LoRA)
    ("FlatPerturb", "C0", "flat_over_lora_paired_median"),
    ("in-place (inexact)", "C1", "inplace_over_lora_paired_median"),
    ("LoRA-SAM", "C3", "sam_over_lora_paired_median"),
)


def plot(report: dict[str, Any], png: Path) -> dict[str, Any]:
    """Draw the sweep in ``report`` into ``png``; return what was drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["cells"]
    widths = sorted({cell["width"] for cell in cells})
    accumulations = sorted({cell["accumulation"] for cell in cells})
    skipped = report.get("skipped_cells", [])
    all_tokens = sorted({cell["tokens"] for cell in [*cells, *skipped]})
    figure, axes = plt.subplots(
        len(accumulations),
        len(widths),
        figsize=(3.6 * len(widths), 3.1 * len(accumulations)),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for row, accumulation in enumerate(accumulations):
        for column, width in enumerate(widths):
            ax = axes[row][column]
            chosen = sorted(
                (c for c in cells if c["width"] == width and c["accumulation"] == accumulation),
                key=lambda c: c["tokens"],
            )
            tokens = [c["tokens"] for c in chosen]
            floor = [c["summary"]["rng_over_lora_paired_median"] for c in chosen]
            ax.plot(tokens, floor, "k.-", lw=1, label="floor: t_rng / t_lora")
            ax.plot(tokens, [1.1 * f for f in floor], "k:", lw=1, label="target: 1.10 × floor")
            for label, colour, key in SERIES:
                values = [max(c["summary"][key] - 1, 1e-3) for c in chosen]
                ax.plot(tokens, values, "o-", color=colour, ms=4, label=label)
            missing = [
                c["tokens"]
                for c in report.get("skipped_cells", [])
                if c["width"] == width and c["accumulation"] == accumulation
            ]
            if missing:
                ax.text(
                    0.97,
                    0.03,
                    "not run: " + ", ".join(str(t) for t in missing),
                    transform=ax.transAxes,
                    ha="right",
                    fontsize=7,
                    color="0.4",
                )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(all_tokens, [str(t) for t in all_tokens])
            ax.set_xlim(all_tokens[0] / 1.5, all_tokens[-1] * 1.5)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"d = {width}, accumulation {accumulation}", fontsize=9)
            if row == len(accumulations) - 1:
                ax.set_xlabel("tokens per micro-batch")
            if column == 0:
                ax.set_ylabel("extra time / plain LoRA step")
            ax.set_ylim(3e-3, 3)
    layers = cells[0]["layers"]
    where = (
        f"{report.get('gpu', 'GPU')}, {cells[0].get('dtype', 'bf16')}"
        if report.get("device") == "cuda"
        else f"{report['threads']} thread(s), CPU"
    )
    figure.suptitle(
        f"Step time over plain LoRA: GPT decoder, {layers} layers, LoRA on every block linear "
        f"({where})",
        fontsize=10,
    )
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.06, 1, 0.95))
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=110)
    plt.close(figure)
    return {"png": str(png), "cells": len(cells), "widths": widths, "accumulation": accumulations}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sweep",
        type=Path,
        default=ROOT / "benchmarks/results/overhead_sweep.json",
        help="the JSON written by overhead.py --sweep",
    )
    parser.add_argument("--png", type=Path, default=None, help="the figure to write")
    parser.add_argument("--smoke", action="store_true", help="plot into a temporary PNG")
    parser.add_argument("--out", type=Path, default=None, help="a JSON note of what was drawn")
    args = parser.parse_args(argv)
    if args.png is None:
        if args.smoke:
            stem = args.out if args.out is not None else Path("/tmp/plot_performance.json")
            args.png = stem.with_suffix(".png")
        else:
            args.png = ROOT / "docs/img/overhead.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if not args.smoke:
            raise SystemExit("matplotlib is needed: pip install matplotlib") from None
        print("matplotlib is not installed; smoke run skips the plot")
        note: dict[str, Any] = {"skipped": "matplotlib is not installed"}
    else:
        note = plot(json.loads(args.sweep.read_text()), args.png)
        print(f"wrote {args.png}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(note, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
