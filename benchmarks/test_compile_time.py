"""First call in a fresh process, cold and warm Numba cache (``compile_time.py``)."""

from __future__ import annotations

import compile_time
import pytest

from batchnorm import _bench

_REASONS = _bench.timed_backends()


@pytest.mark.parametrize("state", ["cold", "warm"])
@pytest.mark.parametrize("backend", sorted(_REASONS))
def test_first_call(benchmark, backend, state, tmp_path):
    if _REASONS[backend]:
        pytest.skip(f"backend {backend!r}: {_REASONS[backend]}")
    if not benchmark.enabled and backend != _bench.REFERENCE:
        pytest.skip("a cold run recompiles every kernel: only with --benchmark-enable")
    if state == "warm":
        compile_time.first_call(backend, tmp_path)
    benchmark.group = "first call in a fresh process"
    timings = benchmark.pedantic(compile_time.first_call, args=(backend, tmp_path), rounds=1)
    benchmark.extra_info.update(timings)
    assert set(timings) >= {"import", "forward-train", "backward-train", "total"}
