"""Collects each experiment's figures, tables and claims into one Markdown report."""
from __future__ import annotations

import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Claim:
    """A textbook statement, what we measured, and whether it held (None: not tested)."""
    experiment: str
    claim: str
    textbook: str
    ours: str
    held: bool | None


@dataclass
class Section:
    title: str
    lines: list = field(default_factory=list)
    claims: list = field(default_factory=list)

    def text(self, *paragraphs):
        self.lines += [*paragraphs, ""]

    def figure(self, path: Path, caption: str):
        self.lines += [f"![{caption}]({path.name})", "", f"*{caption}*", ""]

    def table(self, header, rows):
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("|" + "---|" * len(header))
        self.lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        self.lines.append("")

    def claim(self, claim, textbook, ours, held):
        self.claims.append(Claim(self.title, claim, textbook, ours, held))


@dataclass
class Context:
    out: Path
    quick: bool = False
    device: str = "cpu"
    seed: int = 0
    dataset: str = "mnist-sample"
    data_dir: str | None = None


def verdict(held):
    return {True: "yes", False: "**no**", None: "n/a"}[held]


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


def write(ctx: Context, sections, seconds: float, name="report.md") -> Path:
    lines = ["# nnopt: the chapter's experiments", "",
             f"Seed {ctx.seed}; device {ctx.device}; data for the BN run: {ctx.dataset}; "
             f"{'quick settings' if ctx.quick else 'full settings'}; {seconds:.1f} s in all.", "",
             f"Versions: {versions()}.", ""]
    claims = [c for s in sections for c in s.claims]
    if claims:
        lines += ["## Summary: every textbook claim, our measurement, and whether it held", "",
                  "| experiment | claim | textbook | ours | held |", "|---|---|---|---|---|"]
        lines += [f"| {c.experiment} | {c.claim} | {c.textbook} | {c.ours} | {verdict(c.held)} |"
                  for c in claims]
        lines.append("")
    for section in sections:
        lines += [f"## {section.title}", "", *section.lines]
    path = Path(ctx.out) / name
    path.write_text("\n".join(lines) + "\n")
    return path


def figure_module():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
