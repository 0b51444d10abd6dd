#!/usr/bin/env python
"""Plot a run's OUTPUT_DIR/metrics.jsonl as one PNG: loss, expert load imbalance per MoE layer, learning rate.

    python tools/plot_metrics.py runs/x/metrics.jsonl [--out runs/x/metrics.png]   # a run directory works too

Reads the trainer's JSON lines: training lines ({"step", "loss", "lm_loss", "lr", "expert_load_max": [per MoE layer],
"expert_load_mean": [per MoE layer], ...}) and eval lines ({"step", "eval_loss", ...}); other keys are ignored.
Lines that are not JSON objects (the last line of a run killed mid-write, which a resumed run may have appended to)
are skipped with a note; a step logged twice (a resumed run repeats the steps after its checkpoint) keeps its last
line. Panels: (a) loss and lm_loss vs step with eval loss points, (b) expert load imbalance, max / mean tokens per
expert, one line per MoE layer (a heatmap past 8 layers), (c) learning rate. The PNG is written under a temporary
name and renamed, so a viewer never sees half a file. Needs matplotlib (optional: pip install matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import dataclass, field

PROG = "plot_metrics"
MAX_LINES = 8  # MoE layers drawn as separate lines; more become a heatmap
NAN = float("nan")


@dataclass
class Metrics:
    train: list[dict] = field(default_factory=list)  # by step, one row per step
    eval: list[dict] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # 1-based line numbers that were not JSON objects


def _by_step(rows: list[dict]) -> list[dict]:
    """Sorted by step; a step seen twice keeps its last row (a resumed run re-logs the steps after its checkpoint)."""
    last = {}
    for row in rows:
        last[row["step"]] = row
    return [last[step] for step in sorted(last)]


def read_metrics(path: str) -> Metrics:
    metrics = Metrics()
    train, evals = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                metrics.skipped.append(lineno)
                continue
            if not isinstance(row, dict):
                metrics.skipped.append(lineno)
                continue
            step = row.get("step")
            if not isinstance(step, int) or isinstance(step, bool):
                continue  # not a step line (e.g. a header another writer put there)
            if "loss" in row:
                train.append(row)
            if "eval_loss" in row:
                evals.append(row)
    metrics.train, metrics.eval = _by_step(train), _by_step(evals)
    return metrics


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else NAN


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of `key`; a missing or null value is NaN (a gap in the line)."""
    return [r["step"] for r in rows], [_number(r.get(key)) for r in rows]


def load_imbalance(rows: list[dict]) -> tuple[list[int], list[list[float]]]:
    """Steps and, per MoE layer, max / mean tokens per expert at each step (1.0 = perfectly balanced)."""
    steps, ratios = [], []
    for row in rows:
        top, mean = row.get("expert_load_max"), row.get("expert_load_mean")
        if not isinstance(top, list) or not isinstance(mean, list):
            continue
        steps.append(row["step"])
        ratios.append([_number(t) / m if _number(m) > 0 else NAN for t, m in zip(top, map(_number, mean))])
    num_layers = max((len(r) for r in ratios), default=0)
    by_layer = [[r[layer] if layer < len(r) else NAN for r in ratios] for layer in range(num_layers)]
    return steps, by_layer


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in the metrics", transform=ax.transAxes, ha="center", va="center", color="gray")


def _plot_loss(ax, metrics: Metrics) -> None:
    drawn = False
    for key in ("loss", "lm_loss"):
        steps, values = series(metrics.train, key)
        if any(not math.isnan(v) for v in values):
            ax.plot(steps, values, label=key, linewidth=1)
            drawn = True
    steps, values = series(metrics.eval, "eval_loss")
    if steps:
        ax.plot(steps, values, "o", label="eval_loss", markersize=4)
        drawn = True
    if not drawn:
        _empty(ax, "loss")
        return
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)


def _plot_imbalance(ax, fig, metrics: Metrics) -> None:
    steps, by_layer = load_imbalance(metrics.train)
    if not steps or not by_layer:
        _empty(ax, "expert_load_max / expert_load_mean")
        return
    if len(by_layer) <= MAX_LINES:
        for layer, ratios in enumerate(by_layer):
            ax.plot(steps, ratios, label=f"MoE layer {layer}", linewidth=1)
        ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        ax.set_ylabel("max / mean tokens per expert")
        ax.legend(loc="upper right", ncol=2, fontsize="small")
        ax.grid(alpha=0.3)
        return
    mesh = ax.pcolormesh(steps, list(range(len(by_layer))), by_layer, shading="nearest", cmap="viridis", vmin=1.0)
    fig.colorbar(mesh, ax=ax, label="max / mean tokens per expert")
    ax.set_ylabel("MoE layer")


def _plot_lr(ax, metrics: Metrics) -> None:
    steps, values = series(metrics.train, "lr")
    if not any(not math.isnan(v) for v in values):
        _empty(ax, "lr")
        return
    ax.plot(steps, values, linewidth=1)
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.grid(alpha=0.3)


def write_png(metrics: Metrics, out: str, title: str) -> None:
    """Draw the three panels and write `out` atomically (temporary name in the same folder, then rename)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - optional dependency
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(10, 11), layout="constrained")
    FigureCanvasAgg(fig)  # Agg: no display, no pyplot global state
    ax_loss, ax_moe, ax_lr = fig.subplots(3, 1, sharex=True)
    _plot_loss(ax_loss, metrics)
    _plot_imbalance(ax_moe, fig, metrics)
    _plot_lr(ax_lr, metrics)
    ax_loss.set_title("(a) loss", loc="left")
    ax_moe.set_title("(b) expert load imbalance", loc="left")
    ax_lr.set_title("(c) learning rate", loc="left")
    ax_lr.set_xlabel("step")
    fig.suptitle(title)
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("metrics", help="OUTPUT_DIR/metrics.jsonl, or OUTPUT_DIR")
    p.add_argument("--out", default=None, help="PNG to write (default: next to the metrics file, .png)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = os.path.join(args.metrics, "metrics.jsonl") if os.path.isdir(args.metrics) else args.metrics
    out = args.out or os.path.splitext(path)[0] + ".png"
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        print(f"{PROG}: error: matplotlib is not installed (an optional dependency): pip install matplotlib",
              file=sys.stderr)
        return 2
    try:
        if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise ValueError(f"output folder {os.path.dirname(os.path.abspath(out))} does not exist")
        metrics = read_metrics(path)
        if not metrics.train and not metrics.eval:
            raise ValueError(f"{path}: no training or eval lines (JSON objects with 'step' and 'loss' or 'eval_loss')")
        if metrics.skipped:
            shown = ", ".join(map(str, metrics.skipped[:10])) + (", ..." if len(metrics.skipped) > 10 else "")
            print(f"{PROG}: skipped {len(metrics.skipped)} line(s) that are not JSON objects (partly written?): "
                  f"{path} line(s) {shown}", file=sys.stderr)
        write_png(metrics, out, path)
    except (OSError, ValueError) as e:
        print(f"{PROG}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    layers = len(load_imbalance(metrics.train)[1])
    print(f"{PROG}: wrote {out} ({len(metrics.train)} training steps, {len(metrics.eval)} evals, "
          f"{layers} MoE layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
