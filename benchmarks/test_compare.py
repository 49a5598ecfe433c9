"""The regression check: its comparison logic, and that it catches a really slowed kernel."""

from __future__ import annotations

import json

import compare
import numba
import pytest

import batchnorm as bn
from batchnorm import _bench
from batchnorm._dispatch import registry


def test_compare_sorts_ratios_by_tolerance():
    baseline = {"a": 1.0, "b": 2.0, "c": 3.0, "gone": 1.0}
    current = {"a": 1.49, "b": 3.02, "c": 1.0, "added": 5.0}
    verdict = compare.compare(baseline, current, tolerance=0.5)
    assert verdict == {"regressed": ["b"], "ok": ["a", "c"], "missing": ["gone"], "new": ["added"]}


def test_slowed_down_repeats_the_work():
    calls = []
    slow = compare.slowed_down(lambda value: calls.append(value) or value, repeat=3)
    assert slow(7) == 7
    assert calls == [7, 7, 7]


def _fastest_backend() -> str:
    reasons = _bench.timed_backends()
    return next(n for n in bn.available_backends() if reasons[n] is None)


@pytest.fixture
def compare_threads():
    """Numba (and so PyTorch) threads as compare.py sets them, restored afterwards."""
    before = numba.get_num_threads()
    numba.set_num_threads(compare.THREADS)
    yield
    numba.set_num_threads(before)


def test_check_catches_a_slowed_kernel(monkeypatch, compare_threads):
    # forward-eval on a 25 MB array is one normalize pass (Backend.forward_eval) plus a fixed
    # per-call overhead, so doing it three times roughly triples the ratio: far beyond the
    # tolerance even with the noise of a shared machine. (On small arrays the overhead would
    # dominate.)
    name = _fastest_backend()
    cases = _bench.all_cases(["nchw"], ["forward-eval"], ["float32"])
    baseline = compare.measure_ratios([name], cases)
    backend = bn.get_backend(name)
    for method in ("forward_eval", "plan_forward_eval"):  # restored after the test
        monkeypatch.setattr(backend, method, getattr(backend, method))
    monkeypatch.setattr(registry, "plans", {})
    compare.inject_slowdown(backend, "forward_eval", repeat=3)
    current, verdict = compare.check(baseline, [name], cases)
    assert verdict["regressed"] == [compare.key(name, cases[0])], (baseline, current)


def test_baseline_matches_the_benchmark_matrix():
    if not compare.BASELINE.exists():
        pytest.skip("no benchmarks/baseline.json committed yet")
    document = json.loads(compare.BASELINE.read_text())
    names = [info.name for info in bn.backend_info()]
    known = {compare.key(name, case) for case in _bench.all_cases() for name in names}
    assert set(document["ratios"]) <= known
    assert all(ratio > 0 for ratio in document["ratios"].values())
    assert document["settings"] == {
        "threads": compare.THREADS,
        "clock": "cpu",
        "rounds": compare.ROUNDS,
    }
