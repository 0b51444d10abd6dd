"""Expert parallelism on gloo processes under ZeRO-3 and ZeRO-2 equals one process with EP=1: loss, gradients,
global grad norm, parameters after 3 clipped AdamW steps (fp32, 1e-5 relative).

Topologies: world 2 / EP 2 (experts split, no EDP sharding), world 4 / EP 2 (experts also sharded over EDP groups of 2),
world 4 / EP 4; and world 2 / EP 2 / ZeRO-3 with tied word embeddings (one partitioned parameter used by the embedding
and the LM head: its gradient is the sum of both uses); and every other family (Mixtral, Qwen2-MoE, OLMoE,
DeepSeek-V3) at world 2 / EP 2 under ZeRO-3 and ZeRO-2; and world 2 / EP 2 with the all-to-alls pipelined in 2 token
chunks (parallel.ep_chunks) under both stages; and one process under ZeRO-2, which reduces with "sum" (nothing to
divide by), and under ZeRO-3, whose gradients all skip the reduce bucket (framework/zero/local_grads.py; so do the
experts' wherever EP spans the world). With 2 accumulated micro batches, ZeRO-3 at world 2 / EP 2 gives the same
numbers with and without that shortcut.
"""

from __future__ import annotations

import os

import pytest
import torch

from framework.models.registry import FAMILIES
from tests.distributed.launch import join_runs, run_workers
from tests.distributed.reference import single_process_run
from tests.helpers import rel_err

pytestmark = pytest.mark.slow
WORKER = os.path.join(os.path.dirname(__file__), "ep_worker.py")
TOL = 1e-5
# (world, ep, tied, family (None: Qwen3-MoE), token chunks) -> ZeRO stages. Every other family at world 2 / EP 2 under
# both stages: shared experts and dense layers partitioned over all ranks, routed experts over EDP, DeepSeek-V3's bias
# buffer.
RUNS = {(2, 2, False, None, 1): (3, 2), (4, 2, False, None, 1): (3, 2), (4, 4, False, None, 1): (3,),
        (2, 2, True, None, 1): (3,), (2, 2, False, None, 2): (3, 2), (1, 1, False, None, 1): (2, 3),
        **{(2, 2, False, f, 1): (3, 2) for f in sorted(FAMILIES) if f != "qwen3_moe"}}


def _run_id(key) -> str:
    world, ep, tied, family, chunks = key
    return (f"world{world}-ep{ep}{'-tied' * tied}{f'-{family}' if family else ''}"
            f"{f'-chunks{chunks}' if chunks > 1 else ''}")


def _worker_args(out, key) -> list[str]:
    world, ep, tied, family, chunks = key
    return [str(out), str(ep), *map(str, RUNS[key]), *(["tied"] if tied else []),
            *([f"family={family}"] if family else []), f"chunks={chunks}"]


# world 2 / EP 2 / ZeRO-3 with 2 micro batches accumulated per step: the experts' gradients placed straight into their
# partitions, then through DeepSpeed's bucket only (test_zero3_accumulation_skipping_the_bucket_equals_deepspeeds)
ACCUMULATION = {"straight": ["2", "3", "gas=2"], "bucket_only": ["2", "3", "gas=2", "bucket_only"]}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """world -> {run key -> {stage: rank 0's results}}: every run of one world size in one launch of ep_worker.py
    (its runs one after another in the same processes), made when a test first needs that world. World 2's launch
    also runs ACCUMULATION's runs, keyed by their names (a launch: ~5 s of start-up)."""
    done: dict[int, dict] = {}

    def results(world: int) -> dict:
        if world not in done:
            keys = sorted((key for key in RUNS if key[0] == world), key=_run_id)
            outs = {key: tmp_path_factory.mktemp(_run_id(key)) for key in keys}
            runs = [_worker_args(outs[key], key) for key in keys]
            extra = {mode: tmp_path_factory.mktemp(f"accumulation-{mode}") for mode in ACCUMULATION if world == 2}
            runs += [[str(out), *ACCUMULATION[mode]] for mode, out in extra.items()]
            run_workers(WORKER, join_runs(runs), world=world)
            done[world] = {key: {stage: torch.load(outs[key] / f"stage{stage}.pt") for stage in RUNS[key]}
                           for key in keys}
            done[world].update({mode: torch.load(out / "stage3.pt") for mode, out in extra.items()})
        return done[world]

    return results


@pytest.fixture(scope="module", params=sorted(RUNS, key=_run_id), ids=_run_id)
def run(request, launched):
    world, ep, tied, family, chunks = request.param
    results = launched(world)[request.param]
    return world, ep, results, single_process_run(world=world, tied=tied, family=family), tied


def test_ep_matches_single_process(run):
    world, ep, results, reference, tied = run
    # tied: one parameter, named once (as the embedding) by the engine and the reference alike
    assert ("lm_head.weight" in reference["grads"]) != tied
    assert reference["norms"][0] > 0.5  # clipping (max norm 0.5) is active, so the global norm matters
    for stage, got in results.items():
        assert got["grad_scale"] is not None and float(got["grad_scale"]) > 1.0, stage  # clipped in AdamW's kernel
        # ZeRO-3 gradients of one-rank partitions (every one at world 1, the experts where EDP is 1) skip the bucket
        assert (got["straight_grads"] > 0) == (stage == 3 and world == ep), (stage, got["straight_grads"])
        for step, (a, b) in enumerate(zip(got["losses"], reference["losses"])):
            assert abs(a - b) <= TOL * abs(b), (stage, step, a, b)
        for step, (a, b) in enumerate(zip(got["norms"], reference["norms"])):
            assert abs(a - b) <= TOL * abs(b), (stage, "grad norm", step, a, b)
        assert set(got["grads"]) == set(reference["grads"])
        for name, g in reference["grads"].items():
            assert got["grads"][name].shape == g.shape, name
            assert rel_err(got["grads"][name], g) <= TOL, (stage, name, rel_err(got["grads"][name], g))
        for name, p in reference["params"].items():
            if name.endswith("k_proj.bias"):
                # a key bias shifts every score of a query alike, which softmax ignores: its gradient is zero up to
                # rounding, and Adam turns that noise into full-size steps (Qwen2-MoE, measured 1.4e-5 apart)
                continue
            assert rel_err(got["params"][name], p) <= TOL, (stage, name, rel_err(got["params"][name], p))
            # the comparison means something only if 3 steps moved the weights well beyond the tolerance
            assert rel_err(p, reference["initial"][name]) > 100 * TOL, name


def test_zero3_accumulation_skipping_the_bucket_equals_deepspeeds(launched):
    """2 micro batches accumulated per step at world 2 / EP 2 under ZeRO-3: the experts' gradients placed straight
    into their partitions (divided by the world, then added) give DeepSpeed's own bucket path's numbers exactly."""
    straight, bucket = launched(2)["straight"], launched(2)["bucket_only"]
    assert straight["straight_grads"] > 0 and bucket["straight_grads"] == 0
    assert straight["losses"] == bucket["losses"] and straight["norms"] == bucket["norms"]
    for key in ("grads", "params"):
        for name, t in bucket[key].items():
            assert torch.equal(straight[key][name], t), (key, name)
