"""The benchmarks' run control on CPU, with stand-in scripts: a SIGTERM (`timeout`, a scheduler) stops a launched run's
whole process group (benchmarks/launching.py), and benchmarks/layer_ab.py prints each run as it ends and, when
stopped, the medians of the runs it has."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

FAKE_LAYER = """
import argparse, json, os, time
p = argparse.ArgumentParser()
p.add_argument("--backends"); p.add_argument("--overheads", action="store_true"); p.add_argument("--iters")
p.add_argument("--out"); p.add_argument("--tokens", nargs="+", type=int)
a = p.parse_args()
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
rows = [{"tokens": t, "impl": impl, "ms": MS, "ceiling_ms": 1.0, "kept_gib": MS / 4,
         "overheads": {"enqueue_ms": MS - 0.5, "kernel_ms": 1.5, "kernels": KERNELS}}
        for t in a.tokens for impl in ("ours:grouped_mm", "transformers-5 grouped_mm block")]
json.dump({"ceiling_tflops": 700, "rows": rows}, open(a.out, "w"))
"""


def _trees(tmp_path: Path) -> tuple[Path, Path]:
    """A candidate tree holding layer_ab.py and a stand-in moe_layer.py (2 ms, 30 kernels, 0.5 GiB), a baseline (4 ms,
    34, 1 GiB)."""
    cand, base = tmp_path / "cand" / "benchmarks", tmp_path / "base" / "benchmarks"
    for tree, ms, kernels in ((cand, 2.0, 30), (base, 4.0, 34)):
        tree.mkdir(parents=True)
        (tree / "moe_layer.py").write_text(FAKE_LAYER.replace("MS", str(ms)).replace("KERNELS", str(kernels)))
    shutil.copy(REPO / "benchmarks" / "layer_ab.py", cand / "layer_ab.py")
    return cand.parent, base.parent


def test_layer_ab_prints_runs_and_medians(tmp_path):
    cand, base = _trees(tmp_path)
    done = subprocess.run([sys.executable, str(cand / "benchmarks" / "layer_ab.py"), "--baseline", str(base),
                           "--rounds", "2", "--tokens", "4096"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    runs = [line for line in lines if line.startswith("round ")]
    assert [line.split(":")[0] for line in runs] == ["round 1 candidate", "round 1 baseline", "round 2 baseline",
                                                      "round 2 candidate"]
    assert "T=4096 synced 2.00 host 1.50 kernels 1.50 #k 30 stock host 1.50" in runs[0]
    assert "medians of {'candidate': 2, 'baseline': 2} runs" in done.stdout
    change = next(line for line in lines if line.split()[:2] == ["4096", "change"])
    assert change.split()[2:] == ["-50.0%", "-2.00", "+0.00", "-4", "-0.50"]


def test_layer_ab_stopped_by_sigterm_prints_what_it_has(tmp_path):
    cand, base = _trees(tmp_path)
    proc = subprocess.Popen([sys.executable, str(cand / "benchmarks" / "layer_ab.py"), "--baseline", str(base),
                             "--rounds", "3", "--tokens", "4096"], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, FAKE_SLEEP="1"))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("round 1 baseline"):
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(seen) + proc.stdout.read()
    assert proc.wait(timeout=30) == 0
    assert "stopped: medians of the runs done so far" in out
    assert "medians of {'candidate': 1, 'baseline': 1} runs" in out


def test_sigterm_stops_the_launched_process_group(tmp_path):
    """A run started by run_logged lives in its own process group; SIGTERM to the benchmark must not orphan it."""
    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    bench = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.launching import run_logged; "
             f"run_logged([sys.executable, '-c', {child!r}], {str(tmp_path / 'run.log')!r})")
    proc = subprocess.Popen([sys.executable, "-c", bench])
    deadline = time.time() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    child_pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"the launched run (pid {child_pid}) outlived the benchmark's SIGTERM")
