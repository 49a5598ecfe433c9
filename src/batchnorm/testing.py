"""Helpers for testing backends against the reference: the one place tolerances live.

Plugin authors use these (and the project's conformance suite) to check their backend.
"""

from __future__ import annotations

import numpy as np

#: Relative and absolute tolerance per input dtype, for results compared with the float64
#: reference. float16 outputs are rounded to 11 significant bits, so they get ~2 ulp of
#: float16; float32 results accumulate over up to millions of values, so a few hundred ulp.
TOLERANCES: dict[np.dtype, dict[str, float]] = {
    np.dtype(np.float16): {"rtol": 2e-3, "atol": 2e-3},
    np.dtype(np.float32): {"rtol": 1e-4, "atol": 1e-5},
    np.dtype(np.float64): {"rtol": 1e-10, "atol": 1e-12},
}


def tolerance(dtype) -> dict[str, float]:
    """``{"rtol": ..., "atol": ...}`` for comparing results of inputs of ``dtype``.

    Examples
    --------
    >>> from batchnorm.testing import tolerance
    >>> tolerance("float32")["rtol"]
    0.0001
    """
    return TOLERANCES[np.dtype(dtype)]


def max_error(actual, expected, dtype) -> float:
    """Largest error of ``actual`` in units of the tolerance for ``dtype`` (<= 1 passes).

    The error of each element is ``|a - e| / (atol + rtol * |e|)``, the quantity
    :func:`numpy.testing.assert_allclose` compares with 1.

    Examples
    --------
    >>> import numpy as np
    >>> from batchnorm.testing import max_error
    >>> max_error(np.array([1.0]), np.array([1.0]), "float64")
    0.0
    """
    tol = tolerance(dtype)
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {actual.shape} vs {expected.shape}")
    if actual.size == 0:
        return 0.0
    both_nan = np.isnan(actual) & np.isnan(expected)
    err = np.abs(actual - expected) / (tol["atol"] + tol["rtol"] * np.abs(expected))
    err = np.where(both_nan, 0.0, err)
    return float(np.nan_to_num(err, nan=np.inf).max())


def assert_close(actual, expected, dtype, what: str = "result") -> None:
    """Assert ``actual`` matches ``expected`` within the tolerance for ``dtype``.

    Raises
    ------
    AssertionError
        When :func:`max_error` exceeds 1; the message gives the error in tolerance units.

    Examples
    --------
    >>> import numpy as np
    >>> from batchnorm.testing import assert_close
    >>> assert_close(np.float32([1.00001]), np.float64([1.0]), "float32")
    >>> assert_close(np.float32([1.01]), np.float64([1.0]), "float32")
    Traceback (most recent call last):
    ...
    AssertionError: result: max error 90.9 x tolerance {'rtol': 0.0001, 'atol': 1e-05} for float32
    """
    err = max_error(actual, expected, dtype)
    if not err <= 1.0:
        raise AssertionError(
            f"{what}: max error {err:.3g} x tolerance {tolerance(dtype)} for {np.dtype(dtype)}"
        )
