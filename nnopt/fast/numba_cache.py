"""numba's disk cache, made to notice changes in the other files a kernel compiles in.

numba keys a cached function on its own source file only. But nnopt's kernels compile
code of other files into themselves: the BN formulas of ``nnopt/batchnorm.py`` inside
``nnopt/fast/cpu.py``'s kernels, Adam's scalars of ``nnopt/optim/adaptive.py``, the update
rules of ``cpu.py`` inside the experiments' training loop (``nnopt/experiments/
curvefit.py``), constants of ``nnopt/fast/shared.py``. Edit one of those files and numba
kept loading the kernels compiled from its old text: silently wrong numbers (found by
mutating ``batchnorm_backward_coefficients``: after the file was restored, the BN tests
still failed, on the stale kernels).

So every nnopt function's cache is keyed on its file's text **and** on a digest of the
text of every ``.py`` file of the package (:func:`sources_digest`): an edit anywhere in
nnopt compiles its kernels again on next use (about 15 s for a training run), never
loads a stale one. Functions outside nnopt keep numba's own keys.

This takes numba's cache locators (``numba.core.caching``), which numba does not document
as a public API; where they are missing, numba's own per-file keys stay (the tests check
that the locators are in place on the numba installed).
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent  # nnopt/


def package_files(root: Path) -> list:
    """The ``.py`` files under ``root``, in a fixed order."""
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def sources_digest(root: Path = PACKAGE) -> bytes:
    """sha256 over the relative path and text of every ``.py`` file under ``root``
    (each read again only when its modification time or size changed)."""
    stats = tuple((str(p), *_stat(p)) for p in package_files(root))
    return _digest(str(root), stats)


def _stat(path):
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


@lru_cache(maxsize=8)
def _digest(root, stats):
    h = hashlib.sha256()
    for path, _, _ in stats:
        h.update(os.path.relpath(path, root).encode() + b"\0")
        h.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return h.digest()


def _locators(root: Path):
    """numba cache locators for the functions defined under ``root``, in numba's order:
    ``$NUMBA_CACHE_DIR`` where set, ``__pycache__`` beside the file, the user-wide folder;
    each with the package digest added to the source stamp. None where numba's internals
    are not as expected."""
    try:
        from numba.core import caching
        bases = (caching.UserProvidedCacheLocator, caching.InTreeCacheLocator,
                 caching.UserWideCacheLocator)
    except (ImportError, AttributeError):
        return None
    inside = str(root) + os.sep

    def make(base):
        class PackageLocator(base):
            package_root = root

            def get_source_stamp(self):
                return super().get_source_stamp(), sources_digest(root)

            @classmethod
            def from_function(cls, py_func, py_file):
                if not os.path.abspath(py_file).startswith(inside):
                    return None  # not ours: numba's own locators take it
                return super().from_function(py_func, py_file)
        PackageLocator.__name__ = PackageLocator.__qualname__ = f"Package{base.__name__}"
        return PackageLocator
    return [make(base) for base in bases]


def install(root: Path = PACKAGE) -> bool:
    """Put the package locators of ``root`` first in numba's list (once); False where
    numba's internals are not as expected (its own per-file keys then stay)."""
    try:
        from numba.core.caching import CacheImpl
        classes = CacheImpl._locator_classes
    except (ImportError, AttributeError):
        return False
    if any(getattr(c, "package_root", None) == root for c in classes):
        return True
    locators = _locators(root)
    if locators is None or not isinstance(classes, list):
        return False
    classes[:0] = locators
    return True


def is_cached(dispatcher):
    """Whether ``dispatcher`` (a ``numba.njit(cache=True)`` function) has code on disk
    compiled from the package's current text; None where numba's internals are not as
    expected."""
    try:
        return bool(dispatcher._cache._cache_file._load_index())
    except Exception:  # (numba's private API: any failure means "cannot tell")
        return None


INSTALLED = install()
