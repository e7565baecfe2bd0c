"""Data-parallel training over MPI (CPU) or NCCL (GPU): ``mpiexec -n N python -m nnopt.train
--distributed ...``.

Each of the N processes (ranks) holds the whole model and computes gradients on its shard
of every global batch; because every parameter's gradient lives in one flat buffer
(:class:`~nnopt.params.FlatParameters`), averaging them is one collective call per step,
between ``backward`` and ``optimizer.step()``. The optimizers never know: they see the
averaged gradient, the same on every rank, so the parameters stay identical everywhere.

The API::

    comm = distributed.init("cpu")         # MPI over mpi4py; "gpu": NCCL, bootstrapped over MPI
    comm.rank, comm.size, comm.is_root
    comm.allreduce_mean(model.flat.grad)   # in place
    comm.broadcast(model.flat.data)        # in place, from rank 0

Without ``init`` (or with one process) :data:`LOCAL` stands in: every collective is a
no-op, so single-process code needs no branches. Transports: NumPy arrays go through MPI
directly; CuPy arrays through NCCL when CuPy has it, else staged through host memory and
MPI (correct everywhere, slower). Synchronized Batch Normalization is in
:mod:`nnopt.sync_batchnorm`.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

from .backend import BackendUnavailable, asarray, is_cupy, is_numpy, namespace_of, to_numpy
from .errors import InputError

INSTALL_HINT = "pip install 'nnopt[distributed]' (mpi4py and the mpich wheel)"
#: Seconds a failing rank waits for the others to fail with it before MPI_Abort.
ABORT_TIMEOUT = float(os.environ.get("NNOPT_ABORT_TIMEOUT", "10"))
#: Seconds between a failing rank's message and its MPI_Abort. mpiexec (MPICH's hydra)
#: forwards a rank's stderr through its proxy, and an abort can end the job before the
#: proxy has passed the message on: with two jobs at once on a busy machine, 10 of 48
#: aborted jobs printed nothing at all, and 0 of 48 with this pause.
ABORT_GRACE = 1.0


class DistributedUnavailable(BackendUnavailable):
    """mpi4py (or an MPI library) is missing."""


class Communicator:
    """One process, no peers: the collectives are identities. The base of the others."""

    rank = 0
    size = 1
    transport = "single process"

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_sum(self, buf):
        """Sum ``buf`` over all ranks, in place; returns ``buf``."""
        return buf

    def allreduce_mean(self, buf):
        """Average ``buf`` (e.g. the flat gradient) over all ranks, in place; returns ``buf``."""
        if self.size > 1:
            self.allreduce_sum(buf)
            buf *= 1.0 / self.size
        return buf

    def broadcast(self, buf, root: int = 0):
        """Overwrite ``buf`` on every rank with root's, in place; returns ``buf``."""
        return buf

    def bcast_object(self, obj, root: int = 0):
        """A small picklable object (a metrics record) from root, on every rank."""
        return obj

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        return bool(flag)

    def fail(self, exc: BaseException, timeout: float) -> bool:
        """Called on a rank whose run raised ``exc``: True when every rank failed with it
        (the caller reports and exits normally); never returns otherwise (MPI_Abort)."""
        return True

    def __repr__(self):
        return f"{type(self).__name__}(rank {self.rank} of {self.size}, {self.transport})"


LOCAL = Communicator()
_current = LOCAL


def current() -> Communicator:
    """The communicator :func:`init` made (:data:`LOCAL` before that)."""
    return _current


def rank() -> int:
    return _current.rank


def size() -> int:
    return _current.size


def allreduce_mean(buf):
    return _current.allreduce_mean(buf)


def broadcast(buf, root: int = 0):
    return _current.broadcast(buf, root)


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise DistributedUnavailable(
            f"--distributed needs mpi4py and an MPI library: {INSTALL_HINT}; then launch "
            "with mpiexec -n N python -m nnopt.train --distributed ...") from exc
    return MPI


class MPICommunicator(Communicator):
    """Collectives over an mpi4py communicator. Arrays that are not NumPy (CuPy, torch)
    are staged through host memory: MPI libraries from wheels are not CUDA-aware."""

    transport = "MPI"

    def __init__(self, comm=None):
        MPI = _mpi()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        # Failure handling talks on its own communicator, so that its barrier can never be
        # matched against a collective the healthy ranks are blocked in.
        self.errcomm = self.comm.Dup()

    def _host_op(self, buf, op):
        if is_numpy(buf) and buf.flags.c_contiguous:
            op(buf)
            return buf
        host = to_numpy(buf).copy()
        op(host)
        buf[...] = asarray(host, namespace_of(buf), buf.dtype)
        return buf

    def allreduce_sum(self, buf):
        if self.size == 1:
            return buf
        return self._host_op(buf, lambda a: self.comm.Allreduce(self.MPI.IN_PLACE, a,
                                                                 op=self.MPI.SUM))

    def broadcast(self, buf, root: int = 0):
        if self.size == 1:
            return buf
        return self._host_op(buf, lambda a: self.comm.Bcast(a, root=root))

    def bcast_object(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root) if self.size > 1 else obj

    def any(self, flag: bool) -> bool:
        if self.size == 1:
            return bool(flag)
        return bool(self.comm.allreduce(int(bool(flag)), op=self.MPI.MAX))

    def fail(self, exc, timeout):
        if self.size == 1:
            return True
        # Wait (bounded) for the other ranks to fail too, as they do on a bad flag or file:
        # then each reports and exits. A rank failing alone would leave the others blocked
        # in their next collective forever, so it takes the whole job down instead.
        request = self.errcomm.Ibarrier()
        deadline = time.monotonic() + timeout
        while not request.Test():
            if time.monotonic() > deadline:
                sys.stderr.write(
                    f"nnopt: rank {self.rank} of {self.size} failed: {type(exc).__name__}: {exc}\n"
                    f"nnopt: the other ranks did not stop within {timeout:g} s "
                    "(NNOPT_ABORT_TIMEOUT); aborting the job with MPI_Abort\n")
                sys.stderr.flush()
                time.sleep(ABORT_GRACE)
                self.comm.Abort(1)
            time.sleep(0.01)
        return True


class NCCLCommunicator(MPICommunicator):
    """CuPy arrays reduced by NCCL on the current stream (no host copy); MPI carries
    the bootstrap (NCCL's unique id, from rank 0) and everything that is not on the GPU."""

    transport = "NCCL (bootstrapped over MPI)"

    def __init__(self, comm=None):
        super().__init__(comm)
        from cupy.cuda import nccl  # ImportError where CuPy was built without NCCL
        self.nccl = nccl
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0)
        self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._types = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}

    def _nccl_type(self, buf):
        kind = self._types.get(str(buf.dtype))
        if kind is None or not buf.flags.c_contiguous:
            return None
        return kind

    def allreduce_sum(self, buf):
        kind = self._nccl_type(buf) if is_cupy(buf) else None
        if kind is None:
            return super().allreduce_sum(buf)
        import cupy
        self.nccl_comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, kind,
                                 self.nccl.NCCL_SUM, cupy.cuda.get_current_stream().ptr)
        return buf

    def broadcast(self, buf, root: int = 0):
        kind = self._nccl_type(buf) if is_cupy(buf) else None
        if kind is None:
            return super().broadcast(buf, root)
        import cupy
        self.nccl_comm.bcast(buf.data.ptr, buf.size, kind, root,
                             cupy.cuda.get_current_stream().ptr)
        return buf


#: Where MPI launchers put the job's size and this process's rank: MPICH's hydra and Intel
#: MPI, Open MPI, PMIx.
LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
LAUNCHER_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def _from_launcher(names, least, outside):
    """The first of the environment variables ``names`` holding a whole number >= ``least``
    (read without initializing MPI), else ``outside``."""
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) >= least:
            return int(value)
    return outside


def launched_ranks() -> int:
    """How many processes the MPI launcher started for this job (1 outside mpiexec)."""
    return _from_launcher(LAUNCHER_SIZE_VARIABLES, 1, 1)


def launched_rank() -> int:
    """This process's rank in the launcher's job (0 outside mpiexec): a refusal every rank
    reaches is printed once."""
    return _from_launcher(LAUNCHER_RANK_VARIABLES, 0, 0)


def ranks_on_this_machine() -> int:
    """How many ranks of the MPI job share this machine (1 without mpi4py): they share
    its cores too."""
    try:
        from mpi4py import MPI
    except ImportError:
        return 1
    return MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED).Get_size()


def _select_gpu(comm) -> int:
    """Give each rank of a machine its own GPU (local rank modulo the GPU count), before
    CuPy touches one: several ranks sharing GPU 0 would be slow or run out of memory."""
    import cupy
    local = comm.Split_type(_mpi().COMM_TYPE_SHARED).Get_rank()
    device = local % cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(device).use()
    return device


def init(device: str = "cpu", log=None) -> Communicator:
    """Join the job mpiexec started (a job of one process without mpiexec) and make its
    communicator the current one. ``device="gpu"``: NCCL where CuPy provides it, else
    host-staged MPI (``log`` says which)."""
    global _current
    MPI = _mpi()
    comm = MPICommunicator()
    if str(device).lower() in ("gpu", "cuda", "cupy"):
        try:
            _select_gpu(MPI.COMM_WORLD)
            comm = NCCLCommunicator()
        except Exception as exc:  # no CuPy/NCCL/GPU: keep MPI; the backend reports a missing GPU
            if log is not None and comm.is_root:
                log(f"NCCL unavailable ({type(exc).__name__}: {exc}); "
                    "GPU gradients go through host memory and MPI")
    _current = comm
    return comm


@contextlib.contextmanager
def fail_together(comm: Communicator, timeout: float | None = None):
    """Run a rank's work so that an exception cannot leave the job hanging: when every
    rank raises (a bad flag), rank 0 re-raises (one report) and the others exit quietly;
    when one rank raises alone, it aborts the whole job after ``timeout`` seconds."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as exc:
        if comm.size == 1:
            raise
        comm.fail(exc, ABORT_TIMEOUT if timeout is None else timeout)
        if comm.is_root:
            raise
        raise SystemExit(130 if isinstance(exc, KeyboardInterrupt) else 2) from None


class AgreedStop:
    """A stop request (Ctrl-C, SIGTERM) every rank acts on at the same step: ranks that
    stopped at different steps would wait for each other's allreduce forever. Asked once
    per step; the ranks compare flags every ``every`` steps (a one-integer allreduce)."""

    def __init__(self, stop, comm: Communicator, every: int = 10):
        self.stop, self.comm, self.every, self.calls = stop, comm, every, 0

    @property
    def requested(self) -> bool:
        if self.comm.size == 1:
            return self.stop.requested
        self.calls += 1
        return self.calls % self.every == 0 and self.comm.any(self.stop.requested)


def shard(idx, comm: Communicator):
    """This rank's contiguous part of a global batch's sample indices (equal parts)."""
    if comm.size == 1:
        return idx
    m = idx.shape[0] // comm.size
    return idx[comm.rank * m:(comm.rank + 1) * m]


def check_batch(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise InputError(f"--batch-size {batch_size} does not split evenly over {world} ranks; "
                         f"use a multiple of {world} (the global batch is divided between ranks)")


def sync_parameters(model, comm: Communicator) -> None:
    """Rank 0's parameters and buffers on every rank (the start of a run: seeded
    initialization already agrees; this makes it independent of that)."""
    if comm.size == 1:
        return
    comm.broadcast(model.flat.data)
    for _, holder, key in model.named_buffers():
        comm.broadcast(holder[key])
