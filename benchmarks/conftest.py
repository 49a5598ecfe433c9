"""Collects every benchmark's best time, then turns them into ratios within each group.

pytest-benchmark times each test on its own; the figures that can be compared across
machines (multiple of the copy time, speedup over PyTorch and over the reference) need the
peers of the same group, so they are computed once the session ends, written into each
benchmark's ``extra_info`` before pytest-benchmark saves its JSON, and printed as a table.
"""

from __future__ import annotations

import pytest

from batchnorm import _bench

# case -> subject -> (device, benchmark fixture)
_RECORDED: dict[_bench.Case, dict[str, tuple[str, object]]] = {}


@pytest.fixture
def record_benchmark():
    """Call with ``(case, subject, device, benchmark)`` after the benchmark has run."""

    def record(case, subject, device, benchmark):
        if benchmark.enabled:
            _RECORDED.setdefault(case, {})[subject] = (device, benchmark)

    return record


def _figures() -> dict[_bench.Case, dict[str, _bench.Figures]]:
    results = {}
    for case, by_subject in _RECORDED.items():
        times = {s: bench.stats.stats.min for s, (_, bench) in by_subject.items()}
        devices = {s: device for s, (device, _) in by_subject.items()}
        results[case] = _bench.figures(case, times, devices)
    return results


# A wrapper that runs before pytest-benchmark's own, which saves the JSON.
@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    for case, by_subject in _figures().items():
        for subject, fig in by_subject.items():
            _RECORDED[case][subject][1].extra_info.update(fig.as_dict())
    yield


def pytest_terminal_summary(terminalreporter):
    results = _figures()
    if results:
        terminalreporter.write_sep(
            "=", "batchnorm ratios (x copy: lower is better; vs torch / vs ref: speedup)"
        )
        terminalreporter.write_line(_bench.format_table(results))
