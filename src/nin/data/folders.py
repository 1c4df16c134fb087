"""Many images at once: files, folders and globs as a list of image files, and class-per-sub-folder trees.

    paths, problems = list_images(["cat.jpg", "photos/", "more/**/*.png"])   # no symlink loop followed
    images, labels, classes = read_image_folder(Path("my_images/train"), 32, 3)

Each image is decoded by `nin.data.images.read_image`, as the model sees it.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import torch

from nin.data.images import DEFAULT_MAX_PIXELS, read_image
from nin.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "NumberedClasses", "check_class_count", "first_names", "holds_images", "image_files", "list_images", "list_image_classes", "list_image_folder",
           "read_image_folder"]

# What a folder's images are named; other files there (a README, Thumbs.db) are not images of the class.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"})


def _walk_images(folder: Path, problems: list[str]) -> list[Path]:
    """Image files under ``folder`` (hidden entries skipped), each real folder visited once: symbolic links to
    folders are followed, but a link back to a folder already visited (a loop) is not; unreadable folders are
    listed in ``problems``."""
    found, seen = [], set()

    def on_error(error: OSError) -> None:
        problems.append(f"{error.filename}: cannot read it ({error.strerror or type(error).__name__})")

    for top, folders, files in os.walk(folder, onerror=on_error, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        images = [Path(top) / f for f in sorted(files)
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
        found += [path for path in images if path.is_file()]
        problems += [f"{path}: a broken symbolic link" for path in images if path.is_symlink() and not path.exists()]
    return found


def list_images(items: list[str], skip_empty: bool = False) -> tuple[list[Path], list[str]]:
    """The image files that ``items`` name: files as given, folders searched recursively (sorted, hidden entries
    skipped, symbolic-link loops not followed), globs expanded (``**`` included). Returns (files, problems): the
    unreadable folders met on the way, one line each (and, with ``skip_empty``, the items that named no image).

    Raises:
        DataError: A folder without images, or a glob matching no file (unless ``skip_empty``); the message
            names an unreadable folder met on the way, the likely reason.
    """
    paths: list[Path] = []
    problems: list[str] = []
    for item in items:
        path, before = Path(item), len(problems)
        if path.is_dir():
            found = _walk_images(path, problems)
            empty = f"{path}: a folder without images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        elif glob.has_magic(item) and not path.exists():
            found = sorted(Path(m) for m in _glob_without_loops(item, problems) if Path(m).is_file())
            empty = f"{item}: no file matches"
        else:
            found, empty = [path], ""
        if not found:
            if skip_empty:
                problems.append(empty)
                continue
            unreadable = problems[before:]
            raise DataError(empty + (f"; {unreadable[0]}" if unreadable else ""))
        paths += found
    return paths, problems


def _glob_without_loops(pattern: str, problems: list[str]) -> list[str]:
    """glob.glob(pattern, recursive=True), except that ``**`` does not follow symbolic links to folders (Python's
    own ``**`` walks a link loop until the path is too long, holding every match in memory); folders it cannot
    read are listed in ``problems``."""
    if "**" not in pattern:
        return glob.glob(pattern)
    head, _, tail = pattern.partition("**")
    tail = tail.lstrip("/" + os.sep)
    bases = sorted(glob.glob(head)) if glob.has_magic(head) else [head or "."]

    def on_error(error: OSError) -> None:
        problems.append(f"{error.filename}: cannot read it ({error.strerror or type(error).__name__})")

    matches = []
    for base in bases:
        for top, folders, files in os.walk(base, onerror=on_error, followlinks=False):
            folders.sort()
            relative = Path(top)
            matches += glob.glob(str(relative / tail)) if tail else [str(relative / f) for f in files]
    return sorted(set(matches))


def list_image_classes(root: Path) -> list[str]:
    """The class names of a class-per-sub-folder tree: its sub-folders, sorted, hidden ones left out."""
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders, expected <root>/<class>/<image>")
    return classes


def check_class_count(classes: list[str], where: Path) -> None:
    """A training run needs two classes at least: with one the loss is 0 from the first step and every answer is
    that class, nothing to learn.

    Raises:
        DataError: One class, naming ``where`` (the folder its sub-folder is in).
    """
    if len(classes) < 2:
        raise DataError(f"{where}: one class sub-folder ({', '.join(classes)}); a classifier needs at least two, "
                        "<root>/<class>/<image> with one sub-folder per class")


class NumberedClasses(list):
    """The class list of a model imported without class names ("0" to "n-1", as `nin import-caffe --arch
    nin_imagenet` stores it): a folder of other names is labelled in sorted order (see `list_image_folder`)."""


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted: hidden files and other suffixes (`IMAGE_SUFFIXES`) left out."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def holds_images(folder: Path) -> bool:
    """``folder`` has image files directly in it; an unreadable folder (a disk's lost+found) has none we read."""
    try:
        return bool(image_files(folder))
    except OSError:
        return False


def first_names(names, count: int = 3) -> str:
    """``a, b, c, ...``: the first ``count`` names of a message."""
    names = list(names)
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def list_image_folder(root: Path, classes: list[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """List (file, label) pairs of a class-per-sub-folder tree.

    Hidden files and folders (".DS_Store", ".ipynb_checkpoints") are ignored; files at the top level too, and files
    whose suffix is not an image's (`IMAGE_SUFFIXES`: a README, notes.txt, Thumbs.db).

    Args:
        root: The tree, <root>/<class>/<image>.
        classes: The class list in label order (e.g. the training split's, or a model's); a sub-folder outside
            it is refused, and a class without a sub-folder is fine. Default: the sub-folders, sorted by name.
            `NumberedClasses` (a model imported without class names) and sub-folders of other names: the folder
            must hold all n, labelled in sorted order (as Caffe labels ImageNet's synset folders).

    Returns:
        The samples in (sub-folder name, file name) order, and the class names.
    """
    found = list_image_classes(root)
    if isinstance(classes, NumberedClasses) and not set(found) <= set(classes):
        if len(found) != len(classes):
            raise DataError(f"{root}: the model has no class names (numbered 0 to {len(classes) - 1}) and these "
                            f"sub-folders are named ({found[0]}, ...): a folder of all {len(classes)} classes is "
                            f"labelled in sorted order; this one has {len(found)}")
        classes = found
    classes = found if classes is None else list(classes)
    samples = []
    for name in found:
        if name not in classes:
            raise DataError(f"{root / name}: class {name!r} is not in the class list ({', '.join(classes)})")
        files = image_files(root / name)
        if not files:
            nested = [p.name for p in sorted((root / name).iterdir())
                      if p.is_dir() and not p.name.startswith(".") and holds_images(p)]
            raise DataError(f"{root / name}: empty class folder, expected at least one image" + (
                f" in it (its sub-folders {first_names(n + '/' for n in nested)} are not read: <root>/<class>/<image>, one level)"
                if nested else ""))
        samples.extend((path, classes.index(name)) for path in files)
    return samples, classes


def read_image_folder(root: Path, image_size: int = 32, channels: int = 3, max_pixels: int = DEFAULT_MAX_PIXELS,
                      *, classes: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode a whole class-per-sub-folder tree into memory (each image as `read_image` does).

    Args:
        root: The tree, <root>/<class>/<image>.
        image_size: Output height and width.
        channels: 1 or 3.
        max_pixels: Per-image pixel limit (see `read_image`).
        classes: The class list in label order, e.g. the training split's or the classes stored in a model's
            weights; label i is `classes[i]`. A sub-folder outside it is refused; a class without a sub-folder
            is fine. Default: the sub-folders of `root`, sorted by name.

    Returns:
        uint8 images (N, channels, image_size, image_size), int64 labels (N,), and the class names.
    """
    samples, classes = list_image_folder(root, classes)
    images = torch.stack([read_image(path, image_size, channels, max_pixels) for path, _ in samples])
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return images, labels, classes
