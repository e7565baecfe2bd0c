"""nnopt.cublas without a GPU: where the library is looked for, the failure messages, the
handle's call order, and the row-major-through-column-major GEMM arguments (checked by a
fake libcublas that does column-major BLAS on host memory)."""

import numpy as np
import pytest

from nnopt import cublas
from tests.emulated_gpu import FakeCublas as FakeLib


def touch(folder, name):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"")
    return str(folder / name)


def test_candidates_follow_the_documented_order(tmp_path):
    chosen = touch(tmp_path / "mine", "libcublas.so.13")
    wheel = touch(tmp_path / "site" / "nvidia" / "cu13" / "lib", "libcublas.so.13")
    wheel12 = touch(tmp_path / "site" / "nvidia" / "cublas" / "lib", "libcublas.so.12")
    toolkit = touch(tmp_path / "cuda" / "lib64", "libcublas.so.12")
    env = {"NNOPT_CUBLAS": str(tmp_path / "mine"), "CUDA_PATH": str(tmp_path / "cuda")}
    got = cublas.candidates(env, loaded=["/proc/loaded/libcublas.so.13"],
                            site_dirs=[str(tmp_path / "site")])
    assert got[:5] == [chosen, "/proc/loaded/libcublas.so.13", wheel, wheel12, toolkit]
    assert got[-len(cublas.LIB_NAMES):] == list(cublas.LIB_NAMES)
    # a file named directly is taken as is, and duplicates are dropped
    got = cublas.candidates({"NNOPT_CUBLAS": wheel}, loaded=[wheel], site_dirs=[])
    assert got[0] == wheel and got.count(wheel) == 1


def test_loaded_library_is_found_in_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /opt/x/nvidia/cu13/lib/libcublas.so.13\n"
                    "7f01-7f02 r--p 0 08:01 1 /opt/x/nvidia/cu13/lib/libcublas.so.13\n"
                    "7f02-7f03 r--p 0 08:01 2 /opt/x/nvidia/cu13/lib/libcublasLt.so.13\n"
                    "7f03-7f04 rw-p 0 00:00 0\n")
    assert cublas._loaded_in_process(str(maps)) == ["/opt/x/nvidia/cu13/lib/libcublas.so.13"]
    assert cublas._loaded_in_process(str(tmp_path / "missing")) == []


from tests.emulated_gpu import host_allocate as allocate  # noqa: E402


def counting_allocator():
    """(allocate, the byte counts it was asked for)."""
    made = []

    def counting(nbytes):
        made.append(nbytes)
        return allocate(nbytes)
    return counting, made


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True),
                                              (True, True)])
def test_row_major_gemm_through_column_major_cublas(rng, dtype, trans_a, trans_b):
    m, n, k = 7, 5, 3
    a = np.ascontiguousarray(rng.normal(size=(k, m) if trans_a else (m, k)), dtype)
    b = np.ascontiguousarray(rng.normal(size=(n, k) if trans_b else (k, n)), dtype)
    c = np.full((m, n), np.nan, dtype)
    lib = FakeLib()
    handle = cublas.Handle(lib, allocate, workspace_bytes=64)
    handle.set_stream(0)
    handle.gemm(dtype == np.float64, a.ctypes.data, b.ctypes.data, c.ctypes.data, m, n, k,
                trans_a, trans_b)
    want = (a.T if trans_a else a) @ (b.T if trans_b else b)
    np.testing.assert_allclose(c, want, rtol=1e-5)


def test_handle_sets_each_streams_workspace_after_the_stream():
    """cublasSetStream resets the workspace to cuBLAS's default pool (which may allocate,
    also inside a capture): nnopt sets the stream's own workspace again right after."""
    lib, (counting, made) = FakeLib(), counting_allocator()
    handle = cublas.Handle(lib, counting, workspace_bytes=64)
    handle.set_stream(1234)
    handle.set_stream(1234)  # no second call: cuBLAS must not be touched while capturing
    assert lib.calls == ["cublasCreate_v2", "cublasSetWorkspace_v2", "cublasSetStream_v2",
                         "cublasSetWorkspace_v2"]
    first = handle.workspace
    handle.set_stream(0)
    handle.set_stream(1234)
    assert handle.workspace is first and made == [64, 64]  # one workspace per stream
    assert lib.calls[-4:] == ["cublasSetStream_v2", "cublasSetWorkspace_v2"] * 2


def test_a_zero_byte_workspace_is_none_at_all():
    """A stream's workspace is sized when the stream is first seen (the handle's size or the
    one given); 0 bytes: cuBLAS gets a NULL workspace of 0 bytes, nothing is allocated."""
    lib, (counting, made), sizes = FakeLib(), counting_allocator(), []
    lib.cublasSetWorkspace_v2 = lambda handle, pointer, size: sizes.append(
        (pointer.value, size.value)) or 0
    handle = cublas.Handle(lib, counting, workspace_bytes=64)
    handle.set_stream(1234, workspace_bytes=0)
    assert made == [64] and sizes[-1] == (None, 0)  # the NULL stream's, then none for 1234
    handle.set_stream(99)
    handle.set_stream(1234, workspace_bytes=64)  # sized once: a graph may hold the old one
    assert made == [64, 64] and sizes[-2][1] == 64 and sizes[-1] == (None, 0)


def test_a_forgotten_stream_is_set_up_anew():
    """forget_stream (the stream died): its address, when CUDA gives it to a new stream, is
    a stream first seen (the size asked for now, and cublasSetStream called again even where
    the dead stream was the handle's current one); the old workspace is kept, not freed."""
    lib, (counting, made) = FakeLib(), counting_allocator()
    handle = cublas.Handle(lib, counting, workspace_bytes=64)
    handle.set_stream(1234)
    old = handle.workspace
    handle.forget_stream(1234)
    assert 1234 not in handle.workspaces and handle.retired[-1] is old
    calls = len(lib.calls)
    handle.set_stream(1234, workspace_bytes=0)
    assert lib.calls[calls:] == ["cublasSetStream_v2", "cublasSetWorkspace_v2"]
    assert handle.workspace[2] == 0 and made == [64, 64]
    handle.forget_stream(999)  # never seen: nothing to forget


def test_a_dead_owners_address_is_a_new_stream():
    """set_stream(..., owner=stream): once that object has died, its address is a new
    stream's (CUDA reuses a destroyed stream's address), set up anew at the size asked."""
    import gc

    class Owner:
        pass
    handle = cublas.Handle(FakeLib(), allocate, workspace_bytes=64)
    owner = Owner()
    handle.set_stream(1234, owner=owner)
    handle.set_stream(1234, workspace_bytes=0, owner=owner)  # alive: the same stream
    assert handle.workspace[2] == 64
    del owner
    gc.collect()
    handle.set_stream(1234, workspace_bytes=0, owner=Owner())
    assert handle.workspace[2] == 0 and len(handle.retired) == 1


def test_dead_streams_workspaces_are_freed_after_the_device_synchronized():
    """sweep retires the workspace of each stream whose owner died (a live one keeps its
    own); free_retired lets the retired ones go only after the device synchronized (a
    graph in flight may still use one), and synchronizes nothing where none is retired."""
    import gc
    import weakref

    class Owner:
        pass
    handle = cublas.Handle(FakeLib(), allocate, workspace_bytes=64)
    owners = [Owner() for _ in range(3)]
    for ptr, owner in enumerate(owners, start=100):
        handle.set_stream(ptr, owner=owner)
    memory = {ptr: weakref.ref(handle.workspaces[ptr][0]) for ptr in (100, 101, 102)}
    del owners[:2]
    gc.collect()
    handle.sweep()
    assert sorted(handle.workspaces) == [0, 102] and len(handle.retired) == 2
    alive_at_sync = []
    handle.free_retired(lambda: alive_at_sync.append(
        [memory[ptr]() is not None for ptr in (100, 101)]))
    assert alive_at_sync == [[True, True]]  # the synchronization came first
    assert handle.retired == [] and memory[100]() is None and memory[101]() is None
    assert memory[102]() is not None
    handle.free_retired(lambda: alive_at_sync.append("again"))
    assert alive_at_sync == [[True, True]]  # nothing retired: no synchronization
    handle.set_stream(102, owner=owners[0])
    assert handle.stream == 102 and handle.workspace[0] is memory[102]()


def test_workspace_size_from_the_environment():
    assert cublas.workspace_bytes({}) is None
    assert cublas.workspace_bytes({"NNOPT_CUBLAS_WORKSPACE": "0"}) == 0
    assert cublas.workspace_bytes({"NNOPT_CUBLAS_WORKSPACE": " 4194304 "}) == 4194304
    with pytest.raises(ValueError, match="NNOPT_CUBLAS_WORKSPACE='4MB': give a number of bytes"):
        cublas.workspace_bytes({"NNOPT_CUBLAS_WORKSPACE": "4MB"})


@pytest.mark.parametrize("m, n, k, sms, pays", [
    (64, 128, 784, 132, True),     # batch 64, first layer: 8 tiles, a long k
    (64, 64, 128, 132, False),     # the other products of that step: k too short
    (784, 128, 64, 132, False),    # a weight gradient at batch 64
    (8192, 128, 784, 132, False),  # 1024 tiles: the GPU is full without splitting
    (128, 64, 8192, 132, True),    # a weight gradient at batch 8192: 8 tiles, k = the batch
    (64, 128, 784, 8, False),      # a GPU that 8 tiles fill
])
def test_split_k_only_where_it_pays(m, n, k, sms, pays):
    from nnopt.fast.plan import split_k_pays
    assert split_k_pays(m, n, k, sms) is pays


def test_each_product_binds_the_workspace_it_needs_once():
    """gemm(split_k=False) gives cuBLAS no workspace (one kernel per product), True the
    stream's; cublasSetWorkspace runs only where that changes (it is a host-side setting,
    allowed inside a capture, and nothing is allocated)."""
    lib, sizes = FakeLib(), []
    lib.cublasSetWorkspace_v2 = lambda handle, pointer, size: sizes.append(size.value) or 0
    handle = cublas.Handle(lib, allocate, workspace_bytes=64)
    handle.set_stream(1234)
    a, b, c = (np.ones((2, 2), np.float32) for _ in range(3))
    p = lambda x: x.ctypes.data  # noqa: E731
    expected = [64, 64]  # the NULL stream's, then 1234's
    assert sizes == expected
    for split_k, binds in ((False, 0), (False, None), (True, 64), (True, None), (False, 0)):
        handle.gemm(False, p(a), p(b), p(c), 2, 2, 2, split_k=split_k)
        expected += [] if binds is None else [binds]  # None: already bound, no call
        assert sizes == expected
        np.testing.assert_array_equal(c, 2)
    handle.set_stream(99)  # cublasSetStream drops the workspace: bound again
    handle.set_stream(1234)
    handle.gemm(False, p(a), p(b), p(c), 2, 2, 2, split_k=True)
    assert sizes[-1] == 64 and handle.bound[1] == 64


def test_status_errors_are_named():
    lib = FakeLib()
    lib.cublasSetWorkspace_v2 = lambda *args: 7
    with pytest.raises(cublas.CublasError, match="cublasSetWorkspace_v2 failed: CUBLAS_STATUS_INVALID_VALUE"):
        cublas.Handle(lib, allocate)


def test_load_reports_every_failure():
    def loader(path):
        if path == "/a/libcublas.so.11":
            return FakeLib(missing=("cublasSetWorkspace_v2",))
        raise OSError(f"{path}: cannot open shared object file")
    with pytest.raises(cublas.CublasUnavailable) as err:
        cublas.load(["/a/libcublas.so.11", "/b/libcublas.so.13", "libcublas.so"], loader, env={})
    message = str(err.value)
    assert "/a/libcublas.so.11: lacks cublasSetWorkspace_v2" in message
    assert "/b/libcublas.so.13: /b/libcublas.so.13: cannot open" in message
    assert "libcublas.so: not found" in message
    assert "set NNOPT_CUBLAS" in message and "\n" not in message
    lib, path = cublas.load(["/x/nope", "/ok/libcublas.so.13"],
                            lambda p: FakeLib() if p.startswith("/ok") else loader(p), env={})
    assert path == "/ok/libcublas.so.13" and isinstance(lib, FakeLib)


def test_load_can_be_turned_off():
    with pytest.raises(cublas.CublasUnavailable, match="turned off by NNOPT_CUBLAS=off"):
        cublas.load(env={"NNOPT_CUBLAS": "off"})


def test_load_with_nothing_found_on_this_machine(tmp_path):
    """The real candidate list on a machine where none of them loads (as without CUDA,
    whatever this machine has): one line, naming the library names."""
    def nothing_loads(path):
        raise OSError(f"{path}: cannot open shared object file: No such file or directory")
    with pytest.raises(cublas.CublasUnavailable) as caught:
        cublas.load(loader=nothing_loads, env={"CUDA_PATH": str(tmp_path)})
    message = str(caught.value)
    assert "libcublas.so.13" in message and "\n" not in message
    assert "set NNOPT_CUBLAS to the libcublas file CuPy uses" in message


def test_handle_cache_warns_once_and_falls_back():
    warnings = []
    cache = cublas.HandleCache(warnings.append)
    tries = []

    def broken():
        tries.append(1)
        raise cublas.CublasUnavailable("no usable libcublas (libcublas.so: not found)")
    assert cache.route(0) == "unknown"
    assert cache.get(0, broken) is None and cache.get(0, broken) is None
    assert len(tries) == 1 and len(warnings) == 1
    assert "tiled GEMM" in warnings[0] and "libcublas.so: not found" in warnings[0]
    assert cache.route(0).startswith("tiled (no usable libcublas")
    good = cublas.Handle(FakeLib(), allocate, path="/lib/libcublas.so.13")
    assert cache.get(1, lambda: good) is good and cache.get(1, broken) is good
    assert cache.route(1) == "cublas /lib/libcublas.so.13"
