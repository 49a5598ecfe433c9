"""The `backend` fixture: every registered backend, skipped with its reason where it can't run.

Select a subset with ``pytest --backend numba,numpy`` or ``BATCHNORM_BACKEND=numba``.
The session ends by printing which backends were exercised (and writes them, one per line, to
the file named by ``BATCHNORM_TESTED_BACKENDS_FILE`` so nox can fail a session whose backend
never ran).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest

import batchnorm as bn

_EXERCISED: set[str] = set()


def pytest_addoption(parser):
    parser.addoption(
        "--backend",
        default=None,
        help="comma-separated backend names to test (default: all registered, or "
        "BATCHNORM_BACKEND)",
    )


def _selected_names(config) -> list[str]:
    registered = [info.name for info in bn.backend_info()]
    wanted = config.getoption("--backend") or os.environ.get("BATCHNORM_BACKEND", "")
    wanted = [w.strip().lower() for w in wanted.split(",") if w.strip()]
    if not wanted or wanted == ["auto"]:
        return registered
    unknown = sorted(set(wanted) - set(registered))
    if unknown:
        raise pytest.UsageError(f"unknown backend(s) {unknown}; registered: {registered}")
    return wanted


def _simulated(name: str) -> bool:
    """The CUDA simulator runs kernels in Python: tests keep shapes tiny there."""
    return name == "cuda" and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


@dataclass
class BackendCase:
    """One backend under test, with explicit host <-> backend transfers."""

    name: str
    backend: bn.Backend
    simulated: bool

    def put(self, array):
        """A NumPy array as this backend's array type (None passes through)."""
        return None if array is None else self.backend.from_host(np.asarray(array))

    def get(self, array):
        """A result of this backend as a NumPy array (None passes through)."""
        return None if array is None else self.backend.to_host(array)


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    infos = {info.name: info for info in bn.backend_info()}
    params = []
    for name in _selected_names(metafunc.config):
        info = infos[name]
        marks = [] if info.available else [pytest.mark.skip(reason=f"{name}: {info.reason}")]
        params.append(pytest.param(name, marks=marks, id=name))
    metafunc.parametrize("backend", params, indirect=True)


@pytest.fixture
def backend(request):
    name = request.param
    case = BackendCase(name, bn.get_backend(name), _simulated(name))
    yield case
    if getattr(request.node, "rep_call_passed", False):
        _EXERCISED.add(name)


@pytest.fixture
def large_mean_case():
    """Factory of ``(x, weight, bias, running, check)`` for a shape and channel axis with 16
    channels: float32 values near 1e4 with a spread of 1, where the mean rounded to float32
    is off by up to 5e-4 of a standard deviation. ``running`` holds the batch's own float64
    mean and variance; ``check(y, what)`` asserts that y (host, x's shape) is within a few
    float32 roundings of the normalization computed in long double, with either."""

    def make(shape, axis):
        rng = np.random.default_rng(8)
        x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
        w = rng.uniform(0.5, 1.5, 16).astype(np.float32)
        b = rng.standard_normal(16).astype(np.float32)
        values = np.moveaxis(x, axis, -1).reshape(-1, 16).astype(np.longdouble)
        mean = values.mean(0)
        var = np.square(values - mean).mean(0)
        expected = (values - mean) / np.sqrt(var + 1e-5) * w + b

        def check(y, what):
            got = np.moveaxis(y, axis, -1).reshape(-1, 16)
            error = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
            # A few float32 roundings of y's own terms (eps 1.2e-7), not 1e4 of them.
            assert error < 8 * np.finfo(np.float32).eps, f"{what}: {error:.2e}"

        return x, w, b, (mean.astype(np.float64), var.astype(np.float64)), check

    return make


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.rep_call_passed = report.passed
    return report


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker: its controller prints the summary
        workeroutput["batchnorm_exercised"] = sorted(_EXERCISED)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: only called with -n
def pytest_testnodedown(node, error):
    _EXERCISED.update(getattr(node, "workeroutput", {}).get("batchnorm_exercised", ()))


def pytest_terminal_summary(terminalreporter):
    names = sorted(_EXERCISED)
    terminalreporter.write_sep(
        "=", "batchnorm backends exercised: " + (", ".join(names) or "none")
    )
    path = os.environ.get("BATCHNORM_TESTED_BACKENDS_FILE")
    if path:
        with open(path, "w") as fh:
            fh.writelines(f"{n}\n" for n in names)
