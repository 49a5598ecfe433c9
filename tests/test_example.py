"""The worked example (examples/train_digits.py) in its reduced ``--quick`` form.

It checks what the example claims on a fixed seed, so a change to the library (or to the
example) that breaks training, eval mode or the figures fails here.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

import batchnorm as bn

pytest.importorskip("sklearn", reason="the example needs scikit-learn's bundled digits")
pytest.importorskip("matplotlib", reason="the example draws its figures with matplotlib")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


@pytest.fixture(scope="module", autouse=True)
def numpy_backend_selected():
    """The example computes on NumPy arrays; a session that selects a GPU backend (nox sets
    ``BATCHNORM_BACKEND``) cannot run it, and the backend's own tests cover that backend."""
    requested = os.environ.get("BATCHNORM_BACKEND", "").strip().lower()
    if requested and requested != "auto":
        try:
            backend = bn.get_backend(requested)
        except (ValueError, RuntimeError) as exc:  # reported by the conformance suite
            pytest.skip(f"BATCHNORM_BACKEND={requested} cannot run here: {exc}")
        if not backend.accepts(np.empty(0)):
            pytest.skip(f"BATCHNORM_BACKEND={requested} does not compute on NumPy arrays")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results(example, tmp_path_factory):
    return example.run(quick=True, out=tmp_path_factory.mktemp("train_digits"))


def test_both_networks_learn_and_bn_learns_faster(results):
    for use_bn in (False, True):
        loss = results["convergence"][use_bn]["loss"]
        assert loss[-1] < loss[0] / 3, f"use_bn={use_bn}: loss {loss[0]:.3f} -> {loss[-1]:.3f}"
    with_bn, without = results["convergence"][True], results["convergence"][False]
    assert with_bn["test_acc"][-1] >= 0.9
    assert with_bn["loss"][0] < without["loss"][0]


def test_bn_tolerates_a_large_learning_rate(results, example):
    largest = example.QUICK["learning_rates"].index(max(example.QUICK["learning_rates"]))
    with_bn = results["learning_rates"][True][largest].mean()
    without = results["learning_rates"][False][largest].mean()
    assert with_bn >= 0.9
    assert with_bn > without + 0.2


def test_bn_tolerates_a_small_weight_init(results, example):
    smallest = example.QUICK["init_scales"].index(min(example.QUICK["init_scales"]))
    assert results["init_scales"][True][smallest].mean() >= 0.9


def test_eval_mode_normalizes_with_the_running_statistics(example):
    """Recompute the eval-mode logits by hand from the running statistics."""
    data = example.load_data()
    model, _ = example.train(data, True, lr=0.1, epochs=2, seed=0)
    x_test = data[1][:16]
    h = x_test.astype(np.float64)
    for i, weight in enumerate(model.weights[:-1]):
        z = h @ weight
        invstd = 1 / np.sqrt(model.running_vars[i].astype(np.float64) + 1e-5)
        h = np.maximum(
            (z - model.running_means[i]) * invstd * model.gammas[i] + model.shifts[i], 0
        )
    expected = h @ model.weights[-1] + model.out_bias
    np.testing.assert_allclose(
        model.forward(x_test, training=False), expected, rtol=1e-4, atol=1e-4
    )


def test_running_statistics_track_the_training_data(results, example):
    model = results["train_vs_eval"]["model"]
    x_train = example.load_data()[0]
    pre_activation = x_train @ model.weights[0]
    scale = pre_activation.std(axis=0)
    assert np.all(np.abs(model.running_means[0] - pre_activation.mean(axis=0)) < 0.2 * scale)
    np.testing.assert_allclose(model.running_vars[0], pre_activation.var(axis=0, ddof=1), rtol=0.2)


def test_train_mode_depends_on_the_batch_and_eval_mode_does_not(results):
    tve = results["train_vs_eval"]
    assert tve["eval_is_batch_independent"]
    tiny_batch_acc, _ = tve["by_batch_size"][min(tve["by_batch_size"])]
    assert tiny_batch_acc < tve["eval_acc"] - 0.2


def test_figures_and_summary_are_written(results):
    for path in results["figures"]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    summary = (results["figures"][0].parent / "summary.txt").read_text()
    assert summary == results["summary"]
    assert "learning rate" in summary
