"""The command line: `python -m batchnorm info` and `check`."""

from __future__ import annotations

import subprocess
import sys

import pytest
from batchnorm_numpy import NumpyBackend

import batchnorm as bn
from batchnorm.__main__ import main
from batchnorm._dispatch import registry


def test_info_lists_every_backend():
    out = subprocess.run(
        [sys.executable, "-m", "batchnorm", "info"], check=True, capture_output=True, text=True
    ).stdout
    for name in ("numpy", "numba", "cuda", "cupy"):
        assert f"  {name}" in out
    assert "numpy" in out and "available" in out


def test_check_passes_for_available_backends():
    proc = subprocess.run(
        [sys.executable, "-m", "batchnorm", "check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "numpy" in proc.stdout and "pass" in proc.stdout and "FAIL" not in proc.stdout


class FaultyBackend(NumpyBackend):
    """Off by 1e-3 in every output: `check` must notice."""

    name = "faulty"

    def normalize(self, x3, mean, invstd, weight, bias, out3):
        super().normalize(x3, mean, invstd, weight, bias, out3)
        out3 += 1e-3


@pytest.fixture
def faulty_registered(monkeypatch):
    registry.names()
    monkeypatch.setitem(registry._entry_points, "faulty", None)
    monkeypatch.setitem(registry._loaded, "faulty", (FaultyBackend(), None))
    monkeypatch.setattr(registry, "plans", {})


def test_check_fails_on_a_wrong_backend(faulty_registered, capsys):
    assert main(["check", "--backend", "faulty"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_check_fails_when_asked_for_an_unavailable_backend(capsys):
    unavailable = [i.name for i in bn.backend_info() if not i.available]
    if not unavailable:
        pytest.skip("every registered backend can run here")
    assert main(["check", "--backend", unavailable[0]]) == 1
    assert "skipped" in capsys.readouterr().out
