"""nnopt: weight initialization, optimizers and Batch Normalization, on any array namespace."""
from . import init, optim
from .backend import get_namespace, to_numpy
from .batchnorm import BatchNorm
from .block import Block
from .layers import Linear, ReLU, Sigmoid, Tanh
from .losses import MSELoss, SoftmaxCrossEntropy
from .model import Sequential, mlp
from .params import FlatParameters, Parameter

__version__ = "0.1.0"
__all__ = ["init", "optim", "get_namespace", "to_numpy", "BatchNorm", "Block", "Linear", "ReLU",
           "Sigmoid", "Tanh", "MSELoss", "SoftmaxCrossEntropy", "Sequential", "mlp",
           "FlatParameters", "Parameter"]
