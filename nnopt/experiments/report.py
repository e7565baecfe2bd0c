"""Collects each experiment's figures, tables and claims into one Markdown report, and
the claims into ``claims.json``.

A claim is checked once per seed; its verdict comes from the fraction of seeds in which
it held (:data:`RULE`), never from a single run and never as fixed text, and Wilson's
bounds on that fraction (:func:`held_bounds`) say whether more seeds could change it.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

#: The verdict rule, stated once in every report.
YES_AT, NO_AT = 0.75, 0.25
#: A verdict is settled when the rate at which the claim holds lies inside the verdict's
#: band with 90% confidence on each side: Wilson's score bounds at z = 1.2816 (one-sided 90%).
SETTLED_Z = 1.2816
RULE = (f"a claim's verdict is **yes** when it held in at least {YES_AT:.0%} of the seeds, "
        f"**no** when it held in at most {NO_AT:.0%}, **partly** in between, and **n/a** when "
        "no seed could test it. A verdict is *unsettled* when the rate at which the claim "
        "holds could, with more than 10% odds, lie outside that verdict's band (one-sided 90% "
        "Wilson bounds of the held fraction): other seeds may then give another verdict, "
        "and more seeds (`--seeds`) narrow the bounds")


def tested_flags(held_per_seed) -> list:
    """The held flags of the seeds that could test the claim (None left out), as bools."""
    return [bool(h) for h in held_per_seed if h is not None]


def verdict_of(held_per_seed) -> tuple[str, float | None]:
    """(verdict, held fraction) from one True/False per seed; None entries could not test
    the claim and are left out of the fraction."""
    tested = tested_flags(held_per_seed)
    if not tested:
        return "n/a", None
    fraction = sum(tested) / len(tested)
    if fraction >= YES_AT:
        return "yes", fraction
    if fraction <= NO_AT:
        return "no", fraction
    return "partly", fraction


def held_bounds(held_per_seed, z=SETTLED_Z) -> tuple[float, float] | None:
    """Wilson's score bounds on the rate at which a claim holds, from one True/False per
    seed (None entries left out)::

        (p + z^2/2n -+ z sqrt(p(1 - p)/n + z^2/4n^2)) / (1 + z^2/n),   p = held / n

    None when no seed tested the claim."""
    tested = tested_flags(held_per_seed)
    if not tested:
        return None
    return wilson(sum(tested) / len(tested), len(tested), z)


def verdict_settled(verdict, bounds) -> bool | None:
    """Whether both bounds lie in ``verdict``'s band (None for n/a)."""
    if bounds is None:
        return None
    low, high = bounds
    return {"yes": low >= YES_AT, "no": high <= NO_AT,
            "partly": NO_AT < low and high < YES_AT}[verdict]


def wilson(p, n, z=SETTLED_Z) -> tuple[float, float]:
    """Wilson's score bounds for a held fraction ``p`` of ``n`` tested seeds."""
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, (centre - half) / (1 + z * z / n)),
            min(1.0, (centre + half) / (1 + z * z / n)))


def seeds_to_settle(held_per_seed, most=10_000) -> int | None:
    """How many tested seeds would settle the verdict if the claim kept holding at the rate
    it held here: the smallest n whose Wilson bounds at that rate lie inside the verdict's
    band. None where no count up to ``most`` would (a rate on the band's edge, such as 3 of
    4 for yes, never settles) or nothing was tested. A guide for ``--seeds``, not a promise:
    the rate itself moves with the seeds."""
    tested = tested_flags(held_per_seed)
    if not tested:
        return None
    p = sum(tested) / len(tested)
    verdict, _ = verdict_of(tested)
    n = len(tested)
    if verdict_settled(verdict, wilson(p, n)):
        return n
    low, high = n, most
    if not verdict_settled(verdict, wilson(p, high)):
        return None
    while high - low > 1:  # the bounds narrow as n grows: the first settling n, by halving
        middle = (low + high) // 2
        low, high = (low, middle) if verdict_settled(verdict, wilson(p, middle)) else (middle, high)
    return high


def sooner(a, b) -> bool | None:
    """``a`` reached its target before ``b`` (counts, ``math.inf`` for "not reached"). A run
    that did not reach the target is never sooner, even than another that did not:
    "not reached" is not ordered against "not reached". Both reaching it at the same count
    (at the same check) is a tie that orders neither: None, so that seed is left out of the
    claim's fraction rather than counted against it."""
    if a == b < math.inf:
        return None
    return a < math.inf and a < b


def all_of(*held) -> bool | None:
    """The three-valued AND of held flags: False where any is False, else None (untested)
    where any is None, else True."""
    held = [None if h is None else bool(h) for h in held]
    if False in held:
        return False
    return None if None in held else True


def spread(values, quantity="") -> dict:
    """Median, min, max and seed count of ``values``; ``math.inf`` (not reached) is kept
    in the order and written as null, with the count of such seeds."""
    values = [float(v) for v in values]
    finite = [v for v in values if math.isfinite(v)]

    def clean(v):
        return v if math.isfinite(v) else None
    return {"quantity": quantity, "median": clean(statistics.median(values)) if values else None,
            "min": clean(min(values)) if values else None,
            "max": clean(max(values)) if values else None,
            "n_seeds": len(values), "not_reached": len(values) - len(finite)}


def describe(m: dict, unit="", digits=0, counted="seeds", spec=None) -> str:
    """'median 1,250 (range 1,050-1,700, 8 seeds; 2 not reached)'; ``counted`` names what
    the values are one per (seeds, rounds); ``spec`` a format instead of ``digits``
    decimals (".3g": a ratio of 0.0007 is not "0.001")."""
    def num(v):
        return "not reached" if v is None else f"{v:{spec or f',.{digits}f'}}{unit}"
    text = f"median {num(m['median'])} (range {num(m['min'])} to {num(m['max'])}, {m['n_seeds']} {counted}"
    if m.get("not_reached"):
        text += f"; {m['not_reached']} not reached"
    return text + ")"


@dataclass
class Claim:
    """A textbook statement, what we measured over seeds, and the verdict derived from it."""
    id: str
    experiment: str
    claim: str
    textbook: str
    measured: dict
    held_per_seed: list
    reason: str
    #: False where the held flags are not draws over seeds or rounds (a deterministic
    #: path, a property exact by construction, the GPU's fixed configurations): there is
    #: no rate to bound
    sampled: bool = True
    #: what each held flag is one of: "seeds" (--seeds sets how many), "rounds" (of a
    #: timing; fixed by the experiment) or "configurations" (fixed: the GPU's)
    counted: str = "seeds"
    #: what --quick cut short for this claim, in words (None where nothing was): its
    #: verdict is about the shorter test and is marked so
    capped: str | None = None
    verdict: str = "n/a"
    held_fraction: float | None = None
    bounds: tuple | None = None

    def __post_init__(self):
        self.verdict, self.held_fraction = verdict_of(self.held_per_seed)
        if self.sampled:
            self.bounds = held_bounds(self.held_per_seed)

    @property
    def settled(self) -> bool | None:
        return verdict_settled(self.verdict, self.bounds)

    @property
    def seeds_to_settle(self) -> int | None:
        return seeds_to_settle(self.held_per_seed) if self.settled is False else None

    @property
    def settle_hint(self) -> str | None:
        """What would settle an unsettled verdict, in words (None where it is settled)."""
        if self.settled is not False:
            return None
        needed = self.seeds_to_settle
        if not needed:
            return "its rate is on the band's edge: no count settles it"
        return f"about {needed:,} tested {self.counted} would settle it at this rate" + (
            "" if self.counted == "seeds" else " (not --seeds: the experiment fixes its rounds)")

    @property
    def verdict_text(self) -> str:
        text = "**no**" if self.verdict == "no" else self.verdict
        hint = self.settle_hint
        text = text if hint is None else f"{text} (unsettled: {hint})"
        return text if self.capped is None else f"{text} (quick: {self.capped})"

    @property
    def held_text(self) -> str:
        tested = tested_flags(self.held_per_seed)
        return f"{sum(tested)} of {len(tested)}" if tested else "no run"

    def to_json(self) -> dict:
        return {"id": self.id, "experiment": self.experiment, "claim": self.claim,
                "textbook": self.textbook, "measured": self.measured,
                "held_fraction": self.held_fraction, "verdict": self.verdict,
                "held": sum(tested_flags(self.held_per_seed)),
                "tested": len(tested_flags(self.held_per_seed)), "counted": self.counted,
                "held_per_seed": [None if h is None else bool(h) for h in self.held_per_seed],
                "held_bounds": None if self.bounds is None else [round(b, 3) for b in self.bounds],
                "settled": self.settled, "seeds_to_settle": self.seeds_to_settle,
                "capped": self.capped, "reason": self.reason}


#: Section.claim's default ``capped``: the section's own ``cap``
SECTION_CAP = object()


@dataclass
class Section:
    title: str
    lines: list = field(default_factory=list)
    claims: list = field(default_factory=list)
    #: what --quick cut short in this section (None: nothing), the default of each claim's
    cap: str | None = None

    def text(self, *paragraphs):
        self.lines += [*paragraphs, ""]

    def figure(self, path: Path, caption: str):
        self.lines += [f"![{caption}]({path.name})", "", f"*{caption}*", ""]

    def table(self, header, rows):
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("|" + "---|" * len(header))
        self.lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        self.lines.append("")

    def claim(self, id, claim, textbook, measured, held_per_seed, reason, sampled=True,
              counted="seeds", capped=SECTION_CAP) -> Claim:
        """Record a claim: ``measured`` from :func:`spread`, one held flag per seed (None
        where that seed could not test it), ``reason`` what was measured, in words;
        ``sampled``: False where the flags are not draws over seeds or rounds; ``counted``:
        "rounds" where the flags are a timing's rounds; ``capped``: what --quick cut short
        for it (default: the section's ``cap``; None where the claim's test is whole)."""
        made = Claim(id, self.title, claim, textbook, measured, list(held_per_seed), reason,
                     sampled, counted, self.cap if capped is SECTION_CAP else capped)
        self.claims.append(made)
        return made


@dataclass
class Context:
    out: Path
    quick: bool = False
    device: str = "cpu"
    seed: int = 0
    seeds: int = 8
    dataset: str = "mnist-sample"
    data_dir: str | None = None
    gpu_results: Path | None = None  # bench_gpu.py's JSON; default bench/results/gpu.json

    @property
    def seed_list(self) -> list:
        return list(range(self.seed, self.seed + self.seeds))


def fast_path_state() -> str:
    return "off (NNOPT_FAST=0)" if os.environ.get("NNOPT_FAST", "1") == "0" else "on"


def blas_threads() -> str:
    try:
        from threadpoolctl import threadpool_info
        counts = sorted({i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"})
        counts = "/".join(map(str, counts)) or "unknown"
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    from ..fast import threads
    if threads.ENABLED:  # nnopt sets them per product: by its size and the machine's load
        return f"{counts} (nnopt's policy: the free cores)"
    return counts


def versions() -> str:
    import matplotlib
    import numpy as np
    from .. import __version__
    parts = [f"nnopt {__version__}", f"Python {sys.version.split()[0]}", f"NumPy {np.__version__}",
             f"matplotlib {matplotlib.__version__}"]
    try:
        import numba
        parts.append(f"numba {numba.__version__}")
    except ImportError:
        pass
    return ", ".join(parts) + f"; {platform.platform()}"


def seed_range(seeds) -> str:
    return f"Seed {seeds[0]}" if len(seeds) == 1 else f"Seeds {seeds[0]}-{seeds[-1]} ({len(seeds)})"


def write(ctx: Context, sections, seconds: float, name="report.md") -> Path:
    claims = [c for s in sections for c in s.claims]
    lines = ["# nnopt: the chapter's experiments", "",
             f"{seed_range(ctx.seed_list)}; device {ctx.device}; "
             + (f"data for the BN run: {ctx.dataset}; " if any("Batch Normalization" in s.title
                                                              for s in sections) else "") +
             f"{'quick settings' if ctx.quick else 'full settings'}; {seconds:.1f} s in all; "
             f"fast paths {fast_path_state()}; BLAS threads {blas_threads()}.", "",
             f"Versions: {versions()}.", ""]
    if claims:
        lines += ["## Summary: every textbook claim, our measurement over seeds, and the verdict",
                  "", f"Rule: {RULE}. Every claim is also in `claims.json`.", "",
                  "| experiment | claim | textbook | ours | held in | verdict |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {c.experiment} | {c.claim} | {c.textbook} | {c.reason} | {c.held_text} "
                  f"| {c.verdict_text} |" for c in claims]
        lines.append("")
    for section in sections:
        lines += [f"## {section.title}", "", *section.lines]
    path = Path(ctx.out) / name
    path.write_text("\n".join(lines) + "\n")
    (Path(ctx.out) / "claims.json").write_text(
        json.dumps({"rule": RULE, "seeds": ctx.seed_list, "quick": ctx.quick,
                    "claims": [c.to_json() for c in claims]}, indent=2) + "\n")
    return path


def figure_module():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11,
                         "xtick.labelsize": 10, "ytick.labelsize": 10, "legend.fontsize": 10,
                         "figure.titlesize": 13, "savefig.dpi": 150,
                         # Titles at a fixed height: placing them "automatically" measured
                         # every axis's tick labels again, for titles that never move here.
                         "axes.titley": 1.0})
    return plt


#: ``savefig`` options: slide resolution, and zlib level 3 rather than PIL's 6 (a third
#: less time writing the PNG, files within a quarter of the size).
PNG = {"dpi": 150, "pil_kwargs": {"compress_level": 3}}


def save_figure(fig, path, title=None, *, left, bottom, right, top, wspace=0.0, hspace=0.0):
    """Title, lay out (margins in inches: :func:`place`), write at slide resolution
    (150 dpi) and free ``fig``."""
    import matplotlib.pyplot as plt
    if title:
        # A fixed 0.12 inch below the top edge, whatever the figure's height.
        fig.suptitle(title, y=1 - 0.12 / fig.get_figheight(), va="top")
    place(fig, left, bottom, right, top, wspace, hspace)
    fig.savefig(path, **PNG)
    plt.close(fig)


def place(fig, left, bottom, right, top, wspace=0.0, hspace=0.0):
    """Lay out ``fig``'s grid of panels with margins, and gaps between panels, in inches.

    The fonts have fixed sizes in points, so the room their labels take is fixed in inches
    too, whatever the figure's size; ``tight_layout`` measured every label by laying out
    the whole figure once more before saving it, about half the time of a figure."""
    width, height = fig.get_size_inches()
    rows, columns = fig.axes[0].get_subplotspec().get_gridspec().get_geometry()
    panel_width = (width - left - right - (columns - 1) * wspace) / columns
    panel_height = (height - bottom - top - (rows - 1) * hspace) / rows
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, wspace=wspace / panel_width,
                        hspace=hspace / panel_height)
