"""15.1: activation histograms per layer for each initializer x activation, and the
zero-initialization symmetry demo."""
from __future__ import annotations

import numpy as np

from .. import optim
from ..backend import get_namespace, to_numpy
from ..init import get_initializer
from ..losses import MSELoss
from ..model import mlp
from . import regression
from .report import Section, figure_module

INITS = {"Normal": ("normal", {}), "Xavier": ("xavier", {}), "MSRA": ("msra", {})}
ACTIVATIONS = {"sigmoid": lambda xp, z: 1 / (1 + xp.exp(-z)), "tanh": lambda xp, z: xp.tanh(z),
               "relu": lambda xp, z: xp.where(z > 0, z, 0.0)}
TEXTBOOK_RUNS = [("Normal", "sigmoid"), ("Xavier", "sigmoid"), ("Xavier", "relu"), ("MSRA", "relu")]


def activations(init, activation, seed=0, layers=6, width=128, samples=1000, device="cpu"):
    """Forward randn(samples, width) through ``layers`` FC (bias 0) + activation layers,
    each with its own independently drawn weights; returns each layer's activations."""
    xp = get_namespace(device)
    rng = np.random.default_rng(seed)
    x = xp.asarray(rng.standard_normal((samples, width)))
    name, options = INITS[init]
    draw = get_initializer(name, **options)
    outputs = []
    for _ in range(layers):
        w = xp.asarray(draw((width, width), rng))
        x = ACTIVATIONS[activation](xp, x @ w)
        outputs.append(to_numpy(x))
    return outputs


def saturation(values):
    """Share of sigmoid outputs within 0.01 of 0 or 1."""
    return float(np.mean((values < 0.01) | (values > 0.99)))


def zero_init_demo(seed=0, epochs=50, device="cpu"):
    """1 -> 3 (sigmoid) -> 1 from all-zero weights, SGD lr 0.1, batch 10: returns the hidden
    layer's weights and biases after training (columns stay identical)."""
    x, y, _, _ = regression.curve(seed)
    model = mlp([1, 3, 1], "sigmoid", init="zeros", seed=seed, device=device, dtype="float64")
    steps = regression.minibatch_steps(model, optim.SGD(model, lr=0.1), MSELoss(), x, y, 10, seed)
    for _ in range(epochs * -(-x.shape[0] // 10)):
        next(steps)
    first, second = model.layers[0], model.layers[2]
    return to_numpy(first.W.data), to_numpy(first.b.data), to_numpy(second.W.data)


def run(ctx) -> Section:
    plt = figure_module()
    section = Section("15.1 Weight initialization")
    grid = [(i, a) for a in ACTIVATIONS for i in INITS]
    stats = {}
    for init, activation in grid:
        layers = activations(init, activation, ctx.seed, device=ctx.device)
        stats[init, activation] = layers
    figures = [("textbook", TEXTBOOK_RUNS, "init_textbook.png")]
    if not ctx.quick:
        figures.append(("grid", grid, "init_grid.png"))
    for group, runs, name in figures:
        fig, axes = plt.subplots(len(runs), 6, figsize=(15, 2.1 * len(runs)), squeeze=False)
        for row, (init, activation) in enumerate(runs):
            for col, values in enumerate(stats[init, activation]):
                ax = axes[row, col]
                values = values.ravel()
                span = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}.get(activation)
                if activation == "relu":
                    values = values[values > 0]  # the exact zeros (about half) would hide the rest
                    top = float(np.percentile(values, 99.5)) if values.size else 1.0
                    span = (0.0, max(2.0, top))  # Normal init makes them grow layer by layer
                counts, edges = np.histogram(values, bins=25, range=span)
                ax.stairs(counts, edges, fill=True, color="C0")
                ax.set_title(f"{init}+{activation}: layer {col + 1}", fontsize=8)
                ax.tick_params(labelsize=6)
                if col == 0:
                    ax.set_ylabel("count", fontsize=7)
                ax.set_xlabel("activation", fontsize=7)
        fig.suptitle(f"Activation histograms per layer ({group} runs; 1000x128 inputs, 25 bins)")
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        fig.savefig(ctx.out / name, dpi=80)
        plt.close(fig)
    section.text("Input randn(1000, 128) through 6 layers of FC 128->128 (bias 0) + activation, "
                 "each layer's weights drawn independently (the course code reused one matrix). "
                 "Histograms of the 128,000 values per layer, 25 bins over [0, 1] as in the textbook "
                 "([-1, 1] for tanh; for ReLU the positive values over [0, 2] or wider where "
                 "they grow past it, since the exact zeros, about half, would flatten the rest "
                 "and MSRA's values reach past 1).")
    section.figure(ctx.out / "init_textbook.png", "The textbook's four runs")
    if not ctx.quick:
        section.figure(ctx.out / "init_grid.png", "The whole grid: Normal/Xavier/MSRA x sigmoid/tanh/ReLU")
    rows = []
    for init, activation in grid:
        stds = [float(np.std(v)) for v in stats[init, activation]]
        sat = saturation(np.concatenate([v.ravel() for v in stats[init, activation]])) \
            if activation == "sigmoid" else None
        rows.append([f"{init} + {activation}", *[f"{s:.3f}" for s in stds],
                     "" if sat is None else f"{100 * sat:.0f}%"])
    section.text("Standard deviation of each layer's activations (and, for sigmoid, the share "
                 "of values within 0.01 of 0 or 1):")
    section.table(["run", *[f"layer {i}" for i in range(1, 7)], "saturated"], rows)

    normal_sig = saturation(np.concatenate([v.ravel() for v in stats["Normal", "sigmoid"]]))
    xavier_sig = saturation(np.concatenate([v.ravel() for v in stats["Xavier", "sigmoid"]]))
    section.claim("Normal N(0,1) init saturates sigmoid", "activations pile up at 0 and 1",
                  f"{100 * normal_sig:.0f}% of values within 0.01 of 0 or 1 (Xavier: "
                  f"{100 * xavier_sig:.0f}%)", normal_sig > 0.5 and xavier_sig < 0.05)
    xr = [float(np.std(v)) for v in stats["Xavier", "relu"]]
    mr = [float(np.std(v)) for v in stats["MSRA", "relu"]]
    section.claim("Xavier + ReLU: activations shrink layer by layer", "mass moves toward 0",
                  f"std {xr[0]:.3f} -> {xr[-1]:.3f} over 6 layers",
                  all(b < a for a, b in zip(xr, xr[1:])) and xr[-1] < 0.3 * xr[0])
    section.claim("MSRA + ReLU: spread kept in every layer", "evenly spread",
                  f"std {mr[0]:.3f} -> {mr[-1]:.3f}", 0.5 < mr[-1] / mr[0] < 2)

    w1, b1, w2 = zero_init_demo(ctx.seed, epochs=5 if ctx.quick else 50, device=ctx.device)
    identical = bool(np.all(w1 == w1[:, :1]) and np.all(b1 == b1[0]) and np.all(w2 == w2[0]))
    if not identical:
        raise AssertionError("zero init: hidden units diverged, which symmetry forbids")
    section.text("**Zero initialization** (1 -> 3 sigmoid -> 1 on the curve data, SGD lr 0.1, "
                 f"batch 10, {5 if ctx.quick else 50} epochs): after training, hidden weights "
                 f"{np.round(w1[0], 6).tolist()}, biases {np.round(b1, 6).tolist()}, output "
                 f"weights {np.round(w2[:, 0], 6).tolist()}: the three units are identical, "
                 "and stay so (checked exactly).")
    section.claim("Zero init: hidden units stay identical", "symmetry never broken",
                  "all three units bit-identical after training", identical)
    return section
