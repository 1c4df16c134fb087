"""nin.data: real-data counts, genuine-format round trips, corrupt inputs, TensorLoader order and sharding."""

from __future__ import annotations

import gzip
import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import (
    balanced_labels,
    idx_bytes,
    random_images,
    write_cifar10_tree,
    write_cifar100_tree,
    write_cifar_binary,
    write_image_folder,
    write_mnist_tree,
    write_svhn_mat,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from nin.data import (
    DATASETS,
    DataError,
    TensorLoader,
    load_cifar10_lossless_first1000,
    load_dataset,
    resolve_root,
)
from nin.data.images import read_image
from nin.data.readers import read_cifar_binary, read_cifar_python, read_idx
from nin.errors import NinError

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
LOSSLESS_COUNTS = [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]


@pytest.fixture(scope="module")
def cifar10_train(data_root):
    return load_dataset("cifar10", "train", data_root)


# ---- real data ------------------------------------------------------------------------------------------------


def test_registry_matches_paper():
    assert DATASETS["cifar10"].paper_preprocessing == "gcn_zca"
    assert DATASETS["svhn"].paper_preprocessing == "gcn_lcn"
    assert DATASETS["mnist"].paper_preprocessing == "standardize"  # the paper gives none; [0, 1] stalls (datasets.py)
    assert (DATASETS["cifar100"].num_classes, DATASETS["mnist"].in_channels, DATASETS["mnist"].image_size) == (100, 1, 28)


@pytest.mark.parametrize(
    "name, split, counts",
    [
        ("mnist", "train", MNIST_TRAIN_COUNTS),
        ("mnist", "test", MNIST_TEST_COUNTS),
        ("fashion-mnist", "train", [6000] * 10),
        ("fashion-mnist", "test", [1000] * 10),
        ("cifar10", "test", [1000] * 10),
    ],
)
def test_real_counts(data_root, name, split, counts):
    dataset = load_dataset(name, split, data_root, verify=True)
    info = DATASETS[name]
    assert dataset.images.shape == (sum(counts), info.in_channels, info.image_size, info.image_size)
    assert dataset.images.dtype == torch.uint8 and dataset.labels.dtype == torch.int64
    assert torch.bincount(dataset.labels, minlength=10).tolist() == counts
    assert len(dataset.classes) == 10


def test_cifar10_train_counts_and_mean(cifar10_train):
    assert len(cifar10_train) == 50_000
    assert torch.bincount(cifar10_train.labels).tolist() == [5000] * 10
    assert cifar10_train.classes[0] == "airplane" and cifar10_train.classes[9] == "truck"
    mean = (cifar10_train.images.float() / 255).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor([0.4913, 0.4821, 0.4465]), atol=5e-4)
    assert cifar10_train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # official first labels


def test_cifar10_val_is_last_10000(data_root, cifar10_train):
    val = load_dataset("cifar10", "val", data_root)
    rest = load_dataset("cifar10", "train_minus_val", data_root)
    assert (len(val), len(rest)) == (10_000, 40_000)
    assert torch.equal(val.images, cifar10_train.images[40_000:])
    assert torch.equal(rest.labels, cifar10_train.labels[:40_000])


def test_lossless_first1000(data_root):
    dataset = load_cifar10_lossless_first1000(data_root)
    assert torch.bincount(dataset.labels).tolist() == LOSSLESS_COUNTS
    assert dataset.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert dataset.images[0, 0, 0, :5].tolist() == [158, 159, 165, 166, 160]  # published first row of test_batch
    assert torch.equal(load_dataset("cifar10-lossless-first1000", "test", data_root).labels, dataset.labels)


def test_resize_and_channel_conversion(data_root):
    dataset = load_dataset("mnist", "test", data_root, image_size=32, channels=3)
    assert dataset.images.shape == (10_000, 3, 32, 32) and dataset.images.dtype == torch.uint8


def test_resolve_root(monkeypatch, tmp_path):
    assert resolve_root(tmp_path) == tmp_path
    monkeypatch.setenv("NIN_DATA", str(tmp_path / "env"))
    assert resolve_root(None) == tmp_path / "env"
    monkeypatch.delenv("NIN_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_root(None) == tmp_path / "cache" / "nin"


# ---- genuine-format round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["bin", "py"])
def test_cifar10_layouts_round_trip(tmp_path, layout):
    images, labels = write_cifar10_tree(tmp_path, layout)
    dataset = load_dataset("cifar10", "train", tmp_path)
    assert torch.equal(dataset.images, torch.from_numpy(images))
    assert torch.equal(dataset.labels, torch.from_numpy(labels).long())
    assert dataset.classes == [f"class{i}" for i in range(10)]
    assert len(load_dataset("cifar10", "test", tmp_path)) == 20


@pytest.mark.parametrize("layout", ["bin", "py"])
def test_cifar100_layouts_round_trip(tmp_path, layout):
    written = write_cifar100_tree(tmp_path, layout)
    for split in ("train", "test"):
        dataset = load_dataset("cifar100", split, tmp_path)
        images, fine = written[split]
        assert torch.equal(dataset.images, torch.from_numpy(images))
        assert torch.equal(dataset.labels, torch.from_numpy(fine).long())  # the fine label, not the coarse one
        assert len(dataset.classes) == 100 and dataset.classes[7] == "fine7"


@pytest.mark.parametrize("folder, compress", [("mnist", True), ("MNIST/raw", False)])
def test_mnist_layouts_round_trip(tmp_path, folder, compress):
    written = write_mnist_tree(tmp_path / folder, compress=compress)
    dataset = load_dataset("mnist", "test", tmp_path)
    assert torch.equal(dataset.images[:, 0], torch.from_numpy(written["t10k"][0]))
    write_mnist_tree(tmp_path / "FashionMNIST/raw")
    assert len(load_dataset("fashion-mnist", "train", tmp_path)) == 30


def test_svhn_round_trip_and_splits(tmp_path):
    train_images, train_labels = random_images(4100, 1), balanced_labels(4100, 10)
    write_svhn_mat(tmp_path / "svhn" / "train_32x32.mat", train_images, train_labels)
    write_svhn_mat(tmp_path / "svhn" / "test_32x32.mat", random_images(50, 2), balanced_labels(50, 10))
    test = load_dataset("svhn", "test", tmp_path)
    assert test.labels.tolist() == balanced_labels(50, 10).tolist()  # stored 10 came back as 0
    train = load_dataset("svhn", "train", tmp_path)
    assert torch.equal(train.images, torch.from_numpy(train_images))
    val = load_dataset("svhn", "val", tmp_path)
    assert torch.bincount(val.labels).tolist() == [400] * 10
    assert len(load_dataset("svhn", "train_minus_val", tmp_path)) == 100

    write_svhn_mat(tmp_path / "svhn" / "extra_32x32.mat", random_images(2050, 3), balanced_labels(2050, 10))
    val = load_dataset("svhn", "val", tmp_path)
    assert torch.bincount(val.labels).tolist() == [600] * 10  # 400 per class from train + 200 from extra
    rest = load_dataset("svhn", "train_minus_val", tmp_path)
    assert len(rest) == 100 + 50 and len(load_dataset("svhn", "train", tmp_path)) == 4100 + 2050


def test_svhn_without_scipy_names_the_extra(tmp_path, monkeypatch, capsys):
    write_svhn_mat(tmp_path / "svhn" / "test_32x32.mat", random_images(10, 2), balanced_labels(10, 10))
    write_svhn_mat(tmp_path / "svhn" / "train_32x32.mat", random_images(10, 1), balanced_labels(10, 10))
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # as when scipy is not installed
    with pytest.raises(NinError, match=r'reading SVHN\'s .mat files needs the scipy package: pip install '
                                       r'"network-in-network\[svhn\]"'):
        load_dataset("svhn", "test", tmp_path)
    # the dry run finds the files, and says before the run that nothing here can read them
    from nin.cli import main
    from nin.data import dataset_files

    with pytest.raises(NinError, match="needs the scipy package"):
        dataset_files("svhn", tmp_path)
    assert main(["train", "--dataset", "svhn", "--data-dir", str(tmp_path), "--dry-run"]) == 1
    assert 'needs the scipy package: pip install "network-in-network[svhn]"' in capsys.readouterr().err


def test_dataset_files_finds_what_a_run_reads(tmp_path):
    from nin.data import dataset_files

    write_cifar100_tree(tmp_path, "py")
    assert [f.name for f in dataset_files("cifar100", tmp_path)] == ["train", "test"]
    write_svhn_mat(tmp_path / "svhn" / "train_32x32.mat", random_images(20, 1), balanced_labels(20, 10))
    with pytest.raises(DataError, match="test_32x32.mat: missing"):
        dataset_files("svhn", tmp_path)
    write_svhn_mat(tmp_path / "svhn" / "test_32x32.mat", random_images(20, 2), balanced_labels(20, 10))
    assert [f.name for f in dataset_files("svhn", tmp_path)] == ["train_32x32.mat", "test_32x32.mat"]
    write_svhn_mat(tmp_path / "svhn" / "extra_32x32.mat", random_images(20, 3), balanced_labels(20, 10))
    assert [f.name for f in dataset_files("svhn", tmp_path)] == ["train_32x32.mat", "extra_32x32.mat",
                                                                 "test_32x32.mat"]
    write_mnist_tree(tmp_path / "MNIST/raw", compress=False)
    (tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: missing"):
        dataset_files("mnist", tmp_path)
    assert len(dataset_files("mnist", tmp_path, ["train", "val"])) == 2  # a run on val never reads the test files
    with pytest.raises(DataError, match="image folder not found"):
        dataset_files("folder", tmp_path / "absent")
    (tmp_path / "svhn" / "test_32x32.mat").unlink()
    (tmp_path / "svhn" / "test_32x32.mat").mkdir()
    with pytest.raises(DataError, match="test_32x32.mat: not a file"):
        dataset_files("svhn", tmp_path)
    with pytest.raises(DataError, match="no svhn files found"):  # no svhn/ at all: not "the rest is in svhn/"
        dataset_files("svhn", tmp_path / "absent")


def test_dataset_files_of_an_image_folder_make_the_checks_a_run_makes(tmp_path):
    from nin.data import dataset_files

    write_image_folder(tmp_path / "a" / "train", {"cat": 3, "dog": 2})
    write_image_folder(tmp_path / "a" / "test", {"cat": 1, "dog": 1})
    assert len(dataset_files("folder", tmp_path / "a")) == 7
    assert len(dataset_files("folder", tmp_path / "a", ["train", "test"], val_split=0.5)) == 5  # held out of train/
    write_image_folder(tmp_path / "b" / "test", {"cat": 1, "dog": 1})
    with pytest.raises(DataError, match="train/ is missing"):
        dataset_files("folder", tmp_path / "b")
    (tmp_path / "c" / "cat").mkdir(parents=True)
    (tmp_path / "c" / "dog").mkdir()
    with pytest.raises(DataError, match="empty class folder"):
        dataset_files("folder", tmp_path / "c")
    write_image_folder(tmp_path / "d", {"cat": 2})
    with pytest.raises(DataError, match="one class sub-folder"):
        dataset_files("folder", tmp_path / "d")
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        dataset_files("folder", tmp_path / "e")


def test_image_folder_any_size_and_mode(tmp_path):
    write_image_folder(tmp_path / "train", {"cat": 3, "dog": 2}, size=(50, 20), mode="RGBA")
    write_image_folder(tmp_path / "train", {"emu": 1}, size=(7, 9), mode="L")
    write_image_folder(tmp_path / "test", {"cat": 1, "dog": 1, "emu": 1})
    dataset = load_dataset("folder", "train", tmp_path, image_size=16)
    assert dataset.images.shape == (6, 3, 16, 16) and dataset.classes == ["cat", "dog", "emu"]
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1, 2]
    assert load_dataset("folder", "test", tmp_path, channels=1).images.shape == (3, 1, 32, 32)
    flat = tmp_path / "flat"
    write_image_folder(flat, {"a": 2, "b": 2})
    assert len(load_dataset("folder", "train", flat)) == 4  # no split sub-folder: the root is the split


def test_image_folder_pixels_exact(tmp_path):
    pixels = random_images(1, 5, (32, 32, 3))[0]
    (tmp_path / "a").mkdir()
    Image.fromarray(pixels).save(tmp_path / "a" / "0.png")
    assert torch.equal(read_image(tmp_path / "a" / "0.png", 32, 3), torch.from_numpy(pixels).permute(2, 0, 1))


# ---- corrupt inputs: DataError naming the file ----------------------------------------------------------------


def _raises_naming(path: Path, call, match: str | None = None):
    with pytest.raises(DataError, match=match) as caught:
        call()
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_missing_file(tmp_path):
    _raises_naming(tmp_path / "nope.bin", lambda: read_cifar_binary(tmp_path / "nope.bin", 10), "not found")
    _raises_naming(tmp_path, lambda: load_dataset("cifar10", "train", tmp_path), "no cifar10 files")
    _raises_naming(tmp_path, lambda: load_dataset("svhn", "test", tmp_path))
    # the data set's folder is there but lacks the split's file: that file is named, for the run as for the dry run
    write_cifar10_tree(tmp_path, "bin")
    (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").unlink()
    _raises_naming(tmp_path / "cifar-10-batches-bin" / "test_batch.bin",
                   lambda: load_dataset("cifar10", "test", tmp_path), "missing")
    write_mnist_tree(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    _raises_naming(tmp_path / "mnist", lambda: load_dataset("mnist", "test", tmp_path), re.escape("t10k-images-idx3-ubyte[.gz]"))


def test_cifar_truncated_and_wrong_size(tmp_path):
    path = tmp_path / "data_batch_1.bin"
    write_cifar_binary(path, random_images(3), balanced_labels(3, 10))
    path.write_bytes(path.read_bytes()[:-1])
    _raises_naming(path, lambda: read_cifar_binary(path, 10), "multiple of 3073")
    write_cifar_binary(path, random_images(3), balanced_labels(3, 10))
    _raises_naming(path, lambda: read_cifar_binary(path, 10, label_bytes=2), "multiple of 3074")
    _raises_naming(path, lambda: read_cifar_binary(path, 10, expected_records=10_000), "expected 10000")


def test_cifar_labels_out_of_range(tmp_path):
    path = tmp_path / "test_batch.bin"
    write_cifar_binary(path, random_images(2), np.array([3, 10], dtype=np.uint8))
    _raises_naming(path, lambda: read_cifar_binary(path, 10), "label 10 out of range")


def test_cifar_official_count_checked_with_verify(tmp_path):
    write_cifar10_tree(tmp_path, "bin")
    _raises_naming(tmp_path / "cifar-10-batches-bin", lambda: load_dataset("cifar10", "test", tmp_path, verify=True))


def test_idx_wrong_magic_truncated_and_labels(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    data = idx_bytes(random_images(4, 0, (28, 28)))
    path.write_bytes(data[:-5])
    _raises_naming(path, lambda: read_idx(path, 2051), "bytes, expected")
    path.write_bytes(data)
    _raises_naming(path, lambda: read_idx(path, 2049), "magic 2051, expected 2049")
    gz = tmp_path / "t.gz"
    gz.write_bytes(gzip.compress(data)[:-20])
    _raises_naming(gz, lambda: read_idx(gz, 2051))
    folder = tmp_path / "mnist"
    write_mnist_tree(folder, count=5, compress=False)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([0, 1, 2, 3, 11], dtype=np.uint8)))
    _raises_naming(folder / "t10k-labels-idx1-ubyte", lambda: load_dataset("mnist", "test", tmp_path), "out of range")


def test_svhn_corrupt(tmp_path):
    path = tmp_path / "svhn" / "test_32x32.mat"
    write_svhn_mat(path, random_images(5), np.array([0, 1, 2, 3, 4]))
    path.write_bytes(path.read_bytes()[:100])
    _raises_naming(path, lambda: load_dataset("svhn", "test", tmp_path))


def test_empty_class_folder(tmp_path):
    write_image_folder(tmp_path, {"a": 1})
    (tmp_path / "b").mkdir()
    _raises_naming(tmp_path / "b", lambda: load_dataset("folder", "train", tmp_path), "empty class folder")


def test_class_folder_with_its_images_one_level_down_says_so(tmp_path):
    write_image_folder(tmp_path, {"a": 1})
    write_image_folder(tmp_path / "b", {"2019": 2})  # b/2019/*.png: not read
    _raises_naming(tmp_path / "b", lambda: load_dataset("folder", "train", tmp_path),
                   r"its sub-folders 2019/ are not read")


@pytest.mark.parametrize("split", ["train", "test"])
def test_split_folders_beside_class_folders_are_refused(tmp_path, split):
    # a flat tree whose class is called train/test: read as a split folder, the other classes went unread
    write_image_folder(tmp_path, {"cat": 2, "dog": 2})
    write_image_folder(tmp_path / split, {"x": 1, "y": 1})
    (tmp_path / "notes").mkdir()  # a folder without images beside the splits is fine
    with pytest.raises(DataError, match=rf"holds split folders \({split}/\) and image folders beside them \(cat/, dog/\)"):
        load_dataset("folder", "train", tmp_path)


def test_an_unreadable_folder_beside_the_splits_is_not_read(tmp_path, monkeypatch):
    # a data disk's lost+found (mode 700): the split folders load as before, no PermissionError
    write_image_folder(tmp_path / "train", {"cat": 2, "dog": 2})
    (tmp_path / "lost+found").mkdir()
    from nin.data import folders

    real = folders.image_files
    def image_files(folder):
        if folder.name == "lost+found":
            raise PermissionError(13, "Permission denied", str(folder))
        return real(folder)
    monkeypatch.setattr(folders, "image_files", image_files)
    assert len(load_dataset("folder", "train", tmp_path)) == 4


def test_unsupported_image(tmp_path):
    write_image_folder(tmp_path, {"a": 1})
    (tmp_path / "a" / "notes.jpg").write_text("not an image")
    _raises_naming(tmp_path / "a" / "notes.jpg", lambda: load_dataset("folder", "train", tmp_path), "unsupported")


def test_oversized_image(tmp_path):
    write_image_folder(tmp_path, {"a": 1}, size=(100, 100))
    path = tmp_path / "a" / "0.png"
    _raises_naming(path, lambda: read_image(path, 32, 3, max_pixels=5_000), "exceeds")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": [0]}, protocol=2))
    _raises_naming(path, lambda: read_cifar_python(path, 10, b"labels"), "refused to unpickle")
    _raises_naming(path, lambda: load_dataset("cifar10", "test", tmp_path), "refused to unpickle")
    assert not marker.exists()


# ---- property tests -------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(count=st.integers(1, 6), seed=st.integers(0, 2**16), cut=st.integers(1, 3072))
def test_cifar_binary_round_trip_and_truncation(tmp_path_factory, count, seed, cut):
    path = tmp_path_factory.mktemp("cifar") / "batch.bin"
    images, labels = random_images(count, seed), np.random.default_rng(seed).integers(0, 10, count).astype(np.uint8)
    write_cifar_binary(path, images, labels)
    read_images, read_labels = read_cifar_binary(path, 10)
    assert torch.equal(read_images, torch.from_numpy(images)) and read_labels.tolist() == labels.tolist()
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(DataError):
        read_cifar_binary(path, 10)


@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(st.integers(0, 5), st.integers(1, 9), st.integers(1, 9)), cut=st.integers(1, 50))
def test_idx_round_trip_and_truncation(tmp_path_factory, shape, cut):
    path = tmp_path_factory.mktemp("idx") / "images-idx3-ubyte"
    array = np.arange(np.prod(shape), dtype=np.int64).reshape(shape).astype(np.uint8)
    path.write_bytes(idx_bytes(array))
    assert np.array_equal(read_idx(path, 2051), array)
    path.write_bytes(idx_bytes(array)[: max(0, 16 + array.size - cut)])
    with pytest.raises(DataError):
        read_idx(path, 2051)


# ---- TensorLoader -------------------------------------------------------------------------------------------


def _epoch_indices(loader: TensorLoader) -> list[int]:
    return [int(i) for _, labels in loader for i in labels]


def test_loader_each_index_once_and_reproducible():
    indices = torch.arange(103)
    loader = TensorLoader(indices.view(-1, 1).float(), indices, batch_size=10, seed=3)
    first = _epoch_indices(loader)
    assert sorted(first) == list(range(103)) and len(loader) == 11
    assert first == _epoch_indices(TensorLoader(indices.view(-1, 1).float(), indices, batch_size=10, seed=3))
    loader.set_epoch(1)
    assert _epoch_indices(loader) != first
    loader.set_epoch(0)
    assert _epoch_indices(loader) == first
    assert _epoch_indices(TensorLoader(indices.float(), indices, 10, seed=4)) != first
    dropped = TensorLoader(indices.float(), indices, 10, drop_last=True)
    assert len(dropped) == 10 and len(_epoch_indices(dropped)) == 100


def test_loader_rank_shards_disjoint_equal_covering():
    indices = torch.arange(100)
    shards = [_epoch_indices(TensorLoader(indices, indices, 7, seed=1, rank=r, world_size=4)) for r in range(4)]
    assert all(len(shard) == 25 for shard in shards)
    assert sorted(sum(shards, [])) == list(range(100))
    uneven = [_epoch_indices(TensorLoader(indices[:103], indices[:103], 7, rank=r, world_size=4)) for r in range(4)]
    assert {len(shard) for shard in uneven} == {25} and len(set(sum(uneven, []))) == 100  # trimmed to equal steps
    lengths = {len(TensorLoader(indices[:103], indices[:103], 7, rank=r, world_size=4)) for r in range(4)}
    assert lengths == {4}


def test_loader_eval_sharding_counts_everything_once():
    indices = torch.arange(103)
    shards = [
        _epoch_indices(TensorLoader(indices, indices, 8, shuffle=False, rank=r, world_size=4)) for r in range(4)
    ]
    assert sorted(sum(shards, [])) == list(range(103))
    assert [len(TensorLoader(indices, indices, 8, shuffle=False, rank=r, world_size=4)) for r in range(4)] == [4, 4, 4, 4]


def test_loader_skip_resumes_same_batches():
    indices = torch.arange(64)
    flip_sign = lambda images, generator: images * (torch.rand(len(images), 1, generator=generator) - 0.5).sign()  # noqa: E731
    loader = TensorLoader(indices.view(-1, 1).float(), indices, 8, seed=5, augment=flip_sign)
    loader.set_epoch(2)
    full = list(loader)
    resumed = TensorLoader(indices.view(-1, 1).float(), indices, 8, seed=5, augment=flip_sign)
    resumed.set_epoch(2)
    resumed.skip(3)
    rest = list(resumed)
    assert len(rest) == 5
    for (a_images, a_labels), (b_images, b_labels) in zip(full[3:], rest):
        assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    assert len(list(resumed)) == 8  # skip applies to one iteration only


def test_data_file_reads_a_damaged_idx_file_as_idx(tmp_path):
    """`--data-file` tells IDX from CIFAR by an images header (its magic, rows and columns), not by a length that
    fits it: a damaged MNIST file gets the IDX reader's error, not the CIFAR reader's (even where its length is a
    whole number of CIFAR records), and an IDX file of no images is refused, not scored as 0/0."""
    from nin.evaluate import read_data_file

    images, labels = random_images(10, 0, (28, 28)), np.arange(10, dtype=np.uint8)
    data = idx_bytes(images)
    path = tmp_path / "t10k-images-idx3-ubyte"
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    for cut in (data[:-100], data[:3073], data[:2 * 3073]):  # the last two: whole CIFAR records of 3,073 bytes
        path.write_bytes(cut)
        _raises_naming(path, lambda: read_data_file(path, 10), f"{len(cut)} bytes, expected {len(data)}")
    path.write_bytes(data)
    assert read_data_file(path, 10).images.shape == (10, 1, 28, 28)
    path.write_bytes(idx_bytes(images[:0]))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels[:0]))
    _raises_naming(path, lambda: read_data_file(path, 10), "0 images")
    cifar = tmp_path / "batch.bin"  # a CIFAR batch is still one, whatever its first record's bytes
    record = np.zeros(3073, dtype=np.uint8)
    record[1:4] = (0, 8, 3)  # label 0 and pixels that spell the images magic, 0x00000803
    cifar.write_bytes(record.tobytes() * 2)
    assert read_data_file(cifar, 10).images.shape == (2, 3, 32, 32)


def test_a_bad_image_size_is_named_not_blamed_on_an_image(tmp_path):
    """image_size=-3 was reported as a damaged first image; 0 quietly meant the default 32."""
    write_image_folder(tmp_path, {"a": 2, "b": 2})
    for size in (-3, 0, 2.5):
        with pytest.raises(DataError, match=f"image_size={size!r}: expected a positive number of pixels"):
            load_dataset("folder", "train", tmp_path, image_size=size)
    assert load_dataset("folder", "train", tmp_path, image_size=8).images.shape[-2:] == (8, 8)
