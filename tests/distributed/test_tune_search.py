"""A real two-trial ZeRO search on a tiny model with 2 CPU processes: results CSV, best JSON, resume, skips."""

from __future__ import annotations

import csv
import json
import os

from framework.config import load_run_config
from framework.config.deepspeed import build_ds_config, read_ds_json
from framework.tuning.search import Trial, grid, python_launcher, run_search
from tests.distributed.launch import free_port
from tests.distributed.test_pretrain import TINY_YAML, write_corpus


def test_two_trial_search_resumes_and_skips(tmp_path):
    corpus = write_corpus(str(tmp_path / "train.jsonl"), 200, 0)
    trials = grid([2], [2, 3], [2], [1.0], [False], [False])
    assert [t.name for t in trials] == ["mbs2-z2-ep2-b1-ac0-off0", "mbs2-z3-ep2-b1-ac0-off0"]
    # token chunks only where there is an all-to-all to pipeline
    assert [t.name for t in grid([2], [3], [1, 2], [1.0], [False], [False], [1, 2])] == [
        "mbs2-z3-ep1-b1-ac0-off0", "mbs2-z3-ep2-b1-ac0-off0", "mbs2-z3-ep2-b1-ac0-off0-c2"]
    args = dict(config=TINY_YAML, out_dir=str(tmp_path / "search"), launcher=python_launcher(2, None, free_port()),
                base_overrides=[f"data.paths=[{corpus}]"], steps=4, warmup=1, auto=lambda ep: (1000, 100))
    best = run_search(trials=trials, fits=lambda t: (True, 0.1, ""), **args)
    rows = list(csv.DictReader(open(tmp_path / "search" / "trials.csv")))
    assert [(r["trial"], r["status"]) for r in rows] == [(t.name, "ok") for t in trials]
    assert all(float(r["tokens_per_s_per_gpu"]) > 0 and float(r["mem_gb"]) > 0 for r in rows)
    assert best["trial"] == max(rows, key=lambda r: float(r["tokens_per_s_per_gpu"]))["trial"]

    # the best JSON works with the run's YAML as it is, with the overrides written beside it
    overrides = open(tmp_path / "search" / "best_overrides.txt").read().split()
    cfg = load_run_config(TINY_YAML, overrides)
    ds = build_ds_config(cfg, 2, False, read_ds_json(str(tmp_path / "search" / "best_ds_config.json")), "best")
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000
    trial_json = json.load(open(tmp_path / "search" / "trials" / best["trial"] / "trial_ds_config.json"))
    assert ds["zero_optimization"]["stage"] == trial_json["zero_optimization"]["stage"]

    # resumed: recorded trials are not run again; a trial the estimate rejects is recorded as skipped, not run, with
    # its token chunks in the results; a chunked trial's overrides resolve to parallel.ep_chunks=2
    chunked, extra = Trial(2, 3, 2, 1.0, False, False, 2), Trial(4, 3, 2, 1.0, False, False)
    run_search(trials=trials + [chunked, extra], fits=lambda t: (t not in (chunked, extra), 99.0, "needs 99 GiB"),
               **args)
    rows = list(csv.DictReader(open(tmp_path / "search" / "trials.csv")))
    assert [(r["trial"], r["status"], r["ep_chunks"]) for r in rows[2:]] == [
        ("mbs2-z3-ep2-b1-ac0-off0-c2", "skipped", "2"), (extra.name, "skipped", "1")]
    assert rows[-1]["note"] == "needs 99 GiB"
    assert load_run_config(TINY_YAML, [*args["base_overrides"], *chunked.overrides()]).parallel.ep_chunks == 2
    assert not (tmp_path / "search" / "trials" / extra.name).exists()
