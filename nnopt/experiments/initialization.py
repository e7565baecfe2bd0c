"""15.1: activation histograms per layer for each initializer x activation, and the
zero-initialization symmetry demo."""
from __future__ import annotations

import numpy as np
from matplotlib.ticker import MaxNLocator

from .. import optim
from ..backend import get_namespace, to_numpy
from ..init import get_initializer
from ..losses import MSELoss
from ..model import mlp
from . import regression
from .report import Section, describe, figure_module, save_figure, spread

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


def zero_init_demo(seed=0, epochs=20, device="cpu", init="zeros"):
    """1 -> 3 (sigmoid) -> 1 from all-zero weights (or ``init``), SGD lr 0.1, batch 10:
    returns the hidden weights, hidden biases and output weights after training. SGD takes
    its reference update: on 10 parameters the numba step saves nothing and would be
    compiled in this process first (see ``contours.descend``)."""
    x, y, _, _ = regression.curve(seed)
    model = mlp([1, 3, 1], "sigmoid", init=init, seed=seed, device=device, dtype="float64")
    steps = regression.minibatch_steps(model, optim.SGD(model, lr=0.1, use_fast_path=False), MSELoss(), x, y, 10, seed)
    for _ in range(epochs * -(-x.shape[0] // 10)):
        next(steps)
    first, second = model.layers[0], model.layers[2]
    return to_numpy(first.W.data), to_numpy(first.b.data), to_numpy(second.W.data)


def per_sample_spread(values):
    """Mean over units of each unit's standard deviation across the samples. The pooled
    histogram hides a collapse: if every input maps onto the same output vector, the
    pooled values can still look spread while this is 0."""
    return float(np.mean(np.std(values, axis=0)))


def zero_init_identical(w1, b1, w2) -> bool:
    return bool(np.all(w1 == w1[:, :1]) and np.all(b1 == b1[0]) and np.all(w2 == w2[0]))


def _histogram_row(axes, layers, init, activation, relu_range):
    for col, values in enumerate(layers):
        ax = axes[col]
        values = values.ravel()
        if activation == "relu":
            # log10 of the positive values on one axis for the whole row: Normal's growth
            # (x8 per layer) and Xavier's shrinking both show as a shift, panel to panel.
            positive = values[values > 0]
            counts, edges = np.histogram(np.log10(positive), bins=25, range=relu_range)
            ax.set_xlabel("log10(activation > 0)")
        else:
            span = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}[activation]
            counts, edges = np.histogram(values, bins=25, range=span)
            ax.set_xlabel("activation")
        ax.stairs(counts / values.size, edges, fill=True, color="C0")
        ax.set_title(f"layer {col + 1}")
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.yaxis.set_major_locator(MaxNLocator(3))
    axes[0].set_ylabel(f"{init} + {activation}\nshare of values")


def _plot_histograms(plt, stats, runs, path, title):
    relu = [np.log10(v[v > 0]) for (i, a) in runs if a == "relu" for v in stats[i, a]]
    relu_range = (float(np.floor(min(np.percentile(r, 0.5) for r in relu))),
                  float(np.ceil(max(np.percentile(r, 99.5) for r in relu)))) if relu else (0, 1)
    fig, axes = plt.subplots(len(runs), 6, figsize=(17, 2.6 * len(runs) + 0.8), squeeze=False,
                             sharey="row")
    for row, (init, activation) in enumerate(runs):
        _histogram_row(axes[row], stats[init, activation], init, activation, relu_range)
        for ax in axes[row]:
            ax.set_xlim(*(relu_range if activation == "relu" else
                          {"sigmoid": (0, 1), "tanh": (-1, 1)}[activation]))
    save_figure(fig, path, title, left=1.0, bottom=0.65, right=0.3, top=0.95, wspace=0.45,
                hspace=0.85)


def _plot_zero_init(plt, path, zero, xavier):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (title, (w1, b1, w2)) in zip(axes, (("zero init", zero), ("Xavier init", xavier))):
        values = {"hidden weight": w1[0], "hidden bias": b1, "output weight": w2[:, 0]}
        width = 0.25
        for k, (name, v) in enumerate(values.items()):
            ax.bar(np.arange(3) + (k - 1) * width, v, width, label=name, color=f"C{k}")
        ax.set_xticks(range(3), [f"unit {u + 1}" for u in range(3)])
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(f"{title}: the 3 hidden units after training")
    axes[0].set_ylabel("value")
    axes[0].legend()
    save_figure(fig, path, left=0.85, bottom=0.45, right=0.2, top=0.4, wspace=0.2)


def run(ctx) -> Section:
    plt = figure_module()
    section = Section("15.1 Weight initialization")
    seeds = ctx.seed_list
    grid = [(i, a) for a in ACTIVATIONS for i in INITS]
    stats = {(i, a): activations(i, a, seeds[0], device=ctx.device) for i, a in grid}
    per_seed = {run: [stats[run] if seed == seeds[0] else
                      activations(*run, seed, device=ctx.device) for seed in seeds]
                for run in TEXTBOOK_RUNS}
    _plot_histograms(plt, stats, TEXTBOOK_RUNS, ctx.out / "init_textbook.png",
                     "The textbook's runs: share of the 128,000 activations per bin, per layer")
    if not ctx.quick:
        _plot_histograms(plt, stats, grid, ctx.out / "init_grid.png",
                         "All initializers x activations (ReLU rows: one log axis for the row)")
    section.text("Input randn(1000, 128) through 6 layers of FC 128->128 (bias 0) + activation, "
                 "each layer's weights drawn independently (the course code reused one matrix). "
                 "Histograms of the 128,000 values per layer, 25 bins over [0, 1] as in the "
                 "textbook ([-1, 1] for tanh). For ReLU, the positive values on a log10 axis "
                 "shared by the row: about half are exact zeros, which would flatten the rest, "
                 "and Normal init multiplies them by about 8 per layer, which a linear axis per "
                 f"panel hides. Figures: seed {seeds[0]}; claims: {len(seeds)} seeds.")
    section.figure(ctx.out / "init_textbook.png", "The textbook's four runs")
    if not ctx.quick:
        section.figure(ctx.out / "init_grid.png", "The whole grid: Normal/Xavier/MSRA x sigmoid/tanh/ReLU")
    rows = []
    for init, activation in grid:
        layers = stats[init, activation]
        sat = saturation(np.concatenate([v.ravel() for v in layers])) if activation == "sigmoid" else None
        rows.append([f"{init} + {activation}",
                     *[f"{np.std(v):.3g} / {per_sample_spread(v):.3g}" for v in layers],
                     "" if sat is None else f"{100 * sat:.0f}%"])
    section.text(f"Per layer (seed {seeds[0]}): pooled standard deviation of the 128,000 values / "
                 "per-sample spread (each unit's standard deviation across the 1,000 inputs, "
                 "averaged over units), and for sigmoid the share of values within 0.01 of 0 or 1. "
                 "A per-sample spread near 0 means every input leaves the layer as the same "
                 "vector, however spread the pooled histogram looks:")
    section.table(["run", *[f"layer {i}" for i in range(1, 7)], "saturated"], rows)

    def ratio_last_first(run, measure):
        return [measure(layers[-1]) / measure(layers[0]) for layers in per_seed[run]]
    sat_normal = [saturation(np.concatenate([v.ravel() for v in layers]))
                  for layers in per_seed["Normal", "sigmoid"]]
    section.claim("normal_sigmoid_saturates", "Normal N(0,1) init saturates sigmoid",
                  "activations pile up at 0 and 1", spread(sat_normal, "share saturated"),
                  [v > 0.5 for v in sat_normal],
                  f"share of values within 0.01 of 0 or 1: {describe(spread(sat_normal), digits=2)}")
    # The textbook's claims are about its histograms: judged on the pooled spread, by one
    # rule for both. Whether each input keeps an output of its own (the per-sample spread
    # does not collapse) is nnopt's own check, by one rule for both.
    def kept(values):
        return [0.5 < v < 2 for v in values]
    xs = ratio_last_first(("Xavier", "sigmoid"), np.std)
    section.claim("xavier_sigmoid_even", "Xavier + sigmoid: spread evenly in every layer",
                  "spread evenly in every layer", spread(xs, "std, layer 6 / layer 1"), kept(xs),
                  f"pooled std at layer 6 / layer 1: {describe(spread(xs), digits=3)} (held: "
                  "within 0.5-2)")
    xr = ratio_last_first(("Xavier", "relu"), np.std)
    section.claim("xavier_relu_vanishes", "Xavier + ReLU: activations shrink layer by layer",
                  "mass moves toward 0", spread(xr, "std, layer 6 / layer 1"), [v < 0.3 for v in xr],
                  f"std at layer 6 / layer 1: {describe(spread(xr), digits=3)} (held: below 0.3)")
    mr = ratio_last_first(("MSRA", "relu"), np.std)
    section.claim("msra_relu_kept", "MSRA + ReLU: spread kept in every layer", "evenly spread",
                  spread(mr, "std, layer 6 / layer 1"), kept(mr),
                  f"pooled std at layer 6 / layer 1: {describe(spread(mr), digits=3)} (held: "
                  "within 0.5-2)")
    for run, name, id in ((("Xavier", "sigmoid"), "Xavier + sigmoid", "xavier_sigmoid_per_sample"),
                          (("MSRA", "relu"), "MSRA + ReLU", "msra_relu_per_sample")):
        ps = ratio_last_first(run, per_sample_spread)
        section.claim(id, f"{name}: each input keeps an output of its own",
                      "(nnopt's check, not the textbook's)",
                      spread(ps, "per-sample spread, layer 6 / layer 1"), [v > 0.1 for v in ps],
                      f"per-sample spread at layer 6 / layer 1: {describe(spread(ps), spec='.3g')} "
                      "(held: above 0.1, not collapsed tenfold; near 0, every input leaves as "
                      "the same vector)")

    epochs = 5 if ctx.quick else 20  # the symmetry is exact at any count
    if ctx.quick:  # (the histograms' claims above ran whole)
        section.cap = f"trained {epochs} epochs, not 20"
    zero_runs = [zero_init_demo(seed, epochs=epochs, device=ctx.device) for seed in seeds[:3]]
    identical = [zero_init_identical(*r) for r in zero_runs]
    trained = [bool(np.any(r[0] != 0)) for r in zero_runs]
    _plot_zero_init(plt, ctx.out / "init_zero.png", zero_runs[0],
                    zero_init_demo(seeds[0], epochs, ctx.device, init="xavier"))
    section.text("**Zero initialization** (1 -> 3 sigmoid -> 1 on the curve data, SGD lr 0.1, "
                 f"batch 10, {epochs} epochs; the textbook trains 50: the symmetry is exact at "
                 f"any count), checked exactly on seeds {seeds[:3]}: after "
                 f"training (seed {seeds[0]}), hidden weights {np.round(zero_runs[0][0][0], 6).tolist()}, "
                 f"biases {np.round(zero_runs[0][1], 6).tolist()}, output weights "
                 f"{np.round(zero_runs[0][2][:, 0], 6).tolist()}.")
    section.figure(ctx.out / "init_zero.png", "Zero init: the three units stay identical; "
                   "Xavier init (same data and training) breaks the symmetry")
    section.claim("zero_init_symmetry", "Zero init: hidden units stay identical",
                  "symmetry never broken", spread([float(i) for i in identical], "identical (1) or not (0)"),
                  [i and t for i, t in zip(identical, trained)],
                  f"hidden units bit-identical after training in {sum(identical)} of "
                  f"{len(identical)} seeds (weights moved from 0 in {sum(trained)})",
                  sampled=False)  # exact by construction (equal units, equal gradients): no rate
    return section

