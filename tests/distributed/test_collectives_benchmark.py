"""benchmarks/collectives.py on 4 gloo processes posing as 2 nodes of 2: the groups it times are the trainer's layout
(EP inside a node, EDP and the world across nodes), each collective's result is checked, and the rates it suggests
for `tools/tune_zero.py time` come from the right rows. CPU bandwidths mean nothing; the bookkeeping is what is
tested."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks.collectives import report
from tests.distributed.launch import run_workers

pytestmark = pytest.mark.slow
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks",
                      "collectives.py")


def test_groups_sizes_and_suggested_rates(tmp_path):
    out = tmp_path / "collectives.json"
    run_workers(SCRIPT, ["--ep_size", "2", "--gpus_per_node", "2", "--mb", "0.5", "--iters", "2", "--out", str(out)],
                world=4, timeout=300)
    result = json.loads(out.read_text())
    rows = [(r["op"], r["group"], r["ranks"], r["spans_nodes"]) for r in result["rows"]]
    assert rows == [("all_to_all", "EP", 2, False), ("all_gather", "world", 4, True),
                    ("reduce_scatter", "world", 4, True), ("all_gather", "EDP", 2, True),
                    ("reduce_scatter", "EDP", 2, True)]
    sizes = {r["megabytes"] for r in result["rows"]}
    assert len(sizes) == 1 and 0.49 < sizes.pop() <= 0.5  # rounded down to a multiple of every group size
    for r in result["rows"]:
        assert r["bus_gbs"] == pytest.approx(r["megabytes"] * 1e6 * (r["ranks"] - 1) / r["ranks"] / (r["ms"] / 1e3)
                                             / 1e9)
    assert result["intra_gbs"] == result["rows"][0]["bus_gbs"]
    assert result["inter_gbs"] == min(r["bus_gbs"] for r in result["rows"][1:])
    last = report(result).splitlines()[-1]
    assert last == (f"for tools/tune_zero.py time: --intra_gbs {result['intra_gbs']:.0f} "
                    f"--inter_gbs {result['inter_gbs']:.0f}")
