"""The benchmark harness's memory meters (benchmarks/harness.py) measure what a call holds."""

import time

import pytest
import torch

from benchmarks import harness

MIB = 2**20


def _hold(mib: int, seconds: float):
    def run():
        t = torch.ones(mib * MIB // 4)  # float32: every page written
        time.sleep(seconds)             # long against the sampling interval
        del t
    return run


@pytest.mark.skipif(harness._live_bytes_fn() is None, reason="no mallinfo2 in this C library")
def test_live_peak_sees_a_block_held_and_freed_within_the_call():
    live = harness.cpu_live_peak_mib(_hold(64, 0.03))
    assert 64 <= live < 66, live
    assert harness.cpu_live_peak_mib(lambda: None) < 1


@pytest.mark.skipif(harness._live_bytes_fn() is None, reason="no mallinfo2 in this C library")
def test_live_peak_counts_the_result_the_call_returns():
    live = harness.cpu_live_peak_mib(lambda: torch.ones(16 * MIB // 4))
    assert 16 <= live < 18, live


def test_rss_peak_sees_a_block_held_and_freed_within_the_call():
    peak = harness.cpu_peak_mib(_hold(64, 0.0))
    assert 60 <= peak < 70, peak  # pages already resident before the call (~1 MiB) are not new
