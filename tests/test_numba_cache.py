"""nnopt.fast.numba_cache: a kernel cached on disk is compiled again when any file of its
package changes, not only its own (numba's key), since kernels compile in formulas of
other files."""
import os
import subprocess
import sys

import numba

from nnopt.fast import cpu, numba_cache

KERNEL = """
import numba
from pathlib import Path
from nnopt.fast import numba_cache
numba_cache.install(Path(__file__).resolve().parent)
from . import formula

rule = numba.njit(cache=True)(formula.rule)


@numba.njit(cache=True)
def kernel(x):
    return rule(x) * 2.0


@numba.njit(cache=True)
def alone(x):
    return x * 2.0
"""


def run(root, code):
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=300,
                          env={**{k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"},
                               "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_a_kernel_compiles_again_when_a_formula_in_another_file_changes(tmp_path):
    """The hazard itself, in a package of two files: the kernel of kernel.py compiles in
    the rule of formula.py. After formula.py changes, a new process must not load the
    kernel cached with the old rule (numba's own key, kernel.py's text, has not changed)."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "kernel.py").write_text(KERNEL)
    formula = package / "formula.py"
    call = ("from pkg import kernel; from nnopt.fast.numba_cache import is_cached; "
            "before = is_cached(kernel.kernel); print(before, kernel.kernel(1.0), "
            "kernel.alone(1.0), type(kernel.kernel._cache._impl.locator).__name__, "
            "is_cached(kernel.kernel))")
    for added, wanted, was_cached in ((1.0, "4.0", "False"), (1.0, "4.0", "True"),
                                      (2.0, "6.0", "False"), (1.0, "4.0", "False")):
        formula.write_text(f"def rule(x):\n    return x + {added}\n")
        before, got, alone, locator, after = run(tmp_path, call)
        assert got == wanted and alone == "2.0", (added, got)
        assert (before, after) == (was_cached, "True"), (added, before, after)
        assert locator == "PackageInTreeCacheLocator"
    cached = {p.name for p in (package / "__pycache__").iterdir()}
    assert any(name.startswith("kernel.kernel") and name.endswith(".nbi") for name in cached)


def test_nnopts_kernels_are_keyed_on_the_whole_package():
    assert numba_cache.INSTALLED, "numba's cache locators are not where nnopt expects them"
    for kernel in (cpu.adam_rule, cpu.batchnorm_backward_coefficients):
        locator = kernel._cache._impl.locator
        assert getattr(locator, "package_root", None) == numba_cache.PACKAGE
        assert locator.get_source_stamp()[1] == numba_cache.sources_digest()
    outside = numba.njit(cache=True)(lambda x: x)  # (this test file: not nnopt's)
    assert not hasattr(outside._cache._impl.locator, "package_root")


def test_the_digest_follows_every_files_text(tmp_path):
    (tmp_path / "sub").mkdir()
    files = [tmp_path / "a.py", tmp_path / "sub" / "b.py"]
    for f in files:
        f.write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("not source")
    first = numba_cache.sources_digest(tmp_path)
    assert numba_cache.sources_digest(tmp_path) == first
    (tmp_path / "notes.txt").write_text("changed, and no source")
    assert numba_cache.sources_digest(tmp_path) == first
    files[1].write_text("x = 2\n")  # same size, other text
    second = numba_cache.sources_digest(tmp_path)
    assert second != first
    files[1].rename(tmp_path / "c.py")  # the same text under another name
    assert numba_cache.sources_digest(tmp_path) not in (first, second)
