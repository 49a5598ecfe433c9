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


#: Ill-conditioned data cost accuracy that no tolerance per dtype can hold: where a
#: channel's mean is ``condition`` times its standard deviation, every result that depends
#: on the batch statistics loses about ``condition * eps``, in two places. The float64
#: accumulation: the sum of the values is rounded at ``eps * |mean|``, and more for longer
#: sums (on the random inputs of tests/test_random_inputs.py the numba backend's means were
#: off by up to 14 ``eps * mean(|x|)``, about ``0.15 * sqrt(n)`` for n values per channel;
#: the reference's, a corrected two-pass, by 1.1). And, for float16 and float32 input, the
#: float32 mean returned: dx is computed from it (in every backend), and so is y in PyTorch,
#: which moves them by up to ``condition * eps(float32)`` (the backends normalize y with the
#: unrounded mean, see the docs' Numerics page).
#: :func:`tolerance` widens each tolerance to
#: ``condition * (CONDITION_SLACK * eps(float64) + 2 * eps(dtype of mean))`` where that is
#: larger: a CONDITION_SLACK of 128 covers ``0.15 * sqrt(n)`` up to n = 700,000.
CONDITION_SLACK = 128.0


def condition_number(mean, invstd) -> float:
    """How ill-conditioned the batch statistics are: the largest ``|mean| * invstd``
    (the mean in units of the standard deviation) over the channels, and at least 1.

    Parameters
    ----------
    mean, invstd : array_like
        Per-channel mean and inverse standard deviation, as :func:`batchnorm.forward`
        returns them in training. Channels where either is not finite are ignored.

    Returns
    -------
    float
        The condition number to pass to :func:`tolerance`, :func:`max_error` or
        :func:`assert_close`.

    Examples
    --------
    >>> import numpy as np
    >>> from batchnorm.testing import condition_number
    >>> condition_number(np.array([1e4, 0.0]), np.array([100.0, 1.0]))
    1000000.0
    """
    ratio = np.abs(np.asarray(mean, np.float64)) * np.asarray(invstd, np.float64)
    ratio = ratio[np.isfinite(ratio)]
    return float(max(1.0, ratio.max(initial=1.0)))


def tolerance(dtype, condition: float = 1.0) -> dict[str, float]:
    """``{"rtol": ..., "atol": ...}`` for comparing results of inputs of ``dtype``.

    Parameters
    ----------
    dtype : dtype-like
        dtype of the input x.
    condition : float, optional
        Condition number of the inputs (see :func:`condition_number`); each tolerance
        is at least ``condition * (CONDITION_SLACK * eps(float64) + 2 * eps(stat))``,
        where ``stat`` is the dtype of the returned mean (float64 for float64 input,
        float32 otherwise). See :data:`CONDITION_SLACK`.

    Examples
    --------
    >>> from batchnorm.testing import tolerance
    >>> tolerance("float32")["rtol"]
    0.0001
    >>> tolerance("float64", condition=1e6)["rtol"] > tolerance("float64")["rtol"]
    True
    """
    dtype = np.dtype(dtype)
    tol = TOLERANCES[dtype]
    if condition == 1.0:
        return tol
    stat_eps = float(np.finfo(np.float64 if dtype == np.float64 else np.float32).eps)
    floor = condition * (CONDITION_SLACK * float(np.finfo(np.float64).eps) + 2 * stat_eps)
    return {key: max(value, floor) for key, value in tol.items()}


def max_error(actual, expected, dtype, condition: float = 1.0) -> float:
    """Largest error of ``actual`` in units of the tolerance for ``dtype`` (<= 1 passes).

    The error of each element is ``|a - e| / (atol + rtol * |e|)``, the quantity
    :func:`numpy.testing.assert_allclose` compares with 1, with the tolerance of
    :func:`tolerance` for ``dtype`` and ``condition``. NaN matches NaN, and an infinity
    the same infinity.

    Examples
    --------
    >>> import numpy as np
    >>> from batchnorm.testing import max_error
    >>> max_error(np.array([1.0]), np.array([1.0]), "float64")
    0.0
    """
    tol = tolerance(dtype, condition)
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {actual.shape} vs {expected.shape}")
    if actual.size == 0:
        return 0.0
    same = (actual == expected) | (np.isnan(actual) & np.isnan(expected))  # inf, NaN
    with np.errstate(invalid="ignore"):  # inf - inf, where same already holds
        err = np.abs(actual - expected) / (tol["atol"] + tol["rtol"] * np.abs(expected))
    err = np.where(same, 0.0, err)
    return float(np.nan_to_num(err, nan=np.inf).max())


def assert_close(actual, expected, dtype, what: str = "result", condition: float = 1.0) -> None:
    """Assert ``actual`` matches ``expected`` within the tolerance for ``dtype`` (and
    ``condition``, see :func:`tolerance`).

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
    err = max_error(actual, expected, dtype, condition)
    if not err <= 1.0:
        raise AssertionError(
            f"{what}: max error {err:.3g} x tolerance {tolerance(dtype, condition)} "
            f"for {np.dtype(dtype)}"
        )
