"""Every backend next to its peers, one pytest-benchmark group per (operation, shape, dtype).

Run with ``pytest benchmarks --benchmark-enable`` (add ``--benchmark-json FILE`` to keep the
ratios, which land in each benchmark's ``extra_info``). With benchmarks disabled (the default
from pyproject) each case runs once, which keeps the suite from rotting.
"""

from __future__ import annotations

import pytest

from batchnorm import _bench

#: A single call slower than this gets a fixed, small number of rounds (the NumPy
#: reference on the big shapes takes most of a second).
SLOW_CALL_SECONDS = 0.05
SLOW_ROUNDS = 3

_REASONS = _bench.timed_backends()
_AVAILABLE = [name for name, reason in _REASONS.items() if reason is None]


def _params():
    subjects = sorted(_REASONS) + _bench.peer_subjects(_AVAILABLE)
    params = []
    for case in _bench.all_cases():
        for subject in subjects:
            reason = _REASONS.get(subject)
            marks = [pytest.mark.skip(reason=f"backend {subject!r}: {reason}")] if reason else []
            params.append(pytest.param(case, subject, id=f"{case.group}|{subject}", marks=marks))
    return params


@pytest.mark.parametrize(("case", "subject"), _params())
def test_batchnorm(benchmark, record_benchmark, case, subject):
    try:
        runner = _bench.make_runner(subject, case)
    except _bench.Unsupported as exc:
        pytest.skip(str(exc))
    benchmark.group = case.group
    benchmark.extra_info.update(
        subject=subject, device=runner.device, traffic_bytes=case.traffic_bytes
    )
    if (
        benchmark.enabled
        and _bench.best_times({subject: runner}, rounds=1)[subject] > SLOW_CALL_SECONDS
    ):
        benchmark.pedantic(runner.call, rounds=SLOW_ROUNDS, warmup_rounds=0)
    else:
        benchmark(runner.call)
    record_benchmark(case, subject, runner.device, benchmark)
