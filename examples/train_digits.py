"""Train a small MLP on scikit-learn's 8x8 digits, with and without batch normalization.

Everything is NumPy: the dense layers, ReLU, softmax cross-entropy and SGD are written out
below; the batch-norm layers call :func:`batchnorm.forward` and :func:`batchnorm.backward`.
The digits ship inside scikit-learn, so nothing is downloaded.

Four experiments test what batch normalization is claimed to do:

1. convergence: training loss and test accuracy per epoch at one learning rate;
2. learning rates: final test accuracy over a sweep of learning rates;
3. initialization: final test accuracy when every weight is scaled by a factor at init;
4. train vs eval: batch statistics (training mode) against running statistics (eval mode).

Run ``python examples/train_digits.py --out DIR`` to write the figures and ``summary.txt``
into DIR (about half a minute on two cores), or add ``--quick`` for a reduced run.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

import batchnorm as bn

DTYPE = np.float32
HIDDEN = (64, 64)
BATCH_SIZE = 64
MOMENTUM = 0.1  # batch-norm running statistics, PyTorch's convention

FULL = {
    "epochs": 20,
    "seeds": (0, 1, 2),
    "base_lr": 0.1,
    "learning_rates": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
    "init_scales": (0.1, 0.3, 1.0, 3.0, 10.0),
    "eval_batch_sizes": (2, 4, 8, 16, 32, 64, 128),
}
QUICK = {
    "epochs": 4,
    "seeds": (0,),
    "base_lr": 0.1,
    "learning_rates": (0.1, 3.0),
    "init_scales": (0.1, 1.0),
    "eval_batch_sizes": (2, 64),
}


def load_data(seed: int = 0):
    """Digits scaled to [0, 1], split 80/20 with every class in proportion."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(DTYPE)
    return train_test_split(
        x, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )


class MLP:
    """Dense -> [batch norm] -> ReLU, repeated, then a dense softmax classifier.

    With batch norm a hidden layer has no bias of its own: the norm's ``bias`` (beta)
    replaces it, as in every framework.
    """

    def __init__(self, sizes, use_bn: bool, init_scale: float, rng: np.random.Generator):
        self.use_bn = use_bn
        # He initialisation times init_scale: 1 keeps activations O(1) through ReLU layers.
        self.weights = [
            (rng.standard_normal((n_in, n_out)) * init_scale * np.sqrt(2 / n_in)).astype(DTYPE)
            for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
        ]
        hidden = sizes[1:-1]
        if use_bn:
            self.shifts = [np.zeros(n, DTYPE) for n in hidden]  # beta
            self.gammas = [np.ones(n, DTYPE) for n in hidden]
            self.running_means = [np.zeros(n, DTYPE) for n in hidden]
            self.running_vars = [np.ones(n, DTYPE) for n in hidden]
        else:
            self.shifts = [np.zeros(n, DTYPE) for n in hidden]  # dense bias
            self.gammas = []
        self.out_bias = np.zeros(sizes[-1], DTYPE)
        self._cache = []

    def parameters(self):
        return [*self.weights, *self.shifts, *self.gammas, self.out_bias]

    def forward(self, x, training: bool, track_running: bool = True):
        """Logits for ``x``.

        ``training`` normalizes with the batch statistics (updating the running ones when
        ``track_running``); otherwise with the running statistics.
        """
        self._cache = []
        h = x
        for i, w in enumerate(self.weights[:-1]):
            z = h @ w
            mean = invstd = None
            if self.use_bn:
                untracked = training and not track_running
                a, mean, invstd = bn.forward(
                    z,
                    self.gammas[i],
                    self.shifts[i],
                    None if untracked else self.running_means[i],
                    None if untracked else self.running_vars[i],
                    training=training,
                    momentum=MOMENTUM,
                )
            else:
                a = z + self.shifts[i]
            self._cache.append((h, z, a, mean, invstd))
            h = np.maximum(a, 0)
        self._last_hidden = h
        return h @ self.weights[-1] + self.out_bias

    def backward(self, dlogits):
        """Gradients in the order of :meth:`parameters` (after a training forward)."""
        n_hidden = len(self.weights) - 1
        dweights = [None] * len(self.weights)
        dshifts, dgammas = [None] * n_hidden, [None] * n_hidden
        dweights[-1] = self._last_hidden.T @ dlogits
        dout_bias = dlogits.sum(axis=0)
        dh = dlogits @ self.weights[-1].T
        for i in reversed(range(n_hidden)):
            h, z, a, mean, invstd = self._cache[i]
            da = dh * (a > 0)
            if self.use_bn:
                dz, dgammas[i], dshifts[i] = bn.backward(da, z, self.gammas[i], mean, invstd)
            else:
                dz, dshifts[i] = da, da.sum(axis=0)
            dweights[i] = h.T @ dz
            dh = dz @ self.weights[i].T
        return [*dweights, *dshifts, *(dgammas if self.use_bn else []), dout_bias]


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    loss = -log_probs[rows, labels].mean()
    dlogits = np.exp(log_probs)
    dlogits[rows, labels] -= 1
    return float(loss), dlogits / len(labels)


def accuracy(model: MLP, x, labels, training: bool = False) -> float:
    logits = model.forward(x, training=training, track_running=False)
    return float((logits.argmax(axis=1) == labels).mean())


def train(data, use_bn: bool, lr: float, epochs: int, seed: int, init_scale: float = 1.0):
    """Train with plain mini-batch SGD; return the model and its per-epoch history.

    A run whose loss stops being finite is recorded as diverged and stopped; its accuracy
    is that of the last (broken) model, which predicts a single class.
    """
    x_train, x_test, y_train, y_test = data
    rng = np.random.default_rng(seed)
    model = MLP((x_train.shape[1], *HIDDEN, 10), use_bn, init_scale, rng)
    history = {"loss": [], "test_acc": [], "test_acc_batch_stats": [], "diverged": False}
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for _ in range(epochs):
            order = rng.permutation(len(x_train))
            losses = []
            # Drop the last partial batch: a batch of 1 has no batch statistics.
            for start in range(0, len(order) - BATCH_SIZE + 1, BATCH_SIZE):
                batch = order[start : start + BATCH_SIZE]
                loss, dlogits = cross_entropy(
                    model.forward(x_train[batch], training=True), y_train[batch]
                )
                losses.append(loss)
                if not np.isfinite(loss):
                    history["diverged"] = True
                    break
                for param, grad in zip(model.parameters(), model.backward(dlogits), strict=True):
                    param -= DTYPE(lr) * grad
            history["loss"].append(float(np.mean(losses)))
            history["test_acc"].append(accuracy(model, x_test, y_test))
            if use_bn:
                history["test_acc_batch_stats"].append(
                    accuracy(model, x_test, y_test, training=True)
                )
            if history["diverged"]:
                break
    return model, history


def final_accuracy(history) -> float:
    return history["test_acc"][-1]


class Runs:
    """Training runs, memoised: the experiments share their baseline (base learning rate,
    init scale 1), so each (batch norm or not, seed) baseline is trained once."""

    def __init__(self, data, epochs: int):
        self.data, self.epochs, self._done = data, epochs, {}

    def get(self, use_bn: bool, seed: int, lr: float, init_scale: float = 1.0):
        key = (use_bn, seed, lr, init_scale)
        if key not in self._done:
            self._done[key] = train(self.data, use_bn, lr, self.epochs, seed, init_scale)
        return self._done[key]


def run_convergence(runs: Runs, cfg):
    curves = {}
    for use_bn in (False, True):
        histories = [runs.get(use_bn, seed, cfg["base_lr"])[1] for seed in cfg["seeds"]]
        curves[use_bn] = {
            key: np.mean([h[key] for h in histories], axis=0) for key in ("loss", "test_acc")
        }
    return curves


def run_sweep(cfg, values, make_run):
    """Final test accuracy per value of a setting: {use_bn: array (values, seeds)}."""
    return {
        use_bn: np.array(
            [
                [final_accuracy(make_run(use_bn, value, seed)[1]) for seed in cfg["seeds"]]
                for value in values
            ]
        )
        for use_bn in (False, True)
    }


def run_train_vs_eval(runs: Runs, cfg):
    """A BN model's test accuracy with running statistics and with batch statistics."""
    x_train, x_test, y_train, y_test = runs.data
    model, history = runs.get(True, cfg["seeds"][0], cfg["base_lr"])
    rng = np.random.default_rng(0)
    by_batch_size = {}
    for size in cfg["eval_batch_sizes"]:
        accs = []
        for _ in range(5):  # different random batchings of the test set
            order = rng.permutation(len(x_test))
            usable = len(order) - len(order) % size
            correct = 0
            for start in range(0, usable, size):
                idx = order[start : start + size]
                logits = model.forward(x_test[idx], training=True, track_running=False)
                correct += int((logits.argmax(axis=1) == y_test[idx]).sum())
            accs.append(correct / usable)
        by_batch_size[size] = (float(np.mean(accs)), float(np.std(accs)))
    single = model.forward(x_test[:1], training=False)
    in_batch = model.forward(x_test, training=False)[:1]
    return {
        "eval_acc": accuracy(model, x_test, y_test),
        "by_batch_size": by_batch_size,
        "history": history,
        "eval_is_batch_independent": bool(np.allclose(single, in_batch, rtol=1e-5, atol=1e-5)),
        "model": model,
    }


def plot_all(results, cfg, out: Path) -> list[Path]:
    """One PNG per experiment; matplotlib's object API, so no GUI backend is involved."""
    from matplotlib.figure import Figure

    labels = {False: "no batch norm", True: "batch norm"}
    colors = {False: "tab:orange", True: "tab:blue"}
    paths = []

    def save(fig, name):
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=80)
        paths.append(path)

    fig = Figure(figsize=(9, 3.4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    for use_bn, curve in results["convergence"].items():
        epochs = np.arange(1, len(curve["loss"]) + 1)
        loss_ax.plot(epochs, curve["loss"], color=colors[use_bn], label=labels[use_bn])
        acc_ax.plot(epochs, curve["test_acc"], color=colors[use_bn], label=labels[use_bn])
    loss_ax.set(
        xlabel="epoch",
        ylabel="training loss",
        yscale="log",
        title=f"convergence at lr={cfg['base_lr']}",
    )
    acc_ax.set(xlabel="epoch", ylabel="test accuracy", ylim=(0.5, 1.0))
    acc_ax.legend()
    save(fig, "convergence.png")

    for key, xlabel, name in (
        ("learning_rates", "learning rate", "learning_rate.png"),
        ("init_scales", "weight init scale (x He std)", "init_scale.png"),
    ):
        fig = Figure(figsize=(4.8, 3.4))
        ax = fig.subplots()
        for use_bn, accs in results[key].items():
            ax.errorbar(
                cfg[key],
                accs.mean(axis=1),
                yerr=accs.std(axis=1),
                marker="o",
                capsize=3,
                color=colors[use_bn],
                label=labels[use_bn],
            )
        ax.set(
            xscale="log",
            xlabel=xlabel,
            ylabel=f"test accuracy after {cfg['epochs']} epochs",
            ylim=(0, 1.02),
        )
        ax.legend()
        save(fig, name)

    tve = results["train_vs_eval"]
    fig = Figure(figsize=(9, 3.4))
    size_ax, epoch_ax = fig.subplots(1, 2)
    sizes = list(tve["by_batch_size"])
    means, stds = np.array([tve["by_batch_size"][s] for s in sizes]).T
    size_ax.errorbar(
        sizes,
        means,
        yerr=stds,
        marker="o",
        capsize=3,
        color="tab:green",
        label="training mode (batch statistics)",
    )
    size_ax.axhline(tve["eval_acc"], color="tab:blue", label="eval mode (running statistics)")
    size_ax.set_xscale("log", base=2)
    size_ax.set(xlabel="test batch size", ylabel="test accuracy", title="same trained model")
    size_ax.legend()
    history = tve["history"]
    epochs = np.arange(1, len(history["test_acc"]) + 1)
    epoch_ax.plot(epochs, history["test_acc"], color="tab:blue", label="running statistics")
    epoch_ax.plot(
        epochs,
        history["test_acc_batch_stats"],
        color="tab:green",
        ls="--",
        label="batch statistics (whole test set)",
    )
    epoch_ax.set(xlabel="epoch", ylabel="test accuracy", title="during training")
    epoch_ax.legend()
    save(fig, "train_eval.png")
    return paths


def summarize(results, cfg) -> str:
    lines = [
        f"digits MLP {HIDDEN}, batch {BATCH_SIZE}, plain SGD, {cfg['epochs']} epochs, "
        f"seeds {list(cfg['seeds'])} (mean +- std over seeds), backend {results['backend']}",
        "",
    ]
    conv = results["convergence"]
    lines.append(
        f"convergence at lr={cfg['base_lr']}: epoch | loss no-BN, BN | test acc no-BN, BN"
    )
    for epoch in sorted({0, 1, 4, len(conv[True]["loss"]) - 1}):
        if epoch < len(conv[True]["loss"]):
            lines.append(
                f"  {epoch + 1:3d} | {conv[False]['loss'][epoch]:.3f}, "
                f"{conv[True]['loss'][epoch]:.3f} | "
                f"{conv[False]['test_acc'][epoch]:.3f}, "
                f"{conv[True]['test_acc'][epoch]:.3f}"
            )
    for key, title in (("learning_rates", "learning rate"), ("init_scales", "init scale")):
        lines += ["", f"final test accuracy per {title}: value | no-BN | BN"]
        for value, plain, normed in zip(
            cfg[key], results[key][False], results[key][True], strict=True
        ):
            lines.append(
                f"  {value:5g} | {plain.mean():.3f} +- {plain.std():.3f} | "
                f"{normed.mean():.3f} +- {normed.std():.3f}"
            )
    tve = results["train_vs_eval"]
    lines += [
        "",
        f"train vs eval (BN model, seed {cfg['seeds'][0]}): "
        f"eval mode (running stats) test acc {tve['eval_acc']:.3f}",
        "  test batch size | training-mode (batch stats) test acc",
    ]
    for size, (mean, std) in tve["by_batch_size"].items():
        lines.append(f"  {size:4d} | {mean:.3f} +- {std:.3f}")
    return "\n".join(lines) + "\n"


def numpy_backend_name() -> str:
    """The backend NumPy arrays go to under the current selection (context, environment)."""
    probe = np.empty(0, DTYPE)
    selected = bn.get_backend()  # the selected one, or the first runnable one
    if selected.accepts(probe):
        return selected.name
    return next(name for name in bn.available_backends() if bn.get_backend(name).accepts(probe))


def run(quick: bool = False, out: Path | None = None, backend: str | None = None):
    """Run every experiment; write figures and ``summary.txt`` into ``out`` when given.

    ``backend`` names a batchnorm backend; None leaves the choice to ``BATCHNORM_BACKEND``
    or the automatic selection.
    """
    cfg = QUICK if quick else FULL
    runs = Runs(load_data(), cfg["epochs"])
    # The matrices are 64 wide: BLAS threads would only add synchronisation (and spin-wait
    # on a busy machine), so the products run single-threaded.
    selection = contextlib.nullcontext() if backend is None else bn.use_backend(backend)
    with threadpool_limits(limits=1, user_api="blas"), selection:
        results = {
            "backend": numpy_backend_name(),
            "convergence": run_convergence(runs, cfg),
            "learning_rates": run_sweep(
                cfg,
                cfg["learning_rates"],
                lambda use_bn, lr, seed: runs.get(use_bn, seed, lr),
            ),
            "init_scales": run_sweep(
                cfg,
                cfg["init_scales"],
                lambda use_bn, scale, seed: runs.get(use_bn, seed, cfg["base_lr"], scale),
            ),
            "train_vs_eval": run_train_vs_eval(runs, cfg),
        }
    results["summary"] = summarize(results, cfg)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        results["figures"] = plot_all(results, cfg, out)
        (out / "summary.txt").write_text(results["summary"])
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer epochs, seeds and settings (the CI test)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("train_digits_output"),
        help="folder for the figures and summary.txt",
    )
    parser.add_argument(
        "--backend", help="batchnorm backend (default: BATCHNORM_BACKEND or automatic)"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = run(args.quick, args.out, args.backend)
    print(results["summary"], end="")
    print(
        f"\nbackend {results['backend']}, {time.perf_counter() - started:.1f} s; "
        f"wrote {', '.join(str(p) for p in results['figures'])}"
    )
    return results


if __name__ == "__main__":
    main()
