"""Fetch the paper's data sets from their official URLs: checksummed, retried, atomic, safely extracted.

    download("cifar10")   # -> ~/.cache/nin (or $NIN_DATA) with cifar-10-batches-bin/ inside
"""

from __future__ import annotations

import os
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from nin.data.datasets import resolve_root
from nin.data.readers import file_digest
from nin.errors import DataError


@dataclass(frozen=True)
class Resource:
    """One file to fetch."""

    url: str
    md5: str
    folder: str = ""  # sub-folder of the root to put the file in
    extract: bool = False  # unpack a .tar.gz / .zip into the folder, then delete the archive


_CIFAR = "https://www.cs.toronto.edu/~kriz"
_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist"  # torchvision's mirror of yann.lecun.com/exdb/mnist
_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"
_SVHN = "http://ufldl.stanford.edu/housenumbers"

# Official files and md5s (CIFAR: Krizhevsky's page; MNIST/Fashion: torchvision's resources; SVHN: Stanford page).
RESOURCES: dict[str, list[Resource]] = {
    "cifar10": [Resource(f"{_CIFAR}/cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530", extract=True)],
    "cifar10-python": [Resource(f"{_CIFAR}/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", extract=True)],
    "cifar100": [Resource(f"{_CIFAR}/cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8", extract=True)],
    "cifar100-python": [
        Resource(f"{_CIFAR}/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", extract=True)
    ],
    "svhn": [
        Resource(f"{_SVHN}/train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373", "svhn"),
        Resource(f"{_SVHN}/test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3", "svhn"),
    ],
    "svhn-extra": [Resource(f"{_SVHN}/extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7", "svhn")],  # 1.3 GB
    "mnist": [
        Resource(f"{_MNIST}/train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", "mnist"),
        Resource(f"{_MNIST}/train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", "mnist"),
        Resource(f"{_MNIST}/t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", "mnist"),
        Resource(f"{_MNIST}/t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", "mnist"),
    ],
    "fashion-mnist": [
        Resource(f"{_FASHION}/train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "fashion-mnist"),
        Resource(f"{_FASHION}/train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", "fashion-mnist"),
        Resource(f"{_FASHION}/t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", "fashion-mnist"),
        Resource(f"{_FASHION}/t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", "fashion-mnist"),
    ],
}


def download_file(url: str, destination: Path, md5: str, *, retries: int = 3, progress: bool = True) -> Path:
    """Download `url` to `destination` unless a file with the right md5 is already there.

    The bytes go to a temporary file in the same folder, are checked, then renamed into place, so an
    interrupted or corrupted download never leaves a file under the final name.

    Args:
        url: Where to fetch from (http, https or file).
        destination: Final path.
        md5: Expected hex digest.
        retries: Attempts before giving up; waits 1, 2, 4... seconds between them.
        progress: Show a tqdm bar.

    Returns:
        `destination`.

    Raises:
        DataError: Every attempt failed or the checksum did not match.
    """
    if destination.is_file() and file_digest(destination) == md5:
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for attempt in range(retries):
        descriptor, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
        try:
            with os.fdopen(descriptor, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=destination.name, disable=not progress) as bar:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
            actual = file_digest(Path(temporary))
            if actual != md5:
                raise DataError(f"{destination}: md5 of the download from {url} is {actual}, expected {md5}")
            os.replace(temporary, destination)
            return destination
        except DataError:
            raise  # a wrong checksum will not fix itself by retrying
        except OSError as error:  # URLError and HTTPError are OSErrors
            last_error = f"{type(error).__name__}: {error}"
            if attempt + 1 < retries:
                time.sleep(2**attempt)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    raise DataError(f"{destination}: download from {url} failed after {retries} attempts ({last_error})")


def _check_member_path(name: str, target: Path, archive: Path) -> Path:
    """The member's destination, refusing absolute paths and '..' that would land outside `target`."""
    if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in Path(name.replace("\\", "/")).parts:
        raise DataError(f"{archive}: unsafe member path {name!r} refused")
    destination = (target / name).resolve()
    if not destination.is_relative_to(target.resolve()):
        raise DataError(f"{archive}: member {name!r} would extract outside {target}")
    return destination


def extract_archive(archive: Path, target: Path) -> None:
    """Unpack a .tar(.gz) or .zip into `target`, after checking every member.

    Refused (DataError, nothing extracted): absolute paths, '..' components, links pointing outside
    `target`, device files and FIFOs.
    """
    target.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            for name in bundle.namelist():
                _check_member_path(name, target, archive)
            bundle.extractall(target)
        return
    try:
        bundle = tarfile.open(archive)
    except tarfile.TarError as error:
        raise DataError(f"{archive}: not a tar or zip archive ({error})") from None
    with bundle:
        members = bundle.getmembers()
        for member in members:
            destination = _check_member_path(member.name, target, archive)
            if member.issym() or member.islnk():
                base = destination.parent if member.issym() else target
                _check_member_path(member.linkname, target, archive)
                if not (base / member.linkname).resolve().is_relative_to(target.resolve()):
                    raise DataError(f"{archive}: link {member.name!r} -> {member.linkname!r} points outside {target}")
            elif not (member.isfile() or member.isdir()):
                raise DataError(f"{archive}: special file {member.name!r} refused")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: the standard library's own check as well
            bundle.extractall(target, members=members, filter="data")
        else:
            bundle.extractall(target, members=members)


def download(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    resources: list[Resource] | None = None,
    retries: int = 3,
    progress: bool = True,
) -> Path:
    """Download (and unpack) one data set into the data root.

    Args:
        name: A key of `RESOURCES` ("cifar10", "cifar100", "svhn", "svhn-extra", "mnist", "fashion-mnist", ...).
        root: Data root (see `resolve_root`).
        resources: Replace the official file list (tests point it at a local server).
        retries: Attempts per file.
        progress: Show tqdm bars.

    Returns:
        The data root.
    """
    assert resources is not None or name in RESOURCES, f"unknown data set {name!r}; known: {sorted(RESOURCES)}"
    root = resolve_root(root)
    resources = resources if resources is not None else RESOURCES[name]
    folders = {root, *(root / r.folder for r in resources)}
    made = {p for folder in folders for p in (folder, *folder.parents) if not p.exists()}  # a failure removes them
    try:
        for resource in resources:
            folder = root / resource.folder
            path = download_file(resource.url, folder / resource.url.rsplit("/", 1)[-1], resource.md5,
                                 retries=retries, progress=progress)  # fmt: skip
            if resource.extract:
                extract_archive(path, folder)  # the archive stays, so a second call skips the download
    except BaseException:
        for folder in sorted(made, key=lambda p: len(p.parts), reverse=True):  # deepest first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    return root

