"""benchmarks/e2e.py on CPU: model_configs/tiny.yaml on 2 gloo processes, EP=2, ZeRO-3, launched twice (--repeats 2),
with a --variant row (the all-to-alls in 2 token chunks) interleaved. Each row combines its launches (median
throughput, range, same losses), the variant row is compared with the plain one, and e2e.json holds what the table
printed."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from benchmarks.e2e import combine_repeats, jit_arch_list
from benchmarks.launching import DIST_ENV

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "e2e.py")
TINY_YAML = os.path.join(REPO, "model_configs", "tiny.yaml")
# e2e.py with its launches started by tests/distributed/launch.py's light launcher instead of DeepSpeed's runner, which
# imports deepspeed twice before any rank starts (~3 s of each of the 4 launches). This test is about the rows, their
# repeats and how they combine; the runner command of benchmarks/launching.py stays covered by full_model.py's test.
E2E_LOCAL_LAUNCH = ("import runpy, sys; import benchmarks.launching as launching; "
                    "from tests.distributed.launch import local_launcher; "
                    "launching.runner = local_launcher; sys.argv = sys.argv[1:]; "
                    "runpy.run_path(sys.argv[0], run_name='__main__')")


def test_e2e_repeats_two_launches_and_combines_them(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    proc = subprocess.run([sys.executable, "-c", E2E_LOCAL_LAUNCH, SCRIPT, "--config", TINY_YAML, "--num_gpus", "2",
                           "--ep", "2", "--layers", "2", "--seq", "64", "--cases", "1:0", "--steps", "3",
                           "--warmup", "1", "--anchors=", "--zero_stages", "3", "--repeats", "2", "--out",
                           str(tmp_path), "--variant", "c2:parallel.ep_chunks=2"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    launches = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    assert [(r["repeat"], r["row"]) for r in launches] == [
        (1, "ours grouped_mm ep2 z3"), (1, "ours grouped_mm ep2 z3 [c2]"), (2, "ours grouped_mm ep2 z3"),
        (2, "ours grouped_mm ep2 z3 [c2]")], launches
    assert all("error" not in r for r in launches), launches
    # same seed, same steps: the same training, and the chunked exchange trains the same model
    assert launches[0]["last_loss"] == launches[2]["last_loss"]
    assert abs(launches[1]["last_loss"] - launches[0]["last_loss"]) <= 1e-5 * abs(launches[0]["last_loss"])
    rows = json.loads((tmp_path / "e2e.json").read_text())["cases"][0]["rows"]
    assert [r["launches"] for r in rows] == [2, 2]
    assert rows[0]["tokens_per_s_per_gpu"] == statistics.median(r["tokens_per_s_per_gpu"] for r in launches[::2])
    assert "median of 2 launches" in proc.stdout and "x without [c2]" in proc.stdout
    with open(tmp_path / "ours-grouped_mm-z3-c2-mbs1-gc0-r1" / "run_config.yaml") as f:
        assert "ep_chunks: 2" in f.read()
    assert sorted(os.listdir(tmp_path)) == ["e2e.json"] + sorted(
        f"ours-grouped_mm-z3{v}-mbs1-gc0-r{r}{ext}" for v in ("", "-c2") for r in (1, 2) for ext in ("", ".log"))


def test_combine_repeats_takes_medians_and_fails_on_any_failed_launch():
    ok = [{"row": "ours", "tokens_per_s_per_gpu": t, "tflops_per_gpu": t / 100, "mem_gb": m, "first_loss": 2.0,
           "last_loss": 1.0} for t, m in ((300.0, 5.0), (100.0, 7.0), (200.0, 6.0))]
    row = combine_repeats(ok)
    assert (row["tokens_per_s_per_gpu"], row["tflops_per_gpu"], row["tflops_range"], row["mem_gb"]) == (
        200.0, 2.0, [1.0, 3.0], 7.0)
    failed = combine_repeats(ok[:1] + [{"row": "ours", "error": "rc=1"}])
    assert failed["error"] == "1 of 2 launches failed; first: rc=1"


def test_anchor_arch_list_is_what_deepspeeds_jit_builder_parses():
    # "9.0a" made DeepSpeed 0.19.8's FusedAdam build fail (--anchor_adam fused); plain and +PTX entries pass unchanged
    assert jit_arch_list("9.0a") == "9.0"
    assert jit_arch_list("8.0;9.0a;10.0a+PTX") == "8.0;9.0;10.0+PTX"
    assert jit_arch_list("9.0 10.0") == "9.0 10.0"


def test_missing_anchor_script_is_one_line_before_any_launch(tmp_path):
    missing = tmp_path / "nowhere" / "deepspeed_e2e.py"
    proc = subprocess.run([sys.executable, SCRIPT, "--anchors", "leaf", "--anchor_script", str(missing),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert f"needs the shared anchor script, not found at {missing}" in proc.stderr
    assert not (tmp_path / "out").exists()
