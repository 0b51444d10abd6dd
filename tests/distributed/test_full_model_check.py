"""benchmarks/full_model.py (the issue #8 checks) end to end on CPU: model_configs/tiny.yaml on 2 gloo processes,
EP=2, ZeRO-3, 4 steps with a save at step 2. The resumed run's losses and the export round trip must come out exactly
equal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "full_model.py")
TINY_YAML = os.path.join(REPO, "model_configs", "tiny.yaml")


def test_full_model_check_tiny_ep2_zero3(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    proc = subprocess.run([sys.executable, SCRIPT, "--config", TINY_YAML, "--num_gpus", "2", "--ep", "2",
                           "--zero_stage", "3", "--steps", "4", "--save_at", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = proc.stdout[proc.stdout.index("issue #8 checks"):]
    assert "resume losses (steps 3-4)" in table and "PASS  equal: max rel diff 0 " in table, table
    assert "PASS  equal: 36/36 equal" in table, table  # 3 layers, 2 of them MoE with fused experts
    assert "peak memory per GPU" in table and "tokens/s/GPU" in table, table
    assert table.rstrip().endswith("RESULT PASS"), table

    summary = json.loads((out / "summary.json").read_text())
    assert summary["resume"]["ok"] and summary["resume"]["steps"] == [3, 4]
    assert summary["export"]["equal"] == summary["export"]["n"] == 36
    assert summary["memory_estimate_gib"] is not None and summary["memory_measured_gb"] > 0
    # run B resumed into its own directory: it logged only steps 3-4, and run A kept both of its checkpoints
    steps_b = [json.loads(line)["step"] for line in open(out / "b" / "metrics.jsonl")]
    assert steps_b == [3, 4]
    assert sorted(os.listdir(out / "a" / "checkpoints")) == ["latest", "step_00000002", "step_00000004"]
    assert not (out / "b" / "checkpoints").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # nothing written outside --out
