"""One-line start-up errors for expert-parallel settings that cannot work."""

from __future__ import annotations

import pytest

from framework.config.plan import check_parallel
from framework.zero.engine import check_ds_config


def test_ep_size_must_divide_world_and_experts():
    check_parallel(4, 8, 128, 8)
    with pytest.raises(ValueError, match=r"parallel.ep_size \(3\) must divide the number of processes \(8\); "
                                         r"choose one of \[1, 2, 4, 8\]"):
        check_parallel(3, 8, 128)
    with pytest.raises(ValueError, match=r"parallel.ep_size \(4\) must divide the model's num_experts \(6\)"):
        check_parallel(4, 8, 6)
    with pytest.raises(ValueError, match="must be >= 1"):
        check_parallel(0, 8, 128)
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(9\) must be between 1 and num_experts \(8\)"):
        check_parallel(1, 1, 8, 9)


@pytest.mark.parametrize("zero,extra,match", [
    ({"stage": 3, "zero_hpz_partition_size": 2}, {}, "zero_hpz_partition_size=2 \\(hpZ\\)"),
    ({"stage": 3, "zero_quantized_gradients": True}, {}, "zero_quantized_gradients=true"),
    ({"stage": 3}, {"sequence_parallel_size": 2}, "sequence_parallel_size=2"),
    ({"stage": 2, "reduce_scatter": False}, {}, "reduce_scatter=false; ZeRO-2"),
])
def test_ep_incompatible_zero_options(zero, extra, match):
    config = {"zero_optimization": zero, **extra}
    with pytest.raises(ValueError, match=match):
        check_ds_config(config, ep_size=2, source="ds_configs/x.json")
    check_ds_config(config, ep_size=1)  # fine without expert parallelism


def test_unknown_stage():
    with pytest.raises(ValueError, match="zero_optimization.stage=4"):
        check_ds_config({"zero_optimization": {"stage": 4}}, ep_size=1)
