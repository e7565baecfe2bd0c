r"""Linear -> [BatchNorm] -> [activation] as one layer, with fused passes.

The textbook's network is four FC -> BN -> ReLU blocks and an FC. Layer by layer, a
block is three forward and three backward calls, each with its own Python dispatch and
its own pass over memory; at a batch of 64 that dispatch, not the arithmetic, is what a
step costs. A :class:`Block` owns the three layers and, on NumPy (numba kernels) or CuPy
(CUDA kernels, kernels/batchnorm.cu) float32/float64 in training mode, runs

* forward: the product :math:`h = xW` (BLAS), then one pass that takes BN's statistics
  of h and writes :math:`y = \mathrm{act}(\mathrm{BN}(h))` (without BN: :math:`y =
  \mathrm{act}(h + b)`);
* backward: one pair of passes for the activation's gradient (from y alone), BN's
  backward and :math:`d\gamma, d\beta` (without BN: the bias gradient), giving
  :math:`dh`; then the two products :math:`dW = x^T dh` and :math:`dx = dh\,W^T`.

On the GPU, for batches of at most 64 rows (``nnopt.fast.plan.fuses_product``), the
products join the passes too: forward, one kernel computes :math:`h = xW` and runs the
pass on it; backward, a block leaves its input gradient :math:`dh\,W^T` to the block
before it (a :class:`DeferredInputGrad`, where ``nnopt.Sequential`` wires blocks in a
row), whose own backward kernel computes it, runs its pass on it and computes the weight
gradient :math:`x^T dh` too (each CUDA block 32 of its rows). What remains a cuBLAS
product (the last block's weight gradient, or any other where its kernel cannot take it)
runs, inside a model, on a side stream (``nnopt.fast.gpu.beside_main``), since nothing but
the optimizer waits for it; the model joins it at the end of its backward.

The layers themselves stay as they are, the readable reference: everywhere else
(array-api-strict, torch, inference mode, synchronized BN, ``use_fast_path=False``, and on
the CPU a BN block outside a model, whose parameters lie in no flat storage) the block
simply calls them in order, and the tests hold the fused passes to them.

**The Linear bias before BN.** BN subtracts the batch mean of :math:`h + b`, which is
the mean of h plus b: b cancels from BN's output, so in training mode it has no effect
on the loss and its gradient is exactly zero. The block keeps the parameter (the
textbook's layout, checkpoints and state dicts stay the same), skips adding it and
leaves its gradient at zero instead of summing rounding noise (the unfused layers
compute :math:`\sum_{batch} dx_{BN}`, zero up to rounding). The bias still shifts the
running mean, as it does layer by layer, so inference mode gives the same output.
"""
from __future__ import annotations

from .batchnorm import BatchNorm
from .errors import InputError, InputTypeError
from .fast import fast_for
from .layers import (ACTIVATIONS, Layer, Linear, check_dtype, check_grads_bound, check_input,
                     check_output_grad)

#: nnopt.layers' activation classes by the name the fused kernels know them by
ACTIVATION_NAMES = {cls: name for name, cls in ACTIVATIONS.items()}


class DeferredInputGrad:
    """A block's input gradient ``dh @ weight.T``, not yet computed: what a block's
    backward returns to the block before it (``defer_input_grad``), which computes the
    product inside its own backward kernel where it can, or calls :meth:`materialize`."""

    def __init__(self, fast, dh, weight, out):
        self.fast, self.dh, self.weight, self.out = fast, dh, weight, out

    def materialize(self):
        return self.fast.product(self.dh, self.weight.T, out=self.out)


class DeferredOutput:
    """The output ``x @ weight + bias`` of a network's last block (no BN, no activation),
    not yet computed: what ``Sequential.forward_to_loss`` hands the loss, which computes it
    inside its own kernel where it can (softmax cross-entropy on the GPU:
    ``nnopt.fast.gpu.linear_cross_entropy``), or calls :meth:`materialize`. Either way it
    lands in ``out``, the block's saved output."""

    def __init__(self, fast, x, weight, bias, out, scratch):
        self.fast, self.x, self.weight, self.bias = fast, x, weight, bias
        self.out, self.scratch = out, scratch

    def materialize(self):
        return self.fast.linear_activation_forward(self.x, self.weight, self.bias,
                                                   self.fast.ACTIVATION_CODES["identity"],
                                                   self.scratch, out=self.out)


def materialized(prediction):
    """``prediction`` itself, or a DeferredOutput's computed value."""
    return prediction.materialize() if isinstance(prediction, DeferredOutput) else prediction


class Block(Layer):
    """``Linear`` followed by an optional ``BatchNorm`` and an optional activation layer
    (``nnopt.layers``' ReLU, Sigmoid or Tanh), as one layer.

    ``layers`` are the three (or fewer) layers; ``params`` theirs, in their order (fc.W,
    fc.b, bn.gamma, bn.beta), so a model of blocks has the flat layout, parameter names
    and state dict of the same model layer by layer.
    """

    def __init__(self, linear, batchnorm=None, activation=None):
        if not isinstance(linear, Linear):
            raise InputTypeError(f"a Block starts with a Linear layer, got {linear!r}")
        if batchnorm is not None and not isinstance(batchnorm, BatchNorm):
            raise InputTypeError(f"a Block's second layer is a BatchNorm or None, got "
                                 f"{batchnorm!r} (an activation goes third: "
                                 "Block(linear, None, activation))")
        if batchnorm is not None and batchnorm.n != linear.n_out:
            raise InputError(f"BatchNorm({batchnorm.n}) cannot follow Linear({linear.n_in}, "
                             f"{linear.n_out}): give it n_features={linear.n_out}")
        if activation is not None and (not isinstance(activation, Layer) or activation.params):
            raise InputTypeError(f"a Block's third layer is an activation (ReLU, Sigmoid, "
                                 f"Tanh, or a Layer without parameters) or None, got "
                                 f"{activation!r}")
        self.linear = linear  # first: Layer.__init__ sets needs_input_grad, which is the Linear's
        super().__init__()
        self.batchnorm, self.activation = batchnorm, activation
        self.layers = tuple(layer for layer in (linear, batchnorm, activation) if layer is not None)
        self.params = tuple(p for layer in self.layers for p in layer.params)
        # None: an activation the fused kernels do not know; the block then runs its layers.
        self.activation_name = ("identity" if activation is None
                                else ACTIVATION_NAMES.get(type(activation)))
        self.scratch = None   # the fused passes' reusable buffers, made on first use
        self.bn_kernels = None  # on the CPU: fast.BoundBatchNorm, BN's passes bound to its arrays
        self.saved = None     # what a fused forward leaves for backward; None after a layered one
        self.grads_written = None  # the storage's zero_count when this block last wrote its gradients
        self.defer_input_grad = False  # set by nnopt.Sequential where a block comes before this one
        # set by nnopt.Sequential, which joins the side stream at the end of its backward
        self.weight_grad_beside = False
        self.joins = None  # the join of the side stream this block's weight gradient ran on

    @property
    def needs_input_grad(self):
        return self.linear.needs_input_grad

    @needs_input_grad.setter
    def needs_input_grad(self, value):
        self.linear.needs_input_grad = value

    def fused_kernels(self, x, train):
        """The numba kernels when this forward can be fused, else None."""
        bn = self.batchnorm
        if not train or self.activation_name is None:
            return None
        if bn is not None and (bn.sync or not bn.use_fast_path or len(x.shape) != 2
                               or x.shape[0] < 2):
            return None  # synchronized BN, the reference asked for, or BN's own error to raise
        fast = fast_for(x, self.linear.W.data)
        if fast is None or not hasattr(fast, "activation_forward"):
            return None
        if bn is not None and not fast.ON_GPU and self.bn_kernels is None:
            # (once made, no need to ask again: bound parameters never leave their storage)
            return fast if fast.BoundBatchNorm.takes(bn) else None
        return fast

    def forward(self, x, train=True, for_loss=False):
        """``for_loss`` (training mode; ``Sequential.forward_to_loss``): on the GPU, a
        :class:`DeferredOutput` where this block is a product and a bias (no BN, no
        activation) whose loss may compute it in its own launch (``fast.fuses_loss``); the
        backward then runs as after a fused forward."""
        self.saved = None
        linear = self.linear
        check_input(linear, x, linear.n_in)
        fast = self.fused_kernels(x, train)
        if fast is None:
            for layer in self.layers:
                x = layer.forward(x, train)
            return x
        check_dtype(linear, x, linear.W)
        if self.scratch is None:
            self.scratch = fast.Scratch()
        if fast.ON_GPU:
            return self._forward_gpu(fast, x, for_loss)
        return self._forward_cpu(fast, x)

    def _forward_cpu(self, fast, x):
        """The product (BLAS), then one numba pass: BN's statistics and output and the
        activation, or the bias and the activation."""
        linear, bn = self.linear, self.batchnorm
        code = fast.ACTIVATION_CODES[self.activation_name]
        h = fast.product(x, linear.W.data,
                         out=self.scratch.get("h", shape=(x.shape[0], linear.n_out), dtype=x.dtype))
        if bn is None:  # in place: the backward needs the activated output alone
            y = fast.activation_forward(h, linear.b.data, code, out=h)
            self.saved = (fast, code, x, None, y, None, None)
            return y
        kernels = self.bn_kernels
        if kernels is None or not kernels.fits(h):
            kernels = self.bn_kernels = fast.BoundBatchNorm(bn, linear.b.data, h, code)
        y = kernels.forward(h, self.scratch.get("y", h))
        self.saved = (fast, code, x, h, y, kernels.mean, kernels.inv_std)
        return y

    def _forward_gpu(self, fast, x, for_loss):
        """As on the CPU, but up to ``fast.fuses_product`` rows, the product runs inside
        the pass's kernel; and the last block may leave its output to the loss."""
        linear, bn = self.linear, self.batchnorm
        code = fast.ACTIVATION_CODES[self.activation_name]
        h = self.scratch.get("h", shape=(x.shape[0], linear.n_out), dtype=x.dtype)
        fused = fast.fuses_product(x.shape[0])
        if bn is None:
            if (for_loss and self.activation_name == "identity"
                    and fast.fuses_loss(x.shape[0], linear.n_out)):
                self.saved = (fast, code, x, None, h, None, None)
                return DeferredOutput(fast, x, linear.W.data, linear.b.data, h, self.scratch)
            if fused:
                y = fast.linear_activation_forward(x, linear.W.data, linear.b.data, code,
                                                   self.scratch, out=h)
            else:
                h = fast.product(x, linear.W.data, out=h)
                y = fast.activation_forward(h, linear.b.data, code, out=h)
            self.saved = (fast, code, x, None, y, None, None)
            return y
        if fused:
            y, mean, inv_std = fast.linear_bn_forward(
                x, linear.W.data, *self._bn_forward_args(), self.scratch, h=h,
                out=self.scratch.get("y", h), bias=linear.b.data, activation=code)
        else:
            h = fast.product(x, linear.W.data, out=h)
            y, mean, inv_std = fast.bn_forward(h, *self._bn_forward_args(),
                                               out=self.scratch.get("y", h),
                                               bias=linear.b.data, activation=code)
        self.saved = (fast, code, x, h, y, mean, inv_std)
        return y

    def _bn_forward_args(self):
        bn = self.batchnorm
        return (bn.gamma.data, bn.beta.data, bn.eps, bn.momentum, bn.unbiased,
                bn.buffers["running_mean"], bn.buffers["running_var"])

    def backward(self, dy):
        if self.saved is not None:  # the fused kernels index dy by the output's shape
            check_grads_bound(self)
            if not isinstance(dy, DeferredInputGrad):
                output = self.saved[4]
                check_output_grad(self, dy, output.shape, output.dtype)
        if isinstance(dy, DeferredInputGrad) and not (
                self.saved is not None and dy.fast is self.saved[0]
                and dy.fast.fuses_product(dy.dh.shape[0])):
            dy = dy.materialize()
        if self.saved is None:
            for layer in reversed(self.layers):
                dy = layer.backward(dy)
            self._note_grads_written()
            return dy
        if self.saved[0].ON_GPU:
            return self._backward_gpu(dy)
        return self._backward_cpu(dy)

    def _backward_cpu(self, dy):
        """One numba pass through the activation and BN (or the bias), then the two
        products."""
        fast, code, x, h, y, mean, inv_std = self.saved
        linear, bn = self.linear, self.batchnorm
        dh = self.scratch.get("dh", y)
        if bn is None:
            fast.activation_backward(dy, y, code, dbias=linear.b.grad, out=dh)
        else:  # linear.b.grad: zero by construction (module docstring), nothing to add
            self.bn_kernels.backward(dy, h, y, dh)
        self._add_weight_grad(fast, x, dh)
        if not linear.needs_input_grad:
            return None
        return fast.product(dh, linear.W.data.T, out=self.scratch.get("dx", x))

    def _backward_gpu(self, dy):
        """As on the CPU, but ``dy`` may be the next block's deferred input gradient,
        computed inside this block's kernel (with the weight gradient too, where
        ``fast.fuses_weight_grad``); inside a model, what only the optimizer waits for runs
        on a side stream; and this block's input gradient may be deferred in turn."""
        fast, code, x, h, y, mean, inv_std = self.saved
        linear, bn = self.linear, self.batchnorm
        deferred = isinstance(dy, DeferredInputGrad)
        beside = self.weight_grad_beside
        dh = self.scratch.get("dh", y)
        weight_grad = None
        if deferred and fast.fuses_weight_grad(linear.n_out, dy.dh.shape[1]):
            weight_grad = (x, linear.W.grad, not self._writes_weight_grad())
        if bn is None:
            if deferred:
                fast.linear_activation_backward(dy.dh, dy.weight, y, code, self.scratch,
                                                dbias=linear.b.grad, out=dh,
                                                weight_grad=weight_grad)
            elif (beside and self.activation_name == "identity" and dy.flags.c_contiguous
                  and dy.dtype == y.dtype):
                # dh is dy itself (the last block: the loss's gradient); what is left, the
                # bias gradient, is needed by the optimizer alone: beside the main stream
                copy = dh
                self._beside(fast, lambda: fast.activation_backward(
                    dy, y, code, dbias=linear.b.grad, out=copy))
                dh = dy
            else:
                fast.activation_backward(dy, y, code, dbias=linear.b.grad, out=dh)
        else:
            bn_args = (bn.gamma.data, mean, inv_std, bn.gamma.grad, bn.beta.grad)
            if deferred:
                fast.linear_bn_backward(dy.dh, dy.weight, h, y, *bn_args, self.scratch,
                                        out=dh, activation=code, weight_grad=weight_grad)
            else:
                fast.bn_backward(dy, h, *bn_args, out=dh, y=y, activation=code)
        if weight_grad is None:
            self._add_weight_grad(fast, x, dh, beside)
        else:
            self._note_grads_written()
        if not linear.needs_input_grad:
            return None
        out = self.scratch.get("dx", x)
        if self.defer_input_grad and beside and fast.fuses_product(x.shape[0]):
            return DeferredInputGrad(fast, dh, linear.W.data, out)
        return fast.product(dh, linear.W.data.T, out=out)

    def _add_weight_grad(self, fast, x, dh, beside=False):
        """W.grad += x^T dh; written directly when the gradients were zeroed since this
        block last wrote them (one pass over W.grad fewer, the common case of a step;
        FlatParameters.zero_count). ``beside``: on the GPU's side stream
        (nnopt.fast.gpu.beside_main): the rest of the backward pass does not wait for it;
        the model joins it at the end of its backward (:meth:`join_weight_grad`)."""
        if beside:
            self._beside(fast, lambda: self._add_weight_grad(fast, x, dh))
            return
        grad = self.linear.W.grad
        if self._writes_weight_grad():
            fast.product(x.T, dh, out=grad)
        else:
            grad += fast.product(x.T, dh, out=self.scratch.get("dW", grad))
        self._note_grads_written()

    def _writes_weight_grad(self):
        """Whether W.grad may be written instead of added to: zeroed since this block last
        wrote it (FlatParameters.zero_count)."""
        storage = self.linear.W.storage
        return storage is not None and storage.zero_count != self.grads_written

    def _beside(self, fast, work):
        """work() on the side stream of the GPU's current stream; joined by
        :meth:`join_weight_grad`."""
        fast.beside_main(work)
        self.joins = fast.join_side

    def join_weight_grad(self):
        """Wait (on the current stream) for this block's weight gradient where it ran on a
        side stream."""
        if self.joins is not None:
            self.joins()
            self.joins = None

    def _note_grads_written(self):
        storage = self.linear.W.storage
        self.grads_written = None if storage is None else storage.zero_count

    def __repr__(self):
        return "Block(" + ", ".join(repr(layer) for layer in self.layers) + ")"
