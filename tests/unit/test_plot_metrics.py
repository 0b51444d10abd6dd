"""tools/plot_metrics.py: a synthetic metrics.jsonl gives a PNG; truncated and repeated lines are tolerated."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest

from tests.helpers import load_tool

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, num_layers: int, steps: int = 30, truncated: bool = True) -> None:
    lines = [json.dumps({"run": "header without a step"})]
    for step in range(1, steps + 1):
        mean = [64.0] * num_layers
        top = [64.0 * (1 + 3.0 / step + 0.1 * layer) for layer in range(num_layers)]
        lines.append(json.dumps({
            "step": step, "loss": 10.0 / step + 2, "lm_loss": 10.0 / step + 1.9, "aux_loss": None if step % 2 else 0.01,
            "lr": 3e-4 * min(1.0, step / 10), "grad_norm": 1.0, "tokens_per_s_per_gpu": 1e4, "tflops_per_gpu": 100.0,
            "mfu": 0.1, "mem_gb": 40.0, "expert_load_max": top, "expert_load_mean": mean, "unknown_key": [1, 2]}))
        if step % 10 == 0:
            lines.append(json.dumps({"step": step, "eval_loss": 10.0 / step + 2.1, "eval_ppl": 9.0}))
    text = "\n".join(lines) + "\n"
    if truncated:  # a run killed mid-write: half a line, no newline
        text += '{"step": 31, "loss": 2.3, "lm_lo'
    path.write_text(text)


@pytest.mark.parametrize("num_layers", [4, 48])  # lines per layer, heatmap
def test_png_from_synthetic_metrics(tmp_path, capsys, num_layers):
    pytest.importorskip("matplotlib")
    tool = load_tool("plot_metrics")
    metrics = tmp_path / "metrics.jsonl"
    write_metrics(metrics, num_layers)
    out = tmp_path / "plot.png"
    assert tool.main([str(metrics), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "plot.png"]  # no temporary file left behind
    captured = capsys.readouterr()
    assert "skipped 1 line(s)" in captured.err and "line(s) 35" in captured.err
    assert f"30 training steps, 3 evals, {num_layers} MoE layers" in captured.out


def test_default_output_next_to_metrics_and_sparse_file(tmp_path):
    pytest.importorskip("matplotlib")
    tool = load_tool("plot_metrics")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")  # no lr, no expert loads
    assert tool.main([str(tmp_path)]) == 0
    assert (tmp_path / "metrics.png").read_bytes().startswith(PNG_MAGIC)


def test_reader_skips_bad_lines_and_keeps_last_of_a_repeated_step(tmp_path):
    tool = load_tool("plot_metrics")
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 5.0, "lr": 1.0, "expert_load_max": [4, 6], "expert_load_mean": [2, 0]},
            {"step": 2, "loss": 4.0}, {"step": 3, "loss": 3.0}]
    resumed = [{"step": 2, "loss": 4.5}, {"step": 3, "loss": 3.5}, {"step": 3, "eval_loss": 3.6}]
    # The killed run's half line is followed by the resumed run's first line, on the same line.
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo'
    text += "".join(json.dumps(r) + "\n" for r in resumed)
    path.write_text(text + "[1, 2]\n\n")
    metrics = tool.read_metrics(str(path))
    assert metrics.skipped == [4, 7]
    # Step 2's re-log shared the broken line, so the first run's value stays; step 3's re-log replaces the first.
    assert tool.series(metrics.train, "loss") == ([1, 2, 3], [5.0, 4.0, 3.5])
    assert tool.series(metrics.eval, "eval_loss") == ([3], [3.6])
    steps, lr = tool.series(metrics.train, "lr")
    assert lr[0] == 1.0 and math.isnan(lr[1])
    steps, by_layer = tool.load_imbalance(metrics.train)
    assert steps == [1] and by_layer[0] == [2.0] and math.isnan(by_layer[1][0])  # mean 0: undefined, not inf


def test_errors_are_one_line(tmp_path, capsys):
    tool = load_tool("plot_metrics")
    assert tool.main([str(tmp_path / "missing.jsonl")]) == 2
    empty = tmp_path / "metrics.jsonl"
    empty.write_text('{"note": 1}\n')
    if importlib.util.find_spec("matplotlib") is not None:
        assert tool.main([str(empty)]) == 2
        assert "no training or eval lines" in capsys.readouterr().err


def test_missing_matplotlib_names_the_install(tmp_path, capsys, monkeypatch):
    tool = load_tool("plot_metrics")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert tool.main([str(tmp_path / "metrics.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install matplotlib" in err
