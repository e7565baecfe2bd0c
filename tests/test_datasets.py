import gzip
import hashlib
import io
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from nnopt import datasets
from nnopt.datasets import DataError, Source, load_idx

SAMPLE_LABELS = datasets.SAMPLE_DIR / "t10k-labels-idx1-ubyte.gz"


def idx_images(count, rows=2, cols=3, magic=2051, payload=None):
    header = b"".join(int(v).to_bytes(4, "big") for v in (magic, count, rows, cols))
    body = payload if payload is not None else bytes(range(count * rows * cols))
    return header + body


def test_embedded_sample_split():
    data = datasets.load("mnist-sample")
    assert data.x_train.shape == (7600, 784) and data.x_val.shape == (400, 784)
    assert data.x_test.shape == (2000, 784)
    assert data.x_train.dtype == np.float32 and 0 <= data.x_train.min() and data.x_train.max() == 1
    assert set(np.unique(data.y_test)) == set(range(10))
    assert "not full MNIST" in data.description
    # The rule: every 5th official test image is a test image here.
    labels = load_idx(SAMPLE_LABELS, 10000)
    np.testing.assert_array_equal(data.y_test, labels[4::5])


def test_raw_and_gzipped_files_read_the_same(tmp_path):
    raw = gzip.decompress(SAMPLE_LABELS.read_bytes())
    (tmp_path / "labels").write_bytes(raw)
    md5s = datasets.SOURCES["mnist"].md5["t10k-labels-idx1-ubyte"]
    np.testing.assert_array_equal(load_idx(tmp_path / "labels", 10000, md5s),
                                  load_idx(SAMPLE_LABELS, 10000, md5s))


@pytest.mark.parametrize("data, match", [
    (idx_images(4)[:-5], "truncated"),
    (idx_images(4) + b"xx", "trailing bytes"),
    (idx_images(4, magic=1234), "magic number 1234"),
    (b"\x00\x00", "too short"),
    # sizes whose product overflows int64: still the byte count the header promises
    (idx_images(2**32 - 1, 2**32 - 1, 2**32 - 1, payload=b"x"),
     f"1 bytes of data where the header promises {(2**32 - 1) ** 3}"),
])
def test_broken_files(tmp_path, data, match):
    path = tmp_path / "f.gz"
    path.write_bytes(gzip.compress(data))
    with pytest.raises(DataError, match=match):
        load_idx(path)


def test_wrong_count_and_checksum(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(idx_images(4))
    assert load_idx(path, 4).shape == (4, 2, 3)
    with pytest.raises(DataError, match="header says 4 items, this data set has 5"):
        load_idx(path, 5)
    with pytest.raises(DataError, match="checksum mismatch"):
        load_idx(path, 4, {"0" * 32})
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + b"junk")
    with pytest.raises(DataError, match="damaged gzip"):
        load_idx(tmp_path / "bad.gz")
    # a valid gzip header over a damaged deflate stream: zlib's own error, named the same way
    (tmp_path / "bad2.gz").write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xff" * 40)
    with pytest.raises(DataError, match="bad2.gz: damaged gzip file"):
        load_idx(tmp_path / "bad2.gz")


def isolate(monkeypatch, tmp_path):
    monkeypatch.delenv("NNOPT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_offline_message_lists_files_and_alternatives(monkeypatch, tmp_path):
    isolate(monkeypatch, tmp_path)

    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(datasets.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as err:
        datasets.load("mnist")
    text = str(err.value)
    for stem in datasets.FILES:
        assert f"{stem}.gz" in text
    assert "mnist-sample" in text and "--data-dir" in text and "no network" in text


def fake_source(tmp_path):
    payloads = {"train-images-idx3-ubyte": idx_images(3, 28, 28, payload=bytes(3 * 784)),
                "train-labels-idx1-ubyte": idx_images(3, magic=2049)[:8] + bytes([1, 2, 3]),
                "t10k-images-idx3-ubyte": idx_images(2, 28, 28, payload=bytes(2 * 784)),
                "t10k-labels-idx1-ubyte": idx_images(2, magic=2049)[:8] + bytes([4, 5])}
    gz = {k: gzip.compress(v) for k, v in payloads.items()}
    counts = {"train-images-idx3-ubyte": 3, "train-labels-idx1-ubyte": 3,
              "t10k-images-idx3-ubyte": 2, "t10k-labels-idx1-ubyte": 2}
    source = Source("fake", counts, {k: {hashlib.md5(v).hexdigest()} for k, v in gz.items()},
                    ("https://mirror-a/", "https://mirror-b/"))
    return source, gz


def test_download_verifies_and_writes_atomically(monkeypatch, tmp_path):
    isolate(monkeypatch, tmp_path)
    source, gz = fake_source(tmp_path)
    monkeypatch.setitem(datasets.SOURCES, "fake", source)
    asked = []

    def urlopen(url, timeout=None):
        asked.append(url)
        if url.startswith("https://mirror-a/"):
            raise urllib.error.URLError("mirror a is down")
        return io.BytesIO(gz[url.rsplit("/", 1)[1][:-3]])
    monkeypatch.setattr(datasets.urllib.request, "urlopen", urlopen)
    data = datasets.load("fake", n_val=1)
    assert data.x_train.shape == (2, 784) and list(data.y_test) == [4, 5]
    folder = tmp_path / "cache" / "nnopt" / "fake"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s}.gz" for s in source.counts)
    # A second load finds the files in the cache and downloads nothing.
    asked.clear()
    datasets.load("fake", n_val=1)
    assert asked == []


def test_a_failed_download_keeps_its_whole_files_and_fetches_only_the_rest(monkeypatch, tmp_path):
    isolate(monkeypatch, tmp_path)
    source, gz = fake_source(tmp_path)
    monkeypatch.setitem(datasets.SOURCES, "fake", source)
    stems = list(source.counts)
    asked = []

    def urlopen(url, timeout=None):
        stem = url.rsplit("/", 1)[1][:-3]
        asked.append(stem)
        if stem == stems[2]:
            raise urllib.error.URLError("connection reset")
        return io.BytesIO(gz[stem])
    monkeypatch.setattr(datasets.urllib.request, "urlopen", urlopen)
    with pytest.raises(DataError) as err:
        datasets.load("fake", n_val=1)
    folder = tmp_path / "cache" / "nnopt" / "fake"
    assert (f"Kept in {folder} (whole, md5-checked): {stems[0]}.gz, {stems[1]}.gz; the next "
            "try fetches only the rest.") in str(err.value)
    # one of the kept files is damaged meanwhile: fetched again, the other is not
    (folder / f"{stems[1]}.gz").write_bytes(b"damaged")
    asked.clear()
    monkeypatch.setattr(datasets.urllib.request, "urlopen",
                        lambda url, timeout=None: (asked.append(url.rsplit("/", 1)[1][:-3]),
                                                   io.BytesIO(gz[url.rsplit("/", 1)[1][:-3]]))[1])
    assert datasets.load("fake", n_val=1).x_train.shape == (2, 784)
    assert asked == stems[1:]


@pytest.mark.parametrize("failure", ["cut", "not http"])
def test_a_cut_transfer_tries_the_next_mirror(monkeypatch, tmp_path, failure):
    """A transfer cut short (http.client.IncompleteRead) or a reply that is not HTTP
    (BadStatusLine) is not an OSError: it escaped as a traceback, and the next mirror was
    never asked."""
    import http.client
    isolate(monkeypatch, tmp_path)
    source, gz = fake_source(tmp_path)
    monkeypatch.setitem(datasets.SOURCES, "fake", source)

    class Cut(io.BytesIO):
        def read(self, *args):
            if failure == "cut":
                raise http.client.IncompleteRead(b"half", 100)
            raise http.client.BadStatusLine("SSH-2.0")

    def urlopen(url, timeout=None):
        if url.startswith("https://mirror-a/"):
            return Cut(b"")
        return io.BytesIO(gz[url.rsplit("/", 1)[1][:-3]])
    monkeypatch.setattr(datasets.urllib.request, "urlopen", urlopen)
    assert datasets.load("fake", n_val=1).x_train.shape == (2, 784)
    monkeypatch.setattr(datasets.urllib.request, "urlopen", lambda url, timeout=None: Cut(b""))
    with pytest.raises(DataError, match="IncompleteRead|BadStatusLine"):
        datasets.load("fake", tmp_path / "elsewhere")


def test_a_data_dir_that_cannot_be_a_folder_is_a_data_error(monkeypatch, tmp_path):
    isolate(monkeypatch, tmp_path)
    source, gz = fake_source(tmp_path)
    monkeypatch.setitem(datasets.SOURCES, "fake", source)
    monkeypatch.setattr(datasets.urllib.request, "urlopen",
                        lambda url, timeout=None: io.BytesIO(gz[url.rsplit("/", 1)[1][:-3]]))
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DataError, match="cannot write the downloaded .* choose another --data-dir"):
        datasets.load("fake", tmp_path / "file" / "sub")


def test_full_mnist_is_taken_gzipped_or_not():
    """The md5 of each file's raw bytes is known beside its .gz's (the README: "gzipped or
    not"); the training files' raw md5s were missing, so unpacked files were refused."""
    for stem, md5s in datasets.SOURCES["mnist"].md5.items():
        assert len(md5s) == 2, stem
    raw = gzip.decompress((datasets.SAMPLE_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert hashlib.md5(raw).hexdigest() in datasets.SOURCES["mnist"].md5["t10k-labels-idx1-ubyte"]


def test_download_rejects_bad_checksum(monkeypatch, tmp_path):
    isolate(monkeypatch, tmp_path)
    source, gz = fake_source(tmp_path)
    monkeypatch.setitem(datasets.SOURCES, "fake", source)
    monkeypatch.setattr(datasets.urllib.request, "urlopen",
                        lambda url, timeout=None: io.BytesIO(b"tampered"))
    with pytest.raises(DataError, match="checksum mismatch"):
        datasets.load("fake")
    folder = tmp_path / "cache" / "nnopt" / "fake"
    assert not folder.exists() or not any(folder.iterdir())  # no half or bad files left


def test_data_dir_is_searched_first(tmp_path, monkeypatch):
    isolate(monkeypatch, tmp_path)
    source, gz = fake_source(tmp_path)
    monkeypatch.setitem(datasets.SOURCES, "fake", source)
    (tmp_path / "mine").mkdir()
    for stem, payload in gz.items():
        (tmp_path / "mine" / f"{stem}.gz").write_bytes(payload)
    assert datasets.load("fake", data_dir=tmp_path / "mine", download_ok=False, n_val=1).x_test.shape == (2, 784)


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_debian_package(monkeypatch, tmp_path):
    isolate(monkeypatch, tmp_path)
    data = datasets.load("fashion-mnist", download_ok=False)
    assert data.x_train.shape == (57000, 784) and data.x_val.shape == (3000, 784)
    assert data.x_test.shape == (10000, 784)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="did you mean 'mnist'"):
        datasets.load("mnsit")


def test_offline_message_names_the_data_dir_it_looked_in(monkeypatch, tmp_path):
    isolate(monkeypatch, tmp_path)
    monkeypatch.setattr(datasets.urllib.request, "urlopen",
                        lambda url, timeout=None: (_ for _ in ()).throw(urllib.error.URLError("no network")))
    with pytest.raises(DataError) as err:
        datasets.load("mnist", data_dir=tmp_path / "mine")
    looked = str(err.value).split("Looked in:")[1]
    assert str(tmp_path / "mine") in looked
    # where to put the files: the --data-dir given, not places it will not look in
    assert f"into {tmp_path / 'mine'} (the --data-dir given" in str(err.value)
    assert "$NNOPT_DATA" not in str(err.value)


def test_damaged_sample_says_reinstall(monkeypatch, tmp_path):
    broken = tmp_path / "sample"
    broken.mkdir()
    for stem in datasets.SAMPLE_SOURCE.counts:
        (broken / f"{stem}.gz").write_bytes(gzip.compress(b"not idx"))
    monkeypatch.setattr(datasets, "SAMPLE_DIR", broken)
    datasets.load_sample.cache_clear()
    try:
        with pytest.raises(DataError, match="shipped inside nnopt.*reinstall nnopt"):
            datasets.load_sample()
    finally:
        datasets.load_sample.cache_clear()


def test_an_explicit_data_dir_is_the_only_place_looked_in(tmp_path, monkeypatch):
    """A --data-dir holding one of the four files: no copy in the cache stands in for it
    unasked, nothing is created there, and the error names the folder."""
    isolate(monkeypatch, tmp_path)
    source, gz = fake_source(tmp_path)
    monkeypatch.setitem(datasets.SOURCES, "fake", source)
    cached = tmp_path / "cache" / "nnopt" / "fake"
    cached.mkdir(parents=True)
    for stem, payload in gz.items():
        (cached / f"{stem}.gz").write_bytes(payload)
    assert datasets.load("fake", download_ok=False, n_val=1).x_test.shape == (2, 784)
    mine = tmp_path / "mine"
    mine.mkdir()
    stem = next(iter(gz))
    (mine / f"{stem}.gz").write_bytes(gz[stem])
    monkeypatch.setattr(datasets.urllib.request, "urlopen",
                        lambda url, timeout=None: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    with pytest.raises(DataError) as err:
        datasets.load("fake", data_dir=mine, n_val=1)
    assert str(mine) in str(err.value).split("Looked in:")[1]
    assert str(cached) not in str(err.value).split("Looked in:")[1]
    assert sorted(p.name for p in mine.iterdir()) == [f"{stem}.gz"]  # no folder made for it
