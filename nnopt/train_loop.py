"""The training loop's helpers: one step (replayed from a captured CUDA graph on the GPU),
the training window's sums, evaluation over a split, the progress bar, stop requests."""
from __future__ import annotations

import contextlib
import signal
import sys

import numpy as np

from . import distributed
from .backend import backend_name


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so the run stops at a
    consistent point and saves a checkpoint; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def evaluate(model, x, y, loss_fn, batch=4096):
    """Mean loss and accuracy (inference mode) over a whole split (a non-finite loss is a
    value the run reports, not a NumPy warning)."""
    xp = model.xp
    total_loss, correct, n = 0.0, 0, x.shape[0]
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, n, batch):
            xb, yb = x[start:start + batch], y[start:start + batch]
            logits = model.forward(xb, train=False)
            total_loss += float(loss_fn.forward(logits, yb)) * xb.shape[0]
            correct += int(xp.sum(xp.astype(xp.argmax(logits, axis=1) == yb, xp.int64)))
    return total_loss / n, correct / n


class ProgressBar:
    """One tqdm bar per epoch (rate, ETA, the last check's losses), on a terminal only;
    each epoch then leaves one log line (:func:`format_epoch`)."""

    def __init__(self, enabled):
        self.enabled = enabled
        self.bar = None

    def start(self, epoch, epochs, done, total):
        if self.enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch}/{epochs}",
                            unit="step", leave=False, file=sys.stderr, dynamic_ncols=True)

    def update(self):
        if self.bar is not None:
            self.bar.update()

    def postfix(self, record):
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['train_loss']:.4f}",
                                 acc=f"{100 * record['train_accuracy']:.1f}%",
                                 val_loss=f"{record['val_loss']:.4f}", refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Window:
    """Training loss and correct predictions since the last flush, summed where the arrays
    live (no host synchronisation per step on a GPU); flushed into the state at checks."""

    def __init__(self, xp, skip_nonfinite=False, comm=distributed.LOCAL):
        self.xp, self.comm = xp, comm
        # On the host a float() of the loss costs nothing: stop at the first NaN step.
        self.on_host = backend_name(xp) == "numpy"
        self.check_each_step = self.on_host or skip_nonfinite
        self.reset()

    def reset(self):
        if self.on_host:  # Python numbers: the same float64 sums, without ~20 us of array calls a step
            self.loss, self.correct = 0.0, 0
        else:
            self.loss = self.xp.zeros((), dtype=self.xp.float64)
            self.correct = self.xp.zeros((), dtype=self.xp.int64)
        self.samples = 0

    def add(self, loss, prob, labels):
        if self.on_host:
            self.loss += float(loss) * labels.shape[0]
            self.correct += int(np.count_nonzero(np.argmax(prob, axis=1) == labels))
        else:
            xp = self.xp
            self.loss += xp.astype(loss, xp.float64) * labels.shape[0]
            self.correct += xp.sum(xp.astype(xp.argmax(prob, axis=1) == labels, xp.int64))
        self.samples += labels.shape[0]

    def _global_sums(self):
        sums = np.array([float(self.loss), int(self.correct), self.samples], dtype=np.float64)
        self.comm.allreduce_sum(sums)  # distributed: the global batch's sums, on every rank
        self.reset()
        return float(sums[0]), int(sums[1]), int(sums[2])

    def stash_into(self, state):
        """A stop cuts the window short: its sums wait in the state (the checkpoint) for
        :meth:`resume_from`."""
        state.pending_loss, state.pending_correct, state.pending_samples = self._global_sums()

    def resume_from(self, state):
        """Go on from a window a stop cut short, summing on from its sums as the
        uninterrupted run did (distributed: rank 0 holds them, the others start at 0)."""
        if self.comm.is_root:
            self.loss += state.pending_loss
            self.correct += state.pending_correct
            self.samples += state.pending_samples
        state.pending_loss, state.pending_correct, state.pending_samples = 0.0, 0, 0

    def flush_into(self, state):
        loss, correct, samples = self._global_sums()
        state.window_loss += loss
        state.window_correct += correct
        state.window_samples += samples
        state.epoch_loss += loss
        state.epoch_correct += correct
        state.epoch_samples += samples


class Stepper:
    """One optimization step on a batch: replayed from a captured CUDA graph on the GPU
    (full batches, when capture works), else run eagerly. Returns (loss, softmax output)."""

    def __init__(self, model, optimizer, loss_fn, batch, use_graph, log, comm=distributed.LOCAL):
        self.model, self.optimizer, self.loss_fn, self.comm = model, optimizer, loss_fn, comm
        self.captured = None
        if use_graph and backend_name(model.xp) == "cupy":
            from .graph import CapturedStep
            try:
                self.captured = CapturedStep(model, optimizer, loss_fn,
                                             (batch, model.layers[0].n_in), (batch,))
                log(f"CUDA graph: one captured training step of batch {batch}, replayed")
            except Exception as exc:  # capture is an optimisation: run eagerly instead
                log(f"CUDA graph capture unavailable ({type(exc).__name__}: {exc}); running eagerly")

    def __call__(self, xb, yb):
        if self.captured is not None and xb.shape[0] == self.captured.x.shape[0]:
            return self.captured.step(xb, yb), self.captured.prob
        self.model.zero_grad()
        loss = self.model.loss_and_backward(xb, yb, self.loss_fn)
        self.comm.allreduce_mean(self.model.flat.grad)  # distributed: one collective per step
        self.optimizer.step()
        return loss, self.loss_fn.prob

    def stream(self):
        """Where the whole loop's device work goes: the captured graph's stream."""
        return self.captured.stream if self.captured is not None else contextlib.nullcontext()

    def release(self):
        if self.captured is not None:
            self.captured.release()
