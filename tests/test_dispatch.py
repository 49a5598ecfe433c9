"""Backend discovery and selection, tested with a real plugin installed by pip."""

from __future__ import annotations

import asyncio
import importlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import batchnorm as bn
from batchnorm._dispatch import registry

PLUGIN_SOURCE = Path(__file__).parent / "example_plugin"


@pytest.fixture(autouse=True)
def automatic_selection(monkeypatch):
    """These tests set the selection themselves: ignore a BATCHNORM_BACKEND of the session."""
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """pip-install the example plugin into a fresh folder and put it on sys.path."""
    site = tmp_path_factory.mktemp("plugin_site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(PLUGIN_SOURCE),
        ],
        check=True,
        capture_output=True,
    )
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    registry.clear()
    yield site
    sys.path.remove(str(site))
    for name in [m for m in sys.modules if m.startswith("batchnorm_loopback")]:
        del sys.modules[name]
    registry.clear()


@pytest.fixture
def loopback(plugin_site):
    from batchnorm_loopback import LoopbackArray, LoopbackBackend

    LoopbackBackend.calls.clear()
    return LoopbackArray, LoopbackBackend.calls


def test_plugin_discovered_and_broken_plugin_reported(plugin_site):
    infos = {i.name: i for i in bn.backend_info()}
    assert infos["loopback"].available and infos["loopback"].reason is None
    assert not infos["broken"].available
    assert "simulated missing dependency" in infos["broken"].reason
    assert "loopback" in bn.available_backends() and "broken" not in bn.available_backends()
    with pytest.raises(RuntimeError, match="broken.*cannot run here.*simulated missing"):
        bn.get_backend("broken")


def test_plugin_discovered_in_fresh_process(plugin_site):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site), *sys.path])}
    out = subprocess.run(
        [sys.executable, "-c", "import batchnorm as bn; print(bn.available_backends())"],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    assert "'loopback'" in out and "'broken'" not in out


def test_auto_selects_by_array_type(loopback):
    LoopbackArray, calls = loopback
    x = np.random.default_rng(0).standard_normal((6, 3)).view(LoopbackArray)
    y, mean, invstd = bn.forward(x)
    assert calls["channel_stats"] == 1 and calls["normalize"] == 1
    assert isinstance(y, LoopbackArray)
    y_ref, _, _ = bn.forward(np.asarray(x), backend="numpy")
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-12)
    bn.forward(np.asarray(x))  # a plain ndarray never goes to loopback
    assert calls["channel_stats"] == 1


def test_precedence_argument_context_environment(loopback, monkeypatch):
    LoopbackArray, calls = loopback
    x = np.arange(8.0).reshape(4, 2).view(LoopbackArray)
    bn.forward(x)  # auto: loopback has the highest priority for its array type
    assert calls["normalize"] == 1
    monkeypatch.setenv("BATCHNORM_BACKEND", "numpy")
    bn.forward(x)  # environment beats auto (numpy accepts ndarray subclasses)
    assert calls["normalize"] == 1
    with bn.use_backend("loopback"):
        bn.forward(x)  # context beats environment
        assert calls["normalize"] == 2
        bn.forward(x, backend="numpy")  # argument beats context
        assert calls["normalize"] == 2
        with pytest.raises(TypeError, match="backend 'loopback' cannot operate on.*ndarray"):
            bn.forward(np.asarray(x))  # an explicit choice never falls back


def test_environment_variable_is_read_per_call(monkeypatch):
    monkeypatch.setenv("BATCHNORM_BACKEND", "numpy")
    assert bn.get_backend().name == "numpy"
    monkeypatch.setenv("BATCHNORM_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="unknown batchnorm backend 'no-such-backend'.*numpy"):
        bn.forward(np.ones((4, 2)))
    monkeypatch.setenv("BATCHNORM_BACKEND", "auto")
    assert bn.get_backend().name == bn.available_backends()[0]


def test_unknown_backend_lists_known_ones():
    with pytest.raises(ValueError, match="known backends: .*numpy"):
        bn.forward(np.ones((4, 2)), backend="nope")
    with pytest.raises(ValueError, match="unknown"):
        with bn.use_backend("nope"):
            pass


def test_non_array_input_is_a_type_error():
    with pytest.raises(TypeError, match="no available batchnorm backend accepts.*list"):
        bn.forward([[1.0, 2.0], [3.0, 4.0]])


def test_mixed_array_kinds_are_a_type_error(loopback):
    LoopbackArray, _ = loopback
    x = np.arange(6.0).reshape(3, 2).view(LoopbackArray)
    with pytest.raises(TypeError, match="weight is a numpy.ndarray.*'loopback'"):
        bn.forward(x, weight=np.ones(2))


def test_use_backend_is_thread_local():
    seen = {}
    barrier = threading.Barrier(2)

    def worker(name):
        with bn.use_backend(name):
            barrier.wait()
            seen[name] = bn.get_backend().name

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("numpy", "auto")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"numpy": "numpy", "auto": bn.available_backends()[0]}


def test_use_backend_is_task_local():
    async def task(name, ready, go):
        with bn.use_backend(name):
            ready.set()
            await go.wait()
            return bn.get_backend().name

    async def main():
        go = asyncio.Event()
        r1, r2 = asyncio.Event(), asyncio.Event()
        t1 = asyncio.create_task(task("numpy", r1, go))
        t2 = asyncio.create_task(task("auto", r2, go))
        await r1.wait()
        await r2.wait()
        go.set()
        return await t1, await t2

    assert asyncio.run(main()) == ("numpy", bn.available_backends()[0])


def test_backend_info_lists_builtin_backends():
    names = {i.name for i in bn.backend_info()}
    assert {"numpy", "numba", "cuda", "cupy"} <= names
    numpy_info = next(i for i in bn.backend_info() if i.name == "numpy")
    assert numpy_info.available and numpy_info.version == np.__version__
