"""A training step captured once as a CUDA graph and replayed (CuPy).

Replaying one graph costs one launch instead of the ~100 kernel launches (and Python
work) of a step of the textbook network, which at batch 64 is what a GPU step costs.
What makes it capturable: inputs are copied into static buffers; the loss stays on the
device; the optimizer's step count lives on the device where its kernel scalars depend on
it (Adam's bias corrections are computed there; the others' scalars are constants of the
graph, one node fewer); matrix products run cuBLAS through a handle of nnopt's own (CuPy refuses
cuBLAS calls during capture; nnopt.cublas), bound to the capture stream with its workspace
before the capture begins (each product given it or not: cuBLAS's split-K pairs only where
they pay, nnopt.fast.plan.split_k_pays), or nnopt's tiled GEMM where cuBLAS cannot load
(the weight-gradient products on a side stream of the capture stream, forked and joined by
events: parallel branches of the graph, nnopt.fast.gpu.beside_main); every
temporary comes from a private memory pool that only the graph uses, so its addresses stay valid between replays (the warm-up step's buffers too, and the
step holds every scratch buffer the graph writes into, so none is ever handed back to an
eager allocation). The graph runs on a stream of its own, ordered both ways with the
caller's stream: after the work queued there (the batch), before what comes next (reading
the loss, an eager step). Hyper-parameters (the learning rate, ...) are arguments of the
captured kernels: when a scheduler or the user changes one, the next ``step`` captures
the graph again.
"""
from __future__ import annotations

import numpy as np

from .backend import backend_name, to_numpy
from .fast import capture_mode


class GraphCaptureUnavailable(RuntimeError):
    pass


class CapturedStep:
    """``step(x, y)`` runs zero_grad, forward, loss, backward and ``optimizer.step()`` as
    one CUDA graph launch; returns the batch loss as a 0-d device array."""

    def __init__(self, model, optimizer, loss, x_shape, y_shape, y_dtype=None):
        if backend_name(model.xp) != "cupy":
            raise GraphCaptureUnavailable("CUDA graph capture needs the model on the GPU (device='gpu')")
        if optimizer.nonfinite != "ignore":
            raise GraphCaptureUnavailable("a captured step cannot check gradients on the host: "
                                          "use nonfinite='ignore'")
        import cupy
        from .fast import gpu
        self.cupy, self.gpu = cupy, gpu
        self.model, self.optimizer, self.loss = model, optimizer, loss
        xp = model.xp
        self.x = xp.zeros(tuple(x_shape), dtype=model.dtype)
        self.y = xp.zeros(tuple(y_shape), dtype=y_dtype or xp.int64)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        # recorded again at every step (no event made per step; no timing kept)
        self.batch_ready = cupy.cuda.Event(disable_timing=True)
        self.step_done = cupy.cuda.Event(disable_timing=True)
        self.pool = cupy.cuda.MemoryPool()
        self.gpu.prepare_capture(self.stream)  # the stream's cuBLAS workspace
        self._warm_up()
        self._capture()

    def _hyper_parameters(self):
        """What the captured kernels took as arguments: each group's settings."""
        return [{k: v for k, v in group.items() if k != "params"}
                for group in self.optimizer.param_groups]

    def _scratch_buffers(self):
        """Every buffer the layers and the loss keep for reuse: the graph writes into them."""
        owners = [*self.model.steps, *self.model.layers, self.loss]
        return [array for owner in owners if getattr(owner, "scratch", None) is not None
                for arrays in owner.scratch.arrays.values() for array in arrays]

    def _snapshot(self):
        model, opt = self.model, self.optimizer
        return (model.state_dict(), opt.state_dict())

    def _restore(self, snapshot):
        self.model.load_state_dict(snapshot[0])
        self.optimizer.load_state_dict(snapshot[1])

    def _body(self):
        # model.loss_and_backward, with zero_grad's fill beside the forward pass and the
        # loss (nothing reads a gradient before backward, which waits for it)
        self.gpu.beside_main(self.model.zero_grad)
        value, grad = self.loss.forward_backward(self.model.forward_to_loss(self.x, True), self.y)
        self.gpu.join_side()
        self.model.backward(grad)
        self.optimizer.step()
        return value

    def _warm_up(self):
        """One real step (compiles and loads every kernel before capture), then undone. Its
        buffers come from the graph's pool, which nothing else allocates from."""
        snapshot = self._snapshot()
        cupy, opt = self.cupy, self.optimizer
        cupy.cuda.get_current_stream().synchronize()
        try:
            with self.stream, capture_mode(), cupy.cuda.using_allocator(self.pool.malloc):
                # the kernels the capture launches: Adam's device-step ones where it counts
                # on the device (a kernel loaded during capture needs a CUDA 12.3+ driver)
                opt.device_steps = self._device_steps()
                self._body()
                scratch = cupy.zeros(1, dtype=cupy.int32)
                scratch += 1  # the device step counters' increment kernel
            self.stream.synchronize()
        finally:
            opt.device_steps = None
        self._restore(snapshot)

    def _device_steps(self):
        """Adam's scalars depend on t: a graph counts the steps on the device."""
        if type(self.optimizer).step_scalars is None:
            return None
        return [self.cupy.asarray(np.array([s["step"]], dtype=np.int32))
                for s in self.optimizer.state]

    def _capture(self):
        cupy, opt = self.cupy, self.optimizer
        opt.device_steps = self._device_steps()
        host_steps = [s["step"] for s in opt.state]
        cupy.cuda.get_current_stream().synchronize()
        self.gemm_route = self.gpu.prepare_capture(self.stream)
        captured = False
        try:
            with self.stream, capture_mode(), cupy.cuda.using_allocator(self.pool.malloc):
                self.stream.begin_capture()
                try:
                    value = self._body()
                finally:
                    graph = self.stream.end_capture()
            captured = True
        finally:
            for state, step in zip(opt.state, host_steps):  # the capture itself ran nothing
                state["step"] = step
            if not captured:
                opt.device_steps = None
        self.graph, self.loss_value = graph, value
        self.prob = self.loss.prob  # the captured softmax output, rewritten by every replay
        self.hyper = self._hyper_parameters()
        self.keep = self._scratch_buffers()

    def step(self, x, y):
        """Copy the batch into the static inputs and replay the graph. Returns the loss;
        ``self.prob`` holds the batch's softmax output."""
        if self.graph is None:  # released: its step counters are gone
            self._capture()
        elif self._hyper_parameters() != self.hyper:
            self.release()  # the step counts back on the host, then a graph with the new values
            self._capture()
        caller = self.cupy.cuda.get_current_stream()
        other = caller.ptr != self.stream.ptr
        if other:  # the batch may still be in flight on the caller's stream
            self.stream.wait_event(caller.record(self.batch_ready))
        with self.stream:
            self.x[...] = x
            self.y[...] = y
            self.graph.launch(self.stream)
        if other:  # what the caller queues next (reading the loss, ...) comes after the step
            caller.wait_event(self.stream.record(self.step_done))
        for state in self.optimizer.state:
            state["step"] += 1
        return self.loss_value

    def synchronize(self):
        self.stream.synchronize()

    def release(self):
        """Stop using device step counters (so the optimizer can run uncaptured again);
        the graph, which points at them, goes too: a later ``step`` captures anew."""
        self.synchronize()
        for state, counter in zip(self.optimizer.state, self.optimizer.device_steps or []):
            state["step"] = int(to_numpy(counter)[0])
        self.optimizer.device_steps = None
        self.graph = None
