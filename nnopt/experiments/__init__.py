"""The chapter's experiments: ``python -m nnopt.experiments NAME [--out DIR] [--quick]``.

Each experiment returns a report :class:`~nnopt.experiments.report.Section` with its
figures, tables and the textbook claims it checks; ``all`` runs them into one report.
"""
from . import batchnorm, contours, initialization, optimizers

EXPERIMENTS = {"init": initialization.run, "optimizers": optimizers.run,
               "contours": contours.run, "bn": batchnorm.run}
