"""nox sessions: the test suite once per backend, lint, benchmarks, docs, the GPU check.

``nox -l`` lists them; ``nox -s tests`` runs every backend that can run here and skips the
others with the reason; ``nox -s "tests(backend='numba')"`` runs one. Arguments after ``--``
go to pytest (``tests``), ``benchmarks/compare.py`` (``bench``), ``sphinx-build`` (``docs``)
or ``benchmarks/gpu_check.py`` (``gpu``).
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests"]

# The virtualenvs see the interpreter's site-packages, so multi-GB wheels that are already
# installed (torch, the CUDA libraries) are reused instead of downloaded again; the project
# itself and anything missing are still installed into each session with its extras. Tools
# run as ``python -m tool`` so they run on the session's interpreter even when their script
# lives outside the virtualenv.
VENV_PARAMS = ["--system-site-packages"]

#: session backend -> (backend name, extras, environment)
BACKENDS = {
    "numpy": ("numpy", "test", {}),
    "numba": ("numba", "test", {}),
    "cuda-sim": ("cuda", "test,cuda", {"NUMBA_ENABLE_CUDASIM": "1"}),
    "cuda": ("cuda", "test,cuda", {"NUMBA_ENABLE_CUDASIM": "0"}),
    "cupy": ("cupy", "test,cupy", {}),
}

# Prints "ok" when the backend can run, else the reason it cannot.
_AVAILABILITY = """
import sys, batchnorm
info = {i.name: i for i in batchnorm.backend_info()}[sys.argv[1]]
print("ok" if info.available else info.reason)
"""


@nox.session(venv_params=VENV_PARAMS)
@nox.parametrize("backend", list(BACKENDS))
def tests(session: nox.Session, backend: str) -> None:
    """The test suite with one backend: the fixture's and the default for automatic calls.

    ``BATCHNORM_BACKEND`` makes the backend the session-wide choice (tests of the automatic
    selection clear it for themselves); ``--backend`` restricts the ``backend`` fixture.
    """
    name, extras, env = BACKENDS[backend]
    # The plugin tests build tests/example_plugin without build isolation, and the setuptools
    # that venv seeds (65 on Python 3.11) cannot build wheels on its own.
    session.install("-e", f".[{extras}]", "setuptools>=70.1")
    answer = session.run("python", "-c", _AVAILABILITY, name, env=env, silent=True)
    reason = answer.strip().splitlines()[-1]
    if reason != "ok":
        session.skip(f"backend {name!r} cannot run here: {reason}")
    # The suite writes the backends it really exercised to this file (tests/conftest.py): a
    # session whose backend silently never ran must fail, not pass.
    tested = Path(session.create_tmp()) / "tested-backends.txt"
    tested.unlink(missing_ok=True)
    env = {**env, "BATCHNORM_BACKEND": name, "BATCHNORM_TESTED_BACKENDS_FILE": str(tested)}
    session.run("python", "-m", "pytest", "--backend", name, *session.posargs, env=env)
    exercised = tested.read_text().split() if tested.exists() else []
    if name not in exercised:
        session.error(f"backend {name!r} was never exercised (exercised: {exercised or 'none'})")


@nox.session(venv_params=VENV_PARAMS)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff")
    session.run("python", "-m", "ruff", "check", ".")
    session.run("python", "-m", "ruff", "format", "--check", ".")


@nox.session(venv_params=VENV_PARAMS)
def bench(session: nox.Session) -> None:
    """Copy-time ratios against benchmarks/baseline.json (``-- --update`` rewrites it)."""
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/compare.py", *session.posargs)


@nox.session(venv_params=VENV_PARAMS)
def docs(session: nox.Session) -> None:
    """Build the HTML docs; warnings are errors."""
    if not Path("docs/conf.py").exists():
        session.skip("no docs/conf.py")
    session.install("-e", ".[docs]")
    session.run("python", "-m", "sphinx", "-W", "docs", "docs/_build/html", *session.posargs)


@nox.session(venv_params=VENV_PARAMS)
def gpu(session: nox.Session) -> None:
    """benchmarks/gpu_check.py: conformance and benchmarks on a real GPU (``-- OUT_DIR``)."""
    session.install("-e", ".[test,cuda,cupy,bench]")
    args = session.posargs or ["gpu-results"]
    session.run("python", "benchmarks/gpu_check.py", *args)
