"""train.profile_steps: three CPU steps of the tiny model with steps 2-3 profiled leave a trace, an op table and a
kernel list in OUTPUT_DIR/profile."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_profile_steps_write_trace_table_and_kernels(tmp_path):
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} routes tokens to experts " * (1 + i % 7)}) + "\n"
                              for i in range(60)))
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "pretrain.py"), "--config",
                           os.path.join(REPO, "model_configs", "tiny.yaml"), f"data.paths=[{corpus}]",
                           "train.max_steps=3", "train.save_steps=0", "train.save_at_end=false", "export.at_end=false",
                           "train.profile_steps=[2,3]", f"train.output_dir={out}"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]

    profile = out / "profile"
    with gzip.open(profile / "rank0.trace.json.gz", "rt") as f:
        assert "traceEvents" in json.load(f)
    kernels = json.loads((profile / "rank0_kernels.json").read_text())
    assert isinstance(kernels, list) and 0 < len(kernels) <= 60
    assert all(set(k) == {"name", "calls", "device_time_ms", "cpu_time_ms"} for k in kernels)
    assert kernels[0]["cpu_time_ms"] > 0  # CPU: ranked by self CPU time
    header, table = (profile / "rank0_ops.txt").read_text().split("\n", 1)
    assert "steps 2-3" in header and "(2 steps)" in header and "aten::" in table
    assert not [name for name in os.listdir(profile) if ".tmp" in name]
