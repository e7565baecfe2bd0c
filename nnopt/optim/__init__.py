"""The chapter's seven optimizers (and AdamW), one class each, and their schedules."""
from ..errors import unknown_name
from .adaptive import AdaDelta, AdaGrad, Adam, AdamW, RMSProp
from .base import Optimizer
from .gd import NAG, SGD, Momentum
from .schedules import (CosineAnnealingLR, ExponentialLR, LRScheduler, MultiStepLR,
                        ReduceLROnPlateau, StepLR, cosine_decay, exponential_decay,
                        multistep_decay, step_decay)

OPTIMIZERS = {cls.__name__.lower(): cls
              for cls in (SGD, Momentum, NAG, AdaGrad, AdaDelta, RMSProp, Adam, AdamW)}


def create(name: str, params, **hyper) -> Optimizer:
    """``create("adam", model, lr=0.01)``: an optimizer by (case-insensitive) name."""
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise unknown_name("optimizer", name, OPTIMIZERS)
    return OPTIMIZERS[key](params, **hyper)


__all__ = ["Optimizer", "SGD", "Momentum", "NAG", "AdaGrad", "AdaDelta", "RMSProp", "Adam", "AdamW",
           "OPTIMIZERS", "create", "LRScheduler", "StepLR", "ExponentialLR", "CosineAnnealingLR",
           "MultiStepLR", "ReduceLROnPlateau", "step_decay", "multistep_decay",
           "exponential_decay", "cosine_decay"]
