"""The reference backend against PyTorch: same numbers, same running-statistics convention."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.testing import assert_close

torch = pytest.importorskip("torch", reason="torch is not installed (extra 'bench')")
F = torch.nn.functional


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 2, 3)], ids=str)
def test_matches_torch(shape, training):
    rng = np.random.default_rng(0)
    c = shape[1]
    x = rng.standard_normal(shape) * 2 + 1
    w, b = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    rm, rv = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    dy = rng.standard_normal(shape)

    tx = torch.tensor(x, requires_grad=True)
    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    ty = F.batch_norm(tx, trm, trv, tw, tb, training=training, momentum=0.2, eps=1e-3)
    ty.backward(torch.tensor(dy))

    y = bn.batch_norm(x, rm, rv, w, b, training, 0.2, 1e-3, backend="numpy")
    assert_close(y, ty.detach().numpy(), np.float64, "y")
    assert_close(rm, trm.numpy(), np.float64, "running_mean")
    assert_close(rv, trv.numpy(), np.float64, "running_var")

    # batch statistics in training; in eval rm/rv were not updated, so these are theirs
    _, mean, invstd = bn.forward(
        x, w, b, rm.copy(), rv.copy(), training=training, momentum=0.2, eps=1e-3, backend="numpy"
    )
    dx, dw, db = bn.backward(dy, x, w, mean, invstd, training=training, backend="numpy")
    assert_close(dx, tx.grad.numpy(), np.float64, "dx")
    assert_close(dw, tw.grad.numpy(), np.float64, "dweight")
    assert_close(db, tb.grad.numpy(), np.float64, "dbias")
