"""15.4: optimizer paths on loss contours.

(a) z = x^2/10 + y^2 from (-7, 2); (b) the (w, b) loss of the linear-regression set,
(w, b) trained from zero with batch 5; extra surfaces: Rosenbrock and Beale. Every path
is taken by nnopt's own optimizers on a 2-parameter flat storage.
"""
from __future__ import annotations

import numpy as np

from .. import optim
from ..backend import get_namespace, to_numpy
from ..losses import MSELoss
from ..model import mlp
from ..params import FlatParameters
from . import regression
from .report import Section, figure_module


def bowl(p):
    x, y = p
    return x * x / 10 + y * y, np.array([x / 5, 2 * y])


def rosenbrock(p):
    x, y = p
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2, np.array(
        [-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])


def beale(p):
    x, y = p
    t1, t2, t3 = 1.5 - x + x * y, 2.25 - x + x * y * y, 2.625 - x + x * y ** 3
    value = t1 * t1 + t2 * t2 + t3 * t3
    dx = 2 * (t1 * (y - 1) + t2 * (y * y - 1) + t3 * (y ** 3 - 1))
    dy = 2 * (t1 * x + t2 * 2 * x * y + t3 * 3 * x * y * y)
    return value, np.array([dx, dy])


SURFACES = {
    # name: (function, start, minimum, steps, {label: (optimizer, options)}, view box)
    "bowl": (bowl, (-7.0, 2.0), (0.0, 0.0), 25, {
        "SGD lr 0.95": ("sgd", {"lr": 0.95}), "SGD lr 0.3": ("sgd", {"lr": 0.3}),
        "Momentum lr 0.1": ("momentum", {"lr": 0.1}), "NAG lr 0.1": ("nag", {"lr": 0.1}),
        "AdaGrad lr 1.5": ("adagrad", {"lr": 1.5}), "AdaDelta": ("adadelta", {}),
        "RMSProp lr 0.5": ("rmsprop", {"lr": 0.5}), "Adam lr 0.5": ("adam", {"lr": 0.5}),
    }, (-8, 8, -3, 3)),
    "rosenbrock": (rosenbrock, (-1.5, 2.0), (1.0, 1.0), 1000, {
        "SGD lr 0.001": ("sgd", {"lr": 0.001}), "SGD lr 0.0002": ("sgd", {"lr": 0.0002}),
        "Momentum lr 0.0002": ("momentum", {"lr": 0.0002}), "NAG lr 0.0002": ("nag", {"lr": 0.0002}),
        "AdaGrad lr 0.5": ("adagrad", {"lr": 0.5}), "AdaDelta": ("adadelta", {}),
        "RMSProp lr 0.01": ("rmsprop", {"lr": 0.01}), "Adam lr 0.05": ("adam", {"lr": 0.05}),
    }, (-2, 2, -1, 3)),
    "beale": (beale, (1.0, 1.5), (3.0, 0.5), 1000, {
        "SGD lr 0.01": ("sgd", {"lr": 0.01}), "SGD lr 0.001": ("sgd", {"lr": 0.001}),
        "Momentum lr 0.001": ("momentum", {"lr": 0.001}), "NAG lr 0.001": ("nag", {"lr": 0.001}),
        "AdaGrad lr 0.5": ("adagrad", {"lr": 0.5}), "AdaDelta": ("adadelta", {}),
        "RMSProp lr 0.01": ("rmsprop", {"lr": 0.01}), "Adam lr 0.05": ("adam", {"lr": 0.05}),
    }, (-0.5, 4, -1.5, 2)),
}
LINE_RUNS = {"SGD lr 0.1": ("sgd", {"lr": 0.1}), "SGD lr 0.5": ("sgd", {"lr": 0.5}),
             "Momentum lr 0.05": ("momentum", {"lr": 0.05}), "NAG lr 0.05": ("nag", {"lr": 0.05}),
             "AdaGrad lr 1.0": ("adagrad", {"lr": 1.0}), "AdaDelta lr 0": ("adadelta", {"lr": 0.0}),
             "RMSProp lr 0.1": ("rmsprop", {"lr": 0.1}), "Adam lr 0.5": ("adam", {"lr": 0.5})}
LINE_TABLE = {"SGD lr 0.2": ("sgd", {"lr": 0.2}, 148), "Momentum lr 0.02": ("momentum", {"lr": 0.02}, 128),
              "RMSProp lr 0.05": ("rmsprop", {"lr": 0.05}, 130), "Adam lr 0.2": ("adam", {"lr": 0.2}, 107)}


def descend(surface, start, name, options, steps, device="cpu"):
    """The path of optimizer ``name`` over ``surface`` (value, gradient) from ``start``."""
    storage = FlatParameters.from_arrays(get_namespace(device), "float64", xy=list(start))
    opt = optim.create(name, storage, **options)
    path = [np.array(start, dtype=float)]
    for _ in range(steps):
        _, grad = surface(to_numpy(storage.data))
        if not np.all(np.isfinite(grad)) or np.max(np.abs(path[-1])) > 1e6:
            break  # diverged: keep the path so far
        storage.grad[...] = storage.xp.asarray(grad)
        opt.step()
        path.append(to_numpy(storage.data).copy())
    return np.array(path)


def line_paths(name, options, seed=0, target=0.005, max_iterations=2000, device="cpu"):
    """Train y = w x + b from zero (batch 5); the (w, b) path and the iteration at which
    the full-data MSE/2 first fell below ``target`` (None if never)."""
    x, y = regression.line(seed)
    model = mlp([1, 1], init="zeros", seed=seed, device=device, dtype="float64")
    loss = MSELoss()
    steps = regression.minibatch_steps(model, optim.create(name, model, **options), loss, x, y,
                                       5, seed)
    xd, yd = model.xp.asarray(x), model.xp.asarray(y)
    path, reached = [to_numpy(model.flat.data).copy()], None
    for iteration in range(1, max_iterations + 1):
        next(steps)
        path.append(to_numpy(model.flat.data).copy())
        if float(loss.forward(model.forward(xd), yd)) < target:
            reached = iteration
            break
    return np.array(path), reached


def line_loss_grid(x, y, w, b):
    pred = w[..., None] * x[:, 0] + b[..., None]
    return np.mean((pred - y[:, 0]) ** 2, axis=-1) / 2


def line_target(seed, textbook=0.005):
    """The textbook's 0.005, or 0.001 above the least-squares optimum where the noise draw
    puts that optimum (about noise_var / 2 = 0.005 itself) out of reach."""
    x, y = regression.line(seed)
    a = np.c_[x, np.ones_like(x)]
    optimum = float(np.mean((a @ np.linalg.lstsq(a, y, rcond=None)[0] - y) ** 2) / 2)
    return (textbook if optimum < textbook - 2e-4 else optimum + 1e-3), optimum


def _panels(plt, paths, contour, title, minimum, path_png):
    n = len(paths)
    fig, axes = plt.subplots(2, (n + 1) // 2, figsize=(4.2 * ((n + 1) // 2), 7.5))
    for ax, (label, path) in zip(axes.ravel(), paths.items()):
        contour(ax)
        ax.plot(path[:, 0], path[:, 1], ".-", color="C3", lw=1, ms=3, label="path")
        ax.plot(*path[0], "o", color="k", label="start")
        ax.plot(*path[-1], "s", color="C3", label=f"end ({len(path) - 1} steps)")
        ax.plot(*minimum, "*", color="gold", ms=12, mec="k", label="minimum")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=6, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path_png, dpi=70)
    plt.close(fig)


def _overlay(plt, paths, contour, title, minimum, path_png, gif=None):
    fig, ax = plt.subplots(figsize=(9, 6))
    contour(ax)
    lines = {}
    for i, (label, path) in enumerate(paths.items()):
        (lines[label],) = ax.plot(path[:, 0], path[:, 1], ".-", lw=1.2, ms=3, color=f"C{i}",
                                  label=label)
        ax.plot(*path[-1], "s", color=f"C{i}", ms=5)
    first = next(iter(paths.values()))
    ax.plot(*first[0], "o", color="k", ms=8, label="start")
    ax.plot(*minimum, "*", color="gold", ms=15, mec="k", label="minimum")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path_png, dpi=80)
    if gif is not None:
        from matplotlib.animation import FuncAnimation, PillowWriter
        frames = max(len(p) for p in paths.values())

        def draw(k):
            for label, path in paths.items():
                shown = path[:k + 1]
                lines[label].set_data(shown[:, 0], shown[:, 1])
            return list(lines.values())
        FuncAnimation(fig, draw, frames=frames, blit=True).save(gif, writer=PillowWriter(fps=4), dpi=60)
    plt.close(fig)


def _contour_fn(fn, box, levels=30, log=False):
    xs, ys = np.linspace(box[0], box[1], 200), np.linspace(box[2], box[3], 200)
    gx, gy = np.meshgrid(xs, ys)
    values = fn((gx, gy))[0]
    if log:
        values = np.log10(values + 1e-12)

    def draw(ax):
        cs = ax.contour(gx, gy, values, levels=levels, cmap="viridis", linewidths=0.7)
        ax.set(xlabel="x", ylabel="y", xlim=box[:2], ylim=box[2:])
        return cs
    return draw


def run(ctx) -> Section:
    plt = figure_module()
    section = Section("15.4 Paths on loss contours")
    fn, start, minimum, steps, runs, box = SURFACES["bowl"]
    paths = {label: descend(fn, start, name, opts, steps, ctx.device) for label, (name, opts) in runs.items()}
    draw = _contour_fn(fn, box)
    if not ctx.quick:
        _panels(plt, paths, draw, "z = x^2/10 + y^2 from (-7, 2), 25 steps", minimum,
                ctx.out / "contours_bowl.png")
    gif = None if ctx.quick else ctx.out / "contours_bowl.gif"
    _overlay(plt, paths, draw, "z = x^2/10 + y^2: all optimizers", minimum,
             ctx.out / "contours_bowl_overlay.png", gif=gif)
    section.text("(a) The simulated loss z = x^2/10 + y^2 (gradient (x/5, 2y)) from (-7, 2), "
                 f"{steps} steps of each optimizer (the textbook's four rates, and rates of our "
                 "choosing for the other three).")
    if not ctx.quick:
        section.figure(ctx.out / "contours_bowl.png", "One panel per optimizer")
    section.figure(ctx.out / "contours_bowl_overlay.png", "All paths on one contour")
    if gif is not None:
        section.text("Animated: [contours_bowl.gif](contours_bowl.gif)")
    sgd = paths["SGD lr 0.95"]
    flips = int(np.sum(np.diff(np.sign(sgd[:, 1])) != 0))
    section.claim("SGD (lr 0.95) zig-zags across the narrow axis", "zig-zag",
                  f"y changes sign {flips} times in {len(sgd) - 1} steps", flips >= len(sgd) // 2)
    mom = paths["Momentum lr 0.1"]
    overshoot = float(mom[:, 0].max())
    section.claim("Momentum overshoots the centre and is pulled back", "overshoots",
                  f"x reaches {overshoot:+.2f} past the minimum at 0", overshoot > 0.5)
    straight = {k: _straightness(paths[k]) for k in ("RMSProp lr 0.5", "Adam lr 0.5", "SGD lr 0.95")}
    section.claim("RMSProp and Adam take a nearly direct route", "nearly direct",
                  ", ".join(f"{k}: {v:.2f}" for k, v in straight.items()) + " (path length / distance covered; 1 = straight)",
                  max(straight["RMSProp lr 0.5"], straight["Adam lr 0.5"]) < straight["SGD lr 0.95"])

    # (b) the linear-regression loss over (w, b)
    x, y = regression.line(ctx.seed)
    target, optimum = line_target(ctx.seed)
    max_iterations = 400 if ctx.quick else 2000
    line = {label: line_paths(name, opts, ctx.seed, target, max_iterations, ctx.device)
            for label, (name, opts) in LINE_RUNS.items()}
    w, b = np.meshgrid(np.linspace(-0.5, 4, 150), np.linspace(-0.5, 4.5, 150))
    grid = line_loss_grid(x, y, w, b)

    def draw_line(ax):
        ax.contour(w, b, np.log10(grid), levels=25, cmap="viridis", linewidths=0.7)
        ax.set(xlabel="w", ylabel="b")
    best = np.linalg.lstsq(np.c_[x, np.ones_like(x)], y, rcond=None)[0][:, 0]
    if not ctx.quick:
        _panels(plt, {k: v[0] for k, v in line.items()}, draw_line,
                "Linear regression: (w, b) from (0, 0), batch 5", best, ctx.out / "contours_line.png")
    _overlay(plt, {k: v[0] for k, v in line.items()}, draw_line, "Linear regression: all optimizers",
             best, ctx.out / "contours_line_overlay.png")
    section.text(f"(b) y = 2x + 3 + N(0, 0.1^2), 200 samples (seed {ctx.seed}); FC 1 -> 1 from "
                 f"(w, b) = (0, 0); batch 5; the full-data MSE/2 is checked after every iteration "
                 f"(contours of its log10).")
    if not ctx.quick:
        section.figure(ctx.out / "contours_line.png", "(w, b) paths, one panel per optimizer")
    section.figure(ctx.out / "contours_line_overlay.png", "(w, b) paths overlaid")
    ada = line["AdaDelta lr 0"]
    section.claim("AdaDelta converges with lr 0 (it needs no lr)", "still converges",
                  f"loss {float(line_loss_grid(x, y, np.array(ada[0][-1][0]), np.array(ada[0][-1][1]))):.4f} "
                  f"after {len(ada[0]) - 1} iterations (optimum {optimum:.4f})",
                  float(line_loss_grid(x, y, np.array(ada[0][-1][0]), np.array(ada[0][-1][1]))) < 0.05)
    if target != 0.005:
        section.text(f"The least-squares optimum of this draw is MSE/2 = {optimum:.5f}: noise of "
                     "standard deviation 0.1 puts the optimum at about 0.01/2 = 0.005, the "
                     "textbook's own target, so the target here is the optimum + 0.001 = "
                     f"{target:.5f}.")
    rows, counts = [], {}
    for label, (name, opts, textbook) in LINE_TABLE.items():
        _, reached = line_paths(name, opts, ctx.seed, target, max_iterations, ctx.device)
        counts[label] = reached
        rows.append([label, textbook, reached if reached else f"not in {max_iterations}"])
    section.text(f"Iterations until the full-data MSE/2 < {target:.4f}:")
    section.table(["run", "textbook (its data)", "nnopt"], rows)
    order_ok = all(counts.values()) and counts["Adam lr 0.2"] == min(counts.values()) and \
        counts["SGD lr 0.2"] == max(counts.values())
    section.claim("Line fit: Adam fastest, SGD slowest (Momentum, RMSProp between)",
                  "107 < 128, 130 < 148", ", ".join(f"{k}: {v}" for k, v in counts.items()), order_ok)
    if not order_ok:
        section.text("The textbook's ordering does not carry over to this draw: the counts "
                     "depend on the exact data, shuffle and stopping threshold (the text says "
                     "so). A likely reason, not verified: on a two-parameter problem this well "
                     "conditioned, plain SGD at lr 0.2 is already close to the best step, while "
                     "Momentum at lr 0.02 and RMSProp at 0.05 take smaller effective steps. We "
                     "report our counts as measured rather than tune the data until the "
                     "textbook's order appears.")

    # Extra surfaces (full runs only)
    for name in () if ctx.quick else ("rosenbrock", "beale"):
        fn, start, minimum, steps, runs, box = SURFACES[name]
        extra = {label: descend(fn, start, o, opts, steps, ctx.device) for label, (o, opts) in runs.items()}
        _overlay(plt, extra, _contour_fn(fn, box, levels=25, log=True),
                 f"{name.title()} (log10 contours), {steps} steps", minimum,
                 ctx.out / f"contours_{name}.png")
        section.figure(ctx.out / f"contours_{name}.png", f"Extra surface: {name.title()}")
        finals = ", ".join(f"{k}: {np.linalg.norm(p[-1] - np.array(minimum)):.2g}" for k, p in extra.items())
        section.text(f"Distance from the minimum {minimum} after {steps} steps: {finals}.")
    return section


def _straightness(path):
    length = np.sum(np.linalg.norm(np.diff(path, axis=0), axis=1))
    return float(length / max(np.linalg.norm(path[-1] - path[0]), 1e-12))
