"""benchmarks/moe_layer.py --timeline: kernels matched to their host launches and the device's idle time between
them, on a hand-made trace in torch profiler's Chrome format."""

from __future__ import annotations

from benchmarks.moe_layer import timeline_rows


def _kernel(name, ts, dur, corr):
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def _launch(ts, corr, cat="cuda_runtime"):
    return {"cat": cat, "name": "cudaLaunchKernel", "ts": ts, "dur": 3, "args": {"correlation": corr}}


def test_timeline_rows_match_launches_and_measure_idle_time():
    events = [_launch(1000, 1), _kernel("small", 1010, 5, 1),
              _launch(1100, 2, "cuda_driver"), _kernel("triton", 1110, 4, 2),  # a Triton launch (driver API)
              _launch(1120, 3), _kernel("gemm", 1125, 400, 3),
              _launch(1130, 4), _kernel("after", 1525, 10, 4),
              _launch(5000, 5), _kernel("next step", 5010, 10, 5)]  # outside the window
    rows = timeline_rows(events[::-1], 1000, 2000)  # any order in, device order out
    assert [r["name"] for r in rows] == ["small", "triton", "gemm", "after"]
    assert [r["host"] for r in rows] == [0, 100, 120, 130]
    assert [r["start"] for r in rows] == [10, 110, 125, 525]
    assert [r["idle_before"] for r in rows] == [0.0, 95.0, 11.0, 0.0]
