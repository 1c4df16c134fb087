"""The paper's data sets by name: where their files live under a data root, and the paper's splits.

    train = load_dataset("cifar10", "train", "../shared/data")   # ImageDataset: uint8 (50000, 3, 32, 32)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nin.data.folders import check_class_count, first_names, holds_images, list_image_classes, list_image_folder
from nin.data.images import read_image
from nin.data.readers import (
    file_digest,
    read_cifar_binary,
    read_cifar_python,
    read_cifar_python_names,
    read_class_names_text,
    read_idx_dataset,
    read_svhn_mat,
    require_svhn_reader,
)
from nin.errors import DataError

SPLITS = ("train", "test", "val", "train_minus_val")


@dataclass(frozen=True)
class DatasetInfo:
    """Everything the package knows about a data set before reading it: one entry per data set.

    The CLI's choices, the recipes' per-data-set defaults, `nin reproduce`'s tables and the docs all read
    this registry, so a new data set is one entry here plus its reader.
    """

    name: str
    label: str  # how tables and figures name it
    num_classes: int  # 0: decided by the data (an image folder)
    in_channels: int
    image_size: int
    paper_model: str  # the paper's model for this data set (nin.models)
    paper_preprocessing: str  # NiN paper section 4: GCN + ZCA (CIFAR), GCN + LCN (SVHN), [0, 1] scaling (MNIST; nin: standardized)
    flip: bool  # horizontal flips make sense (not for digits)
    fast_epochs: int  # the fast recipe's default length
    fast_preprocessing: str = "standardize"  # the fast recipe's input normalisation
    paper_overrides: tuple[tuple[str, object], ...] = ()  # TrainConfig changes of the paper recipe on this data set
    fast_overrides: tuple[tuple[str, object], ...] = ()  # ... and of the fast recipe ("model_args": (key, value) pairs)
    train_images: int = 0  # the official training split's size (0: unknown)
    folder: str = ""  # the folder under the data root that holds its files ("" for an image folder)


DATASETS: dict[str, DatasetInfo] = {
    # fast: the first half of the epochs on 24 px images (1.9× the images/s), evaluated every 4 epochs
    "cifar10": DatasetInfo("cifar10", "CIFAR-10", 10, 3, 32, "nin_cifar10", "gcn_zca", True, 32,
                           fast_overrides=(("small_size", 24), ("small_fraction", 0.5), ("eval_every", 4),
                                           ("model_args", (("dropout", 0.0),))),
                           train_images=50_000, folder="cifar-10-batches-bin"),
    # cuda-convnet's CIFAR-100 parameters, as the NiN paper used them
    "cifar100": DatasetInfo("cifar100", "CIFAR-100", 100, 3, 32, "nin_cifar100", "gcn_zca", True, 40,
                            paper_overrides=(("lr", 0.02), ("weight_decay", 5e-4)), train_images=50_000,
                            folder="cifar-100-binary"),
    "svhn": DatasetInfo("svhn", "SVHN", 10, 3, 32, "nin_svhn", "gcn_lcn", False, 15, train_images=598_388,
                        folder="svhn"),
    # digits. The paper gives MNIST no preprocessing; on [0, 1] pixels its init (N(0, 0.05²)) and lr (0.1) leave
    # the model dead at ln 10 (5 epochs measured), and on the authors' cuda-convnet input (0..255 less the mean
    # image) it dies in epoch 2; standardized pixels (zero mean, unit variance: the scale GCN gives CIFAR and
    # SVHN) learn (32.8% test error after the first epoch). docs/training.md has the runs. The fast recipe's
    # batch norm needs none of it: [0, 1]. MNIST fast: 6 epochs, evaluated every other one (8 scored 0.30-0.35% in
    # 13-16 min; 6 scored 0.34% in 9.8 min; 20 or 16 px first epochs did worse)
    "mnist": DatasetInfo("mnist", "MNIST", 10, 1, 28, "nin_mnist", "standardize", False, 6,
                         fast_preprocessing="scale", fast_overrides=(("eval_every", 2),), train_images=60_000,
                         folder="mnist"),
    "fashion-mnist": DatasetInfo("fashion-mnist", "Fashion-MNIST", 10, 1, 28, "nin_mnist", "scale", True, 20,
                                 fast_preprocessing="scale", train_images=60_000, folder="fashion-mnist"),
}

# A user's image folder: its classes come from its sub-folders; images are resized to the model's input.
FOLDER = DatasetInfo("folder", "image folder", 0, 3, 32, "nin_cifar10", "standardize", True, 30)


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of a data set name, "folder" included.

    Raises:
        DataError: The name is unknown.
    """
    if name == FOLDER.name:
        return FOLDER
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    return DATASETS[name]


DATASET_NAMES = (*DATASETS, FOLDER.name)  # what --dataset accepts
LIGHT_ON_DARK = ("mnist", "fashion-mnist")  # data sets of light strokes or objects on a black background

LOSSLESS_CIFAR10_NAME = "cifar10-lossless-first1000"  # shared/data's pixel-exact first 1,000 official test images

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MNIST_CLASSES = [str(digit) for digit in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
SVHN_CLASSES = MNIST_CLASSES  # label 10 in the .mat files is the digit 0

# Official sizes, checked only with verify=True so that small files in the genuine format load too.
OFFICIAL_COUNTS = {
    "cifar10": {"train": 50_000, "test": 10_000},
    "cifar100": {"train": 50_000, "test": 10_000},
    "svhn": {"train": 73_257, "test": 26_032, "extra": 531_131},
    "mnist": {"train": 60_000, "test": 10_000},
    "fashion-mnist": {"train": 60_000, "test": 10_000},
}

CIFAR_VALIDATION_SIZE = 10_000  # NIN paper: "the last 10,000 training images" tuned the hyperparameters
SVHN_VALIDATION_PER_CLASS = {"train": 400, "extra": 200}  # Maxout / NIN papers: 400 per class + 200 per class


@dataclass(repr=False)
class ImageDataset:
    """A whole split in memory: raw uint8 pixels and int64 labels, ready for `fit_preprocessing`.

    ``dataset[i]`` is (image uint8 (C, H, W), label int), so it also serves a torch ``DataLoader``.
    """

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    classes: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __repr__(self) -> str:
        shape = "×".join(map(str, self.images.shape[1:]))
        classes = ", ".join(self.classes[:5]) + (f", … ({len(self.classes)})" if len(self.classes) > 5 else "")
        return f"ImageDataset({self.name!r}, {len(self)} images of {shape} {self.images.dtype}, classes: {classes})"


# --data-dir's help where a model's own test set is read (`recorded_root`)
DATA_DIR_OF_MODEL_HELP = ("data root (default: the folder the model was trained from, while it is there; else "
                          "$NIN_DATA, else ~/.cache/nin)")


def recorded_root(recorded: str | None, dataset: str | None = None) -> str | None:
    """Where a run's own data is when a command names no folder: the folder its run recorded, while it exists;
    else $NIN_DATA, else the per-user cache, where that folder exists (the data moved, or weights trained on
    another machine); else the recorded folder still, for the error to name it. A user's image folder
    (``dataset`` "folder") moves only with $NIN_DATA: the cache never holds it."""
    if not recorded or Path(recorded).expanduser().is_dir():
        return recorded
    if dataset == FOLDER.name and not os.environ.get("NIN_DATA"):
        return recorded
    fallback = resolve_root(None)
    return str(fallback.resolve()) if fallback.is_dir() else recorded


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The data root: the argument if given, else $NIN_DATA, else the per-user cache (~/.cache/nin).

    Args:
        root: An explicit folder, or None.

    Returns:
        The folder as an absolute-or-user-expanded `Path` (not created).
    """
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("NIN_DATA"):
        return Path(os.environ["NIN_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "nin"


def _first_existing(root: Path, folders: list[str], marker: str) -> Path | None:
    for folder in folders:
        if (root / folder / marker).is_file():
            return root / folder
    return None


def _absent(name: str, file: Path) -> DataError:
    """The error for one file of data set ``name`` that is not there (or is a folder)."""
    return DataError(f"{file}: {'not a file' if file.exists() else 'missing'}; run `nin download {name}`?")


def _missing(name: str, root: Path, folders: list[str], markers: list[str] | None = None) -> DataError:
    """The error for a data set not found under ``root`` in any of ``folders``; where one of them is there but
    lacks its file (``markers``, one per folder), that file is named."""
    for folder, marker in zip(folders, markers or []):
        if (root / folder).is_dir():
            return _absent(name, root / folder / marker)
    searched = ", ".join(str(root / folder) for folder in folders)
    return DataError(f"{root}: no {name} files found (searched {searched}); run `nin download {name}`?")


def _check_count(dataset: str, part: str, count: int, where: Path) -> None:
    expected = OFFICIAL_COUNTS[dataset][part]
    if count != expected:
        raise DataError(f"{where}: {count} {part} images, expected the official {expected}")


def _cifar_files(name: str, part: str, root: Path) -> tuple[bool, Path, list[str]]:
    """Where CIFAR-10/100 `part` ("train" or "test") is under ``root``: (binary layout?, its folder, its file
    names), the binary layout first; not read."""
    if name == "cifar10":
        binary_folders, python_folders = ["cifar-10-batches-bin"], ["cifar-10-batches-py"]
        binary_files = [f"data_batch_{i}.bin" for i in range(1, 6)] if part == "train" else ["test_batch.bin"]
        python_files = [f"data_batch_{i}" for i in range(1, 6)] if part == "train" else ["test_batch"]
    else:
        binary_folders, python_folders = ["cifar-100-binary"], ["cifar-100-python"]
        binary_files, python_files = [f"{part}.bin"], [part]
    binary = _first_existing(root, binary_folders, binary_files[0])
    if binary is not None:
        return True, binary, binary_files
    python = _first_existing(root, python_folders, python_files[0])
    if python is not None:
        return False, python, python_files
    raise _missing(name, root, binary_folders + python_folders, binary_files[:1] + python_files[:1])


def _load_cifar(name: str, part: str, root: Path, verify: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read CIFAR-10/100 `part` ("train" or "test") from the binary or the python layout."""
    num_classes = DATASETS[name].num_classes
    # CIFAR-100 records: coarse label byte, then fine label byte
    label_bytes, label_key = (1, b"labels") if name == "cifar10" else (2, b"fine_labels")
    is_binary, folder, files = _cifar_files(name, part, root)
    if is_binary:
        parts = [read_cifar_binary(folder / f, num_classes, label_bytes=label_bytes) for f in files]
        names_file = folder / ("batches.meta.txt" if name == "cifar10" else "fine_label_names.txt")
        classes = read_class_names_text(names_file) if names_file.is_file() else None
    else:
        parts = [read_cifar_python(folder / f, num_classes, label_key) for f in files]
        names_file = folder / ("batches.meta" if name == "cifar10" else "meta")
        key = b"label_names" if name == "cifar10" else b"fine_label_names"
        classes = read_cifar_python_names(names_file, key) if names_file.is_file() else None
    if classes is None:
        classes = CIFAR10_CLASSES if name == "cifar10" else [str(label) for label in range(num_classes)]
    if len(classes) != num_classes:
        raise DataError(f"{names_file}: {len(classes)} class names, expected {num_classes}")
    images = torch.cat([images for images, _ in parts])
    labels = torch.cat([labels for _, labels in parts])
    if verify:
        _check_count(name, part, len(labels), folder)
    return images, labels, classes


def _idx_files(name: str, part: str, root: Path) -> tuple[Path, Path]:
    """(images, labels) files of MNIST or Fashion-MNIST `part` under ``root``, in the original layout or
    torchvision's <Name>/raw layout, gzipped or not; not read."""
    folders = ["mnist", "MNIST/raw"] if name == "mnist" else ["fashion-mnist", "FashionMNIST/raw"]
    prefix = "train" if part == "train" else "t10k"
    for folder in folders:
        for suffix in (".gz", ""):
            images_path = root / folder / f"{prefix}-images-idx3-ubyte{suffix}"
            if images_path.is_file():
                return images_path, root / folder / f"{prefix}-labels-idx1-ubyte{suffix}"
    raise _missing(name, root, folders, [f"{prefix}-images-idx3-ubyte[.gz]"] * len(folders))


def _load_idx(name: str, part: str, root: Path, verify: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read MNIST or Fashion-MNIST `part` ("train" or "test"), wherever `_idx_files` finds it."""
    images_path, labels_path = _idx_files(name, part, root)
    images, labels = read_idx_dataset(images_path, labels_path)
    if verify:
        _check_count(name, part, len(labels), images_path.parent)
    return images, labels, MNIST_CLASSES if name == "mnist" else FASHION_MNIST_CLASSES


def dataset_files(name: str, root: str | os.PathLike | None = None, splits: Sequence[str] = ("train", "test"), *,
                  val_split: float = 0.0, seed: int = 0) -> list[Path]:
    """The files that loading ``splits`` of data set ``name`` from ``root`` (see `resolve_root`) reads, found but
    not read: what `nin train --dry-run` checks before a long run. SVHN's optional extra file is listed when
    present; an image folder's images are listed (``val_split`` and ``seed`` as `load_dataset` takes them) and
    its training split must hold two classes at least, as a run needs.

    Raises:
        DataError: The data set is not there, or a file it needs is missing (the message names it).
        MissingPackage: The files are there but the package that reads them is not (SVHN: scipy).
    """
    info = dataset_info(name)
    for split in splits:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    root = resolve_root(root)
    if name == FOLDER.name:
        if not root.is_dir():
            raise DataError(f"{root}: image folder not found")
        files: dict[Path, None] = {}
        for split in splits:
            samples, classes = _folder_samples(root, split, None, val_split, seed)
            if split == splits[0]:
                check_class_count(classes, root / split if (root / split).is_dir() else root)
            files.update(dict.fromkeys(path for path, _ in samples))
        return list(files)
    parts = sorted({"test" if split == "test" else "train" for split in splits}, reverse=True)  # train, then test
    found: list[Path] = []
    for part in parts:
        if info.name in ("cifar10", "cifar100"):
            _, folder, names = _cifar_files(name, part, root)
            found += [folder / file for file in names]
        elif info.name == "svhn":
            if not (root / "svhn").is_dir():
                raise _missing(name, root, ["svhn"])
            extra = root / "svhn" / "extra_32x32.mat"
            found += [root / "svhn" / f"{part}_32x32.mat", *([extra] if part == "train" and extra.is_file() else [])]
        else:
            found += list(_idx_files(name, part, root))
    for file in found:
        if not file.is_file():
            raise _absent(name, file)
    if info.name == "svhn":
        require_svhn_reader()  # found is not enough where nothing here can read them
    return found


def _load_svhn_part(part: str, root: Path, verify: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """SVHN `part` ("train", "test", "extra"); None when the optional extra file is absent."""
    path = root / "svhn" / f"{part}_32x32.mat"
    if part == "extra" and not path.is_file():
        return None
    if not path.is_file():
        raise _missing("svhn", root, ["svhn"], [path.name])
    images, labels = read_svhn_mat(path)
    if verify:
        _check_count("svhn", part, len(labels), path)
    return images, labels


def first_per_class(labels: torch.Tensor, per_class: int, num_classes: int) -> torch.Tensor:
    """Indices of the first ``per_class`` images of every class, class by class (fewer where a class has fewer)."""
    chosen = [torch.nonzero(labels == k).flatten()[:per_class] for k in range(num_classes)]
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.int64)


def _validation_indices(labels: torch.Tensor, per_class: int, num_classes: int, where: str) -> torch.Tensor:
    """The first `per_class` images of every class, in file order; every class must have that many."""
    counts = torch.bincount(labels, minlength=num_classes)
    short = [k for k in range(num_classes) if counts[k] < per_class]
    if short:
        raise DataError(f"{where}: {int(counts[short[0]])} images of class {short[0]}, the validation split needs "
                        f"{per_class}")
    return first_per_class(labels, per_class, num_classes).sort().values


def _complement(indices: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[indices] = False
    return torch.nonzero(keep).flatten()


def _load_svhn(split: str, root: Path, verify: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SVHN splits; "train" is train + extra (when extra is present), "val" the Maxout validation set."""
    if split == "test":
        return _load_svhn_part("test", root, verify)
    parts = {"train": _load_svhn_part("train", root, verify), "extra": _load_svhn_part("extra", root, verify)}
    parts = {part: value for part, value in parts.items() if value is not None}
    if split == "train":
        return torch.cat([images for images, _ in parts.values()]), torch.cat([labels for _, labels in parts.values()])
    selected_images, selected_labels = [], []
    for part, (images, labels) in parts.items():
        where = str(root / "svhn" / f"{part}_32x32.mat")
        validation = _validation_indices(labels, SVHN_VALIDATION_PER_CLASS[part], 10, where)
        indices = validation if split == "val" else _complement(validation, len(labels))
        selected_images.append(images[indices])
        selected_labels.append(labels[indices])
    return torch.cat(selected_images), torch.cat(selected_labels)


def _convert(images: torch.Tensor, image_size: int | None, channels: int | None) -> torch.Tensor:
    """Change channel count (gray <-> RGB) and size of a uint8 batch; a no-op when both already match."""
    if channels is not None and channels != images.shape[1]:
        assert channels in (1, 3), f"channels must be 1 or 3, got {channels}"
        if channels == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
        else:
            luminance = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601-2, as Pillow's "L"
            images = (images.float() * luminance).sum(1, keepdim=True).round().to(torch.uint8)
    if image_size is not None and image_size != images.shape[-1]:
        resized = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear", antialias=True)
        images = resized.round().clamp(0, 255).to(torch.uint8)
    return images


def held_out(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A stratified, seeded held-out set: of every class, round(fraction × its count) images (at least one when the
    class has two or more), drawn by a permutation seeded with ``seed``. Returns the held-out indices, sorted."""
    assert 0 < fraction < 1, f"fraction must be in (0, 1), got {fraction}"
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels.unique().tolist():
        members = torch.nonzero(labels == label).flatten()
        count = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 0
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(chosen).sort().values if chosen else torch.zeros(0, dtype=torch.int64)


def _load_folder(root: Path, split: str, image_size: int, channels: int, classes: list[str] | None,
                 val_split: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """An image folder's `split`, decoded (each image as `read_image` does); `_folder_samples` says which."""
    samples, classes = _folder_samples(root, split, classes, val_split, seed)
    images = torch.stack([read_image(path, image_size, channels) for path, _ in samples])
    return images, torch.tensor([label for _, label in samples], dtype=torch.int64), classes


def folder_split_digest(root: str | os.PathLike, split: str, *, val_split: float = 0.0, seed: int = 0,
                        classes: list[str] | None = None, contents: bool = False) -> str:
    """sha256 of which files make an image folder's ``split`` (names relative to the folder, and labels), listed
    but not read: what a run records of its held-out part, so that scoring it later can tell whether images were
    added, removed or renamed since (a moved folder keeps its digest). ``contents``: each file's bytes too (their
    sha256), so that an image written over another under its name tells as well."""
    root = resolve_root(root)
    samples, _ = _folder_samples(root, split, classes, val_split, seed)
    digest = hashlib.sha256()
    for path, label in samples:
        digest.update(f"{path.relative_to(root).as_posix()}\t{label}".encode())
        digest.update(f"\t{file_digest(path, 'sha256')}\n".encode() if contents else b"\n")
    return digest.hexdigest()


def _check_not_mixed(root: Path) -> None:
    """A folder with split folders (train/, test/) holds no class folders beside them: in a flat tree a class named
    "train" or "test" would be read as a split and the others dropped without a word."""
    beside = [p.name for p in sorted(root.iterdir())
              if p.is_dir() and not p.name.startswith(".") and p.name not in SPLITS and holds_images(p)]
    if beside:
        splits = ", ".join(f"{name}/" for name in SPLITS if (root / name).is_dir())
        raise DataError(f"{root}: holds split folders ({splits}) and image folders beside them "
                        f"({first_names(n + '/' for n in beside)}); expected <root>/train/<class>/<image> or <root>/<class>/<image>, "
                        "not both: move those out (or, a class named train or test, rename it)")


def _folder_samples(root: Path, split: str, classes: list[str] | None, val_split: float = 0.0,
                    seed: int = 0) -> tuple[list[tuple[Path, int]], list[str]]:
    """The (file, label) pairs of an image folder's `split`, listed but not read, and the class list:
    <root>/train/, <root>/test/ (, val/ ...) labelled by one class list, or a flat tree.

    With split folders the class list is `classes` if given, else train/'s sub-folders, so that a split lacking
    a class keeps the others' labels; a class train/ lacks is refused. Without a train/ or test/ sub-folder the
    root itself serves every split. With ``val_split`` > 0 the training images (train/, or the flat tree) are
    split once more: "train" is all but a stratified held-out part (`held_out`, seeded by ``seed``), and every
    other split is that held-out part.
    """
    split_folders = (root / "train").is_dir() or (root / "test").is_dir()
    if split_folders:
        _check_not_mixed(root)
    from_train = classes is None and (root / "train").is_dir()  # train/'s sub-folders are the class list
    if from_train:
        classes = list_image_classes(root / "train")
    if val_split:
        source = root / "train" if split_folders else root
        samples, classes = list_image_folder(source, classes)
        labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        held = set(held_out(labels, val_split, seed).tolist())
        keep = [i for i in range(len(samples)) if (i in held) != (split == "train")]
        if not keep:
            raise DataError(f"{source}: --val-split {val_split} leaves no {split} images")
        return [samples[i] for i in keep], classes
    if not split_folders:
        return list_image_folder(root / split if (root / split).is_dir() else root, classes)
    folder = root / split
    if not folder.is_dir():
        present = ", ".join(f"{part}/" for part in SPLITS if (root / part).is_dir())
        raise DataError(f"{folder}: {split}/ is missing (found {present}), expected <root>/{split}/<class>/<image> "
                        "(or --val-split to hold out part of train/)")
    if from_train:
        unknown = [name for name in list_image_classes(folder) if name not in classes]
        if unknown:
            raise DataError(f"{folder / unknown[0]}: class {unknown[0]!r} is not in {root / 'train'}, "
                            f"whose sub-folders are the class list ({', '.join(classes)})")
    return list_image_folder(folder, classes)


def load_cifar10_lossless_first1000(root: str | os.PathLike | None = None) -> ImageDataset:
    """The pixel-exact first 1,000 official CIFAR-10 test images kept in shared/data (see its README)."""
    folder = resolve_root(root) / "cifar-10-test-lossless-first1000"
    images, labels = read_cifar_binary(folder / "test_batch_first1000.bin", 10, expected_records=1000)
    return ImageDataset(images, labels, list(CIFAR10_CLASSES), LOSSLESS_CIFAR10_NAME)


def load_dataset(
    name: str,
    split: str,
    root: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    verify: bool = False,
    classes: list[str] | None = None,
    val_split: float = 0.0,
    seed: int = 0,
) -> ImageDataset:
    """Load one split of a data set into memory as raw uint8 pixels.

    Args:
        name: A key of `DATASETS`, "folder" (an image folder at `root`), or "cifar10-lossless-first1000".
        split: "train" (everything the paper's final runs train on), "test", "val" (the paper's validation
            split: the last 10,000 training images for CIFAR/MNIST, 400 per class of train + 200 per class of
            extra for SVHN), or "train_minus_val" (train without the val images).
        root: Data root (see `resolve_root`); for "folder", the image folder itself.
        image_size: Resize to this height and width (folders default to 32; others keep their size).
        channels: Convert to 1 or 3 channels (folders default to 3; others keep theirs).
        verify: Also check the official image counts (structural checks always run).
        classes: Only for "folder": the class list in label order, e.g. the classes stored in a model's weights
            (label i is `classes[i]`; a sub-folder outside the list is refused). Default: the sub-folders of
            `root`/train/, for every split, so test/ images get train/'s labels; without split folders, the
            sub-folders of `root`.
        val_split: Only for "folder": hold out this fraction of every class of the training images (stratified,
            seeded by ``seed``) as the split that has no folder of its own ("test", "val"); "train" leaves it out.

    Returns:
        The split as an `ImageDataset`.

    Raises:
        DataError: A file is missing or damaged, or the name or split is unknown.
    """
    if split not in SPLITS:  # a user's typo (nin evaluate --split): one line, not an assertion
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):  # 0 is not "the default"
        raise DataError(f"image_size={image_size!r}: expected a positive number of pixels, or None")
    root = resolve_root(root)
    if name == "folder":
        images, labels, classes = _load_folder(root, split, image_size or 32, channels or 3, classes, val_split, seed)
        return ImageDataset(images, labels, classes, "folder")
    if val_split:
        raise DataError(f"val_split= applies to image folders only, not to {name!r}, which has its own splits")
    if classes is not None:
        raise DataError(f"classes= applies to image folders only, not to {name!r}, whose classes are fixed")
    if name == LOSSLESS_CIFAR10_NAME:
        if split != "test":
            raise DataError(f"{LOSSLESS_CIFAR10_NAME} has only a test split, not {split!r}")
        dataset = load_cifar10_lossless_first1000(root)
        dataset.images = _convert(dataset.images, image_size, channels)
        return dataset
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of: {', '.join(sorted(DATASETS))}, folder")
    images, labels, classes = _load_official(name, split, root, verify)
    return ImageDataset(_convert(images, image_size, channels), labels, classes, name)


def _load_official(name: str, split: str, root: Path, verify: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images, labels, classes) of a split of one of `DATASETS` from its official files under ``root``; the
    val splits of CIFAR and MNIST-like sets are the last 10,000 training images (SVHN has its own rule)."""
    if name == "svhn":
        images, labels = _load_svhn(split, root, verify)
        return images, labels, list(SVHN_CLASSES)
    reader = _load_cifar if name in ("cifar10", "cifar100") else _load_idx
    images, labels, classes = reader(name, "test" if split == "test" else "train", root, verify)
    if split in ("val", "train_minus_val"):
        if len(labels) <= CIFAR_VALIDATION_SIZE:
            raise DataError(f"{root}: {len(labels)} {name} training images, too few for a 10,000-image val split")
        cut = len(labels) - CIFAR_VALIDATION_SIZE
        part = slice(cut, None) if split == "val" else slice(0, cut)
        images, labels = images[part].contiguous(), labels[part].contiguous()
    return images, labels, classes
