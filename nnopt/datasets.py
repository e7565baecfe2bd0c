"""MNIST-style data sets in the IDX format: find, verify, download, split.

=================  ==========================================================================
``mnist-sample``   the default, shipped inside the package so it works offline: the 10,000
                   official MNIST *test* digits, split by a fixed rule: every 5th image
                   (index % 5 == 4) is a test image (2,000), the rest train (8,000).
                   It is not full MNIST: its numbers are not the textbook's.
``mnist``          60,000 / 10,000, found on disk or downloaded (md5 checked).
``fashion-mnist``  70,000 Zalando images, same format; also found where Debian's
                   ``dataset-fashion-mnist`` installs it.
=================  ==========================================================================

Validation: the first 3,000 training samples are held out, as in the textbook (400,
the same 5%, for ``mnist-sample``). Pixels are scaled to [0, 1].
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import urllib.request
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write
from .errors import InputError, NnoptError, unknown_name

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SAMPLE_DIR = Path(__file__).parent / "sample"


class DataError(NnoptError, RuntimeError):
    """A data file is missing, broken or not what it claims to be."""


@dataclass(frozen=True)
class Source:
    name: str
    counts: dict          # file stem -> number of items
    md5: dict             # file stem -> md5s accepted (of the .gz or of the raw bytes)
    mirrors: tuple = ()
    system_dirs: tuple = ()


SOURCES = {
    "mnist": Source(
        "mnist",
        {"train-images-idx3-ubyte": 60000, "train-labels-idx1-ubyte": 60000,
         "t10k-images-idx3-ubyte": 10000, "t10k-labels-idx1-ubyte": 10000},
        {"train-images-idx3-ubyte": {"f68b3c2dcbeaaa9fbdd348bbdeb94873",
                                     "6bbc9ace898e44ae57da46a324031adb"},
         "train-labels-idx1-ubyte": {"d53e105ee54ea40749a09fcbcd1e9432",
                                     "a25bea736e30d166cdddb491f175f624"},
         "t10k-images-idx3-ubyte": {"9fb629c4189551a2d022fa330f9573f3",
                                    "2646ac647ad5339dbf082846283269ea"},
         "t10k-labels-idx1-ubyte": {"ec29112dd5afa0611ce80d1b7f02629c",
                                    "27ae3e4e09519cfbb04c329615203637"}},
        ("https://ossci-datasets.s3.amazonaws.com/mnist/",
         "https://storage.googleapis.com/cvdf-datasets/mnist/",
         "http://yann.lecun.com/exdb/mnist/"),
        ("/usr/share/datasets/mnist",),
    ),
    "fashion-mnist": Source(
        "fashion-mnist",
        {"train-images-idx3-ubyte": 60000, "train-labels-idx1-ubyte": 60000,
         "t10k-images-idx3-ubyte": 10000, "t10k-labels-idx1-ubyte": 10000},
        {"train-images-idx3-ubyte": {"8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                     "f4a8712d7a061bf5bd6d2ca38dc4d50a"},
         "train-labels-idx1-ubyte": {"25c81989df183df01b3e8a0aad5dffbe",
                                     "9018921c3c673c538a1fc5bad174d6f9"},
         "t10k-images-idx3-ubyte": {"bef4ecab320f06d8554ea6380940ec79",
                                    "8181f5470baa50b63fa0f6fddb340f0a"},
         "t10k-labels-idx1-ubyte": {"bb300cfdad3c16e7a12a480ee83cd310",
                                    "15d484375f8d13e6eb1aabb0c3f46965"}},
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        ("/usr/share/datasets/fashion-mnist",),
    ),
}
DATASETS = ("mnist-sample", *SOURCES)
SAMPLE_SOURCE = Source("mnist-sample",
                       {k: v for k, v in SOURCES["mnist"].counts.items() if k.startswith("t10k")},
                       {k: v for k, v in SOURCES["mnist"].md5.items() if k.startswith("t10k")})


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray   # float32 in [0, 1], (n, 784)
    y_train: np.ndarray   # int64 labels
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    description: str


# --- the IDX format ---------------------------------------------------------------
def read_bytes(path: Path) -> bytes:
    return decompress(Path(path).read_bytes(), path)


def decompress(raw: bytes, path) -> bytes:
    """The IDX bytes of a file's contents, gunzipped when they are gzip data."""
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: damaged gzip file ({exc}); delete it and fetch it again") from None
    return raw


def parse_idx(data: bytes, path, expected_count=None) -> np.ndarray:
    """Parse IDX bytes (images: magic 2051, labels: 2049) after checking the header."""
    if len(data) < 8:
        raise DataError(f"{path}: {len(data)} bytes is too short for an IDX header; the file is truncated")
    magic, count = int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:8], "big")
    if magic == IMAGE_MAGIC:
        if len(data) < 16:
            raise DataError(f"{path}: truncated image header")
        rows, cols = int.from_bytes(data[8:12], "big"), int.from_bytes(data[12:16], "big")
        shape, offset = (count, rows, cols), 16
    elif magic == LABEL_MAGIC:
        shape, offset = (count,), 8
    else:
        raise DataError(f"{path}: not an MNIST IDX file (magic number {magic}, expected "
                        f"{IMAGE_MAGIC} for images or {LABEL_MAGIC} for labels)")
    if expected_count is not None and count != expected_count:
        raise DataError(f"{path}: header says {count} items, this data set has {expected_count}; "
                        "wrong or mixed-up file")
    need = math.prod(shape)  # Python ints: no overflow for a damaged header's sizes
    have = len(data) - offset
    if have != need:
        what = "truncated" if have < need else "has trailing bytes"
        raise DataError(f"{path}: {what}: {have} bytes of data where the header promises {need}; "
                        "delete it and fetch it again")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def load_idx(path, expected_count=None, md5s=None) -> np.ndarray:
    """Read one IDX file (gzipped or not), check its md5 (of the file or of its
    decompressed bytes) against ``md5s`` when given, and parse it."""
    path = Path(path)
    raw = path.read_bytes()
    data = decompress(raw, path)
    if md5s:
        digests = {hashlib.md5(raw).hexdigest(), hashlib.md5(data).hexdigest()}
        if not digests & set(md5s):
            raise DataError(f"{path}: checksum mismatch (md5 {hashlib.md5(data).hexdigest()} not "
                            f"among the published ones); the file is damaged or not the "
                            "expected one: delete it and fetch it again")
    return parse_idx(data, path, expected_count)


# --- finding and downloading --------------------------------------------------------
def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nnopt"


def _file_in(directory: Path, stem: str):
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def candidate_dirs(source: Source, data_dir=None) -> list[Path]:
    """Where the files are looked for: an explicit ``data_dir`` alone (a copy elsewhere
    standing in for it unasked would hide that it lacks files), else $NNOPT_DATA, the user
    cache and the system folders."""
    if data_dir:
        return [Path(data_dir) / source.name, Path(data_dir)]
    roots = []
    if os.environ.get("NNOPT_DATA"):
        roots.append(Path(os.environ["NNOPT_DATA"]))
    roots.append(cache_dir())
    dirs = []
    for root in roots:
        dirs += [root / source.name, root]
    return dirs + [Path(d) for d in source.system_dirs]


def check_sample_folder(name, data_dir) -> None:
    """The embedded sample reads no folder: a data_dir given with it would be ignored."""
    if name == "mnist-sample" and data_dir is not None:
        raise InputError(f"the data set mnist-sample is embedded in nnopt and reads no folder, "
                         f"so --data-dir {data_dir} would be ignored: name the data set of "
                         "the files there (--dataset mnist or fashion-mnist), or leave "
                         "--data-dir out")


def check_data_dir(data_dir) -> None:
    if data_dir and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir} is a file; give the folder that holds the "
                        "four IDX files")


def find_files(source: Source, data_dir=None) -> dict | None:
    for directory in candidate_dirs(source, data_dir):
        found = {stem: _file_in(directory, stem) for stem in source.counts}
        if all(found.values()):
            return found
    return None


def download(source: Source, target_dir: Path, timeout=30, data_dir=None) -> dict:
    """Fetch the four files from the first mirror that answers; each is written to a
    temporary file, md5-checked, then renamed into place (never a half file). A file an
    earlier, failed download left in ``target_dir`` (whole and md5-checked, as written) is
    kept and not fetched again."""
    found, errors = {}, []
    for stem in source.counts:
        kept = target_dir / f"{stem}.gz"
        if kept.is_file() and hashlib.md5(kept.read_bytes()).hexdigest() in source.md5[stem]:
            found[stem] = kept
            continue
        for mirror in source.mirrors:
            url = f"{mirror}{stem}.gz"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    payload = response.read()
            except (OSError, http.client.HTTPException) as exc:  # a cut transfer, a bad reply
                errors.append(f"{url}: {type(exc).__name__}: {exc}")
                continue
            if hashlib.md5(payload).hexdigest() not in source.md5[stem]:
                errors.append(f"{url}: checksum mismatch")
                continue
            try:  # the folder only once there is a file for it
                target_dir.mkdir(parents=True, exist_ok=True)
                atomic_write(kept, lambda out: out.write(payload))
            except OSError as exc:
                raise DataError(f"cannot write the downloaded {stem}.gz into {target_dir}: "
                                f"{exc.strerror or exc}; choose another --data-dir") from None
            found[stem] = kept
            break
        else:
            message = offline_message(source, errors, data_dir)
            if found:
                message += (f"\nKept in {target_dir} (whole, md5-checked): "
                            f"{', '.join(f'{stem}.gz' for stem in found)}; the next try fetches "
                            "only the rest.")
            raise DataError(message)
    return found


def offline_message(source: Source, errors=(), data_dir=None) -> str:
    files = "\n".join(f"  {stem}.gz" for stem in source.counts)
    looked = "\n".join(f"  {d}" for d in candidate_dirs(source, data_dir))
    tried = "\nDownload failed:\n  " + "\n  ".join(errors[:4]) if errors else ""
    return (f"data set {source.name!r} is not on this machine and could not be downloaded."
            f"{tried}\nPut these four files (gzipped or not):\n{files}\n"
            + (f"into {data_dir} (the --data-dir given, the only place looked in)"
               if data_dir else f"into --data-dir DIR, $NNOPT_DATA, or {cache_dir() / source.name}")
            + f".\nLooked in:\n{looked}\n"
            "Alternatives: --dataset mnist-sample (embedded, offline), or --dataset fashion-mnist "
            "after 'apt-get install dataset-fashion-mnist'.")


# --- the data sets -----------------------------------------------------------------------
def _scale(images):
    return images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255)


def _split_validation(name, x, y, x_test, y_test, n_val, description):
    if isinstance(n_val, bool) or not isinstance(n_val, (int, np.integer)) or not 0 < n_val < x.shape[0]:
        raise InputError(f"the validation size (n_val, --val-size) must be an integer between "
                         f"1 and {x.shape[0] - 1} for "
                         f"{name} ({x.shape[0]} training images), got {n_val!r}")
    return Dataset(name, x[n_val:], y[n_val:], x[:n_val], y[:n_val], x_test, y_test, description)


@lru_cache(maxsize=2)
def load_sample(n_val=None) -> Dataset:
    """The embedded sample (cached: its arrays are read-only, shared by every caller)."""
    files = {stem: SAMPLE_DIR / f"{stem}.gz" for stem in SAMPLE_SOURCE.counts}
    try:
        images = load_idx(files["t10k-images-idx3-ubyte"], 10000,
                          SAMPLE_SOURCE.md5["t10k-images-idx3-ubyte"])
        labels = load_idx(files["t10k-labels-idx1-ubyte"], 10000,
                          SAMPLE_SOURCE.md5["t10k-labels-idx1-ubyte"])
    except (DataError, OSError) as exc:
        raise DataError(f"the sample data shipped inside nnopt ({SAMPLE_DIR}) is damaged or "
                        f"missing: {str(exc).split(';')[0]}; reinstall nnopt "
                        "(pip install --force-reinstall nnopt, or git checkout nnopt/sample)") from None
    is_test = np.arange(10000) % 5 == 4
    x, y = _scale(images), labels.astype(np.int64)
    description = ("mnist-sample: the 10,000 official MNIST test digits shipped with nnopt, "
                   "split 8,000 train (first 400 held out for validation) / 2,000 test "
                   "(every 5th image); not full MNIST")
    data = _split_validation("mnist-sample", x[~is_test], y[~is_test], x[is_test], y[is_test],
                             default_val_size("mnist-sample") if n_val is None else n_val, description)
    for array in (data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test):
        array.flags.writeable = False
    return data


def default_val_size(name: str) -> int:
    """Images held out for validation: the textbook's 3,000 (5%), 400 of the sample."""
    return 400 if name == "mnist-sample" else 3000


def load(name="mnist-sample", data_dir=None, download_ok=True, n_val=None) -> Dataset:
    """Load a data set by name: ``mnist-sample`` (default), ``mnist``, ``fashion-mnist``."""
    if name == "mnist-sample":
        check_sample_folder(name, data_dir)
        return load_sample(n_val)
    if name not in SOURCES:
        raise unknown_name("data set", name, DATASETS)
    check_data_dir(data_dir)
    source = SOURCES[name]
    files = find_files(source, data_dir)
    if files is None:
        if not download_ok:
            raise DataError(offline_message(source, data_dir=data_dir))
        files = download(source, (Path(data_dir) if data_dir else cache_dir()) / source.name,
                         data_dir=data_dir)
    arrays = {stem: load_idx(path, source.counts[stem], source.md5[stem])
              for stem, path in files.items()}
    where = files["train-images-idx3-ubyte"].parent
    description = (f"{name}: 60,000 train (first 3,000 held out for validation) / 10,000 test, "
                   f"from {where}")
    return _split_validation(name, _scale(arrays["train-images-idx3-ubyte"]),
                             arrays["train-labels-idx1-ubyte"].astype(np.int64),
                             _scale(arrays["t10k-images-idx3-ubyte"]),
                             arrays["t10k-labels-idx1-ubyte"].astype(np.int64),
                             default_val_size(name) if n_val is None else n_val, description)
