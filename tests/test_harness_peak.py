"""The benchmark harness times the GEMM peak in each group's own rounds, and bounds a slow group's
rounds (benchmarks/harness.py)."""

import torch

from benchmarks import harness


def _case(flops: float) -> harness.Case:
    def inputs(device, dtype, grad):
        return {"a": torch.randn(64, 64, dtype=dtype)}

    return harness.Case("tiny", {}, inputs, flops=flops)


def _provider() -> harness.Provider:
    return harness.Provider("eager", lambda inputs: inputs["a"] @ inputs["a"], "eager")


def test_a_gemm_bound_case_gets_the_peak_timed_in_its_rounds():
    cpu = torch.device("cpu")
    (m,) = harness.measure_group("mm", _case(2 * 64**3), [_provider()], "float32", "forward",
                                 cpu, quick=True)
    assert m.gflops is not None and m.gemm_peak_gflops is not None
    # the square GEMM of the peak (1024 in quick runs) is timed again, not copied from the start
    assert m.gemm_peak_gflops != harness.gemm_peak_gflops(cpu, "float32", quick=True)


def test_a_case_without_flops_gets_no_peak():
    (m,) = harness.measure_group("mm", _case(0.0), [_provider()], "float32", "forward",
                                 torch.device("cpu"), quick=True)
    assert m.gflops is None and m.gemm_peak_gflops is None


def _rounds(monkeypatch, group_seconds: float) -> int:
    calls = []
    monkeypatch.setattr(harness, "_samples", lambda fn, device, budget: calls.append(fn) or [1.0])
    monkeypatch.setattr(harness, "_GROUP_SECONDS", group_seconds)
    harness.measure_group("mm", _case(0.0), [_provider()], "float32", "forward",
                          torch.device("cpu"), quick=False)
    return len(calls)


def test_a_slow_group_stops_after_its_minimum_of_rounds(monkeypatch):
    """Seven interleaved rounds, unless the group has run past _GROUP_SECONDS: then none after
    the third (providers of many seconds a call)."""
    assert _rounds(monkeypatch, 1e9) == 7
    assert _rounds(monkeypatch, 0.0) == harness._MIN_ROUNDS == 3
