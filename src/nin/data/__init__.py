"""Data sets of the paper as uint8 tensors, tensor and folder loaders, and downloads.

    from nin.data import load_dataset, TensorLoader
    train = load_dataset("cifar10", "train")          # root: argument, else $NIN_DATA, else ~/.cache/nin

Modules: `readers` (one function per data-set file format), `pickles` (the restricted unpickler), `images`
(photos and image folders, decoded as the model sees them), `datasets` (names, folder layouts, splits),
`loader` (TensorLoader), `download` (official URLs and checksums).
"""

from nin.data.datasets import (
    DATASET_NAMES,
    DATASETS,
    FOLDER,
    LOSSLESS_CIFAR10_NAME,
    SPLITS,
    DatasetInfo,
    ImageDataset,
    dataset_files,
    dataset_info,
    folder_split_digest,
    load_cifar10_lossless_first1000,
    load_dataset,
    recorded_root,
    resolve_root,
)
from nin.data.download import (
    RESOURCES,
    Resource,
    download,
    download_file,
    extract_archive,
)
from nin.data.loader import TensorLoader, shard_indices
from nin.data.readers import verify_checksum
from nin.errors import DataError

__all__ = [
    "DATASET_NAMES",
    "DATASETS",
    "FOLDER",
    "LOSSLESS_CIFAR10_NAME",
    "RESOURCES",
    "SPLITS",
    "DataError",
    "DatasetInfo",
    "ImageDataset",
    "Resource",
    "TensorLoader",
    "dataset_files",
    "dataset_info",
    "download",
    "download_file",
    "extract_archive",
    "folder_split_digest",
    "load_cifar10_lossless_first1000",
    "load_dataset",
    "recorded_root",
    "resolve_root",
    "shard_indices",
    "verify_checksum",
]
