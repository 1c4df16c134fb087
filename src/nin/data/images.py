"""Photos as the model sees them: the one decoder of `nin predict`, `nin serve`, `Classifier` and `nin visualize`.

    pixels = read_image("cat.jpg", 32, 3)              # uint8 (3, 32, 32): as shown, the centre square, resized
    decoded = decode_image(upload_bytes, 32, 3)        # the same from bytes, with where the square lies
    photo = read_photo("cat.jpg", 3)                   # the whole photo as shown (PIL), to draw maps on

An image is opened from a path or from bytes behind the decompression-bomb guard (its pixel count, read from
the header, is checked before any pixel is decoded), shown as a viewer shows it (EXIF orientation applied,
16-bit and float depths scaled to 8 bits, alpha composited over white, a stencil drawn only in alpha taken as
its alpha), and cut to what the model sees: the centre square of the photo, resized to the model's input.

Memory is bounded by what the file declares: the square (with the few pixels around it that the resize
filter reads) is cut out of the stored pixels before anything is rotated, composited, converted or resized,
and what needs converting is converted `PIXELS_PER_TILE` pixels at a time, so a 300000×1 strip costs a few
pixels and a 6000×6000 RGBA photo its own decoded pixels plus one 8-bit copy (docs/reliability.md, round 3,
has the measured bound: 16 bytes a declared pixel + 48 MiB). Image folders (<root>/<class>/<image>) are read
here too, and `list_images` turns files, folders and globs into a list of image files.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from nin.data.readers import cannot_read, require_file
from nin.errors import DataError

__all__ = ["DEFAULT_MAX_PIXELS", "INPUT_HANDLING", "ImageTooLarge", "NotAnImage", "DecodedImage", "centre_square",
           "square_of", "model_pixels", "decode_image", "read_image", "read_photo"]

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold (about 0.25 GiB of RGB)
# How an image becomes the model's input, in words: the exported graphs' sidecar and weights.meta say this, so a
# client that prepares images itself (docs/deploy.md) can do what `nin predict` does.
INPUT_HANDLING = {
    "orientation": "EXIF orientation applied (as a viewer shows the photo)",
    "depth": "16-bit integers scaled by value / 257; float and other integer images by their own min-max range",
    "alpha": "composited over white, round(colour * alpha / 255 + 255 * (1 - alpha / 255)); an image whose visible "
             "pixels all have one colour (a stencil) becomes its alpha channel, bright on black",
    "channels": "converted to RGB (3 channels) or L (1 channel, ITU-R 601-2 luma) by Pillow",
    "crop": "the shorter side scaled to the input size (each side rounded, never below it), then the centre square "
            "cut (offsets rounded down): Pillow's bilinear resize of that square",
    "dtype": "uint8, (N, C, H, W)",
}
# Pixels of a large image examined or converted at a time (stencil test, depth range, compositing): the numpy
# temporaries of one tile (compositing: 8 bytes a pixel in uint16; a float image's scaling: 16) stay under 5 MB.
PIXELS_PER_TILE = 1 << 18

_pillow_limit_lock = threading.Lock()  # Image.MAX_IMAGE_PIXELS is process-wide: one decode sets it at a time


class ImageTooLarge(DataError):
    """An image with more pixels than the limit (a decompression bomb, or just too large)."""


class NotAnImage(DataError):
    """Bytes that no accepted image format recognises."""


@dataclass
class DecodedImage:
    """An image ready for the model, and where the model's square lies in the (oriented) photo."""

    pixels: torch.Tensor  # uint8 (C, S, S)
    width: int  # the photo after EXIF orientation, in pixels
    height: int
    box: tuple[float, float, float, float]  # (left, top, width, height) of the centre square the model saw


# ---------------------------------------------------------------------------------------------------------------
# Opening, behind the pixel limit
# ---------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _pillow_limit(max_pixels: int):
    """Pillow's own bomb guard set to ``max_pixels`` for one decode (it warns above it, refuses above twice it)."""
    with _pillow_limit_lock:
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _decode(source: str | os.PathLike | bytes, max_pixels: int, convert, formats: tuple[str, ...] | None = None):
    """Open ``source`` (a path or bytes), refuse it in one line when it is missing, too large or damaged, else
    return ``convert(image)``. Errors name the path, or "image" for bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        where, stream = "image", io.BytesIO(source)
        if not source:
            raise DataError("empty upload: send an image file")
    else:
        path = Path(source)
        require_file(path)
        where, stream = str(path), path
    try:
        with _pillow_limit(max_pixels), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream, formats=formats) as image:
                width, height = image.size  # from the header, before any pixel is decoded
                if width * height > max_pixels:
                    raise ImageTooLarge(f"{where}: {width}x{height} image exceeds the {max_pixels:,}-pixel limit")
                return convert(image)
    except DataError:
        raise
    except PermissionError as error:
        raise cannot_read(Path(where), error) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's own check, at open
        raise ImageTooLarge(f"{where}: exceeds the {max_pixels:,}-pixel limit (refused before decoding)") from None
    except UnidentifiedImageError:
        kinds = f" ({', '.join(formats)})" if formats else ""
        raise NotAnImage(f"{where}: not an image of an accepted type{kinds}") from None
    except Exception as error:  # truncated data, bad chunks, unsupported modes
        raise DataError(f"{where}: unsupported or damaged image ({type(error).__name__})") from None


# ---------------------------------------------------------------------------------------------------------------
# As a viewer shows it
# ---------------------------------------------------------------------------------------------------------------

def _tiles(width: int, height: int):
    """Boxes (left, top, right, bottom) covering a ``width``×``height`` image, row band by row band, each of at most
    `PIXELS_PER_TILE` pixels (a row wider than that is cut into pieces)."""
    rows, columns = max(1, PIXELS_PER_TILE // width), min(width, PIXELS_PER_TILE)
    for top in range(0, height, rows):
        for left in range(0, width, columns):
            yield left, top, min(width, left + columns), min(height, top + rows)


def _tile_arrays(image: Image.Image, mode: str | None = None):
    """The image's pixels as numpy arrays (converted to ``mode`` when given), one tile at a time."""
    for box in _tiles(*image.size):
        tile = image.crop(box)
        yield np.asarray(tile.convert(mode) if mode else tile)


def _depth_range(image: Image.Image) -> tuple[float, float] | None:
    """How a deep image ("I", "I;16", "F") maps to 8 bits: None for /257 (16-bit integers), else (low, high),
    the finite min–max range of the whole image; read a tile at a time."""
    low, high, integers_in_16_bits = math.inf, -math.inf, True
    for rows in _tile_arrays(image):
        if rows.dtype.kind not in "iu" or (rows.size and (rows.min() < 0 or rows.max() > 65535)):
            integers_in_16_bits = False
        finite = rows[np.isfinite(rows)] if rows.dtype.kind == "f" else rows
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    if integers_in_16_bits:
        return None
    return (low, high) if math.isfinite(low) else (0.0, 0.0)


def _to_8_bits(array: np.ndarray, depth: tuple[float, float] | None) -> np.ndarray:
    """16-bit integers by their type's range (value / 257); floats and other integers by ``depth``'s min–max."""
    if depth is None:
        return np.round(array / 257).astype(np.uint8)
    low, high = depth
    scaled = (array.astype(np.float64) - low) * (255 / (high - low) if high > low else 0.0)
    return np.round(np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0).clip(0, 255)).astype(np.uint8)


def _has_alpha(image: Image.Image) -> bool:
    return "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info


def _is_stencil(image: Image.Image) -> bool:
    """Content only in alpha: alpha varies and every visible pixel has one colour (a digit drawn in alpha);
    read a tile of the RGBA image at a time."""
    first, alpha_low, alpha_high = None, 255, 0
    for rows in _tile_arrays(image, "RGBA"):
        alpha_low, alpha_high = min(alpha_low, int(rows[..., 3].min())), max(alpha_high, int(rows[..., 3].max()))
        visible = rows[..., :3][rows[..., 3] > 0]
        if not len(visible):
            continue
        first = visible[0] if first is None else first
        if not (visible == first).all():
            return False
    return alpha_low < alpha_high


@dataclass(frozen=True)
class _Appearance:
    """What showing a region needs to know about the whole image."""

    depth: tuple[float, float] | None | bool  # False: 8-bit; None: 16-bit /257; (low, high): min–max
    alpha: bool
    stencil: bool


def _appearance(image: Image.Image) -> _Appearance:
    deep = image.mode in ("I", "F") or image.mode.startswith("I;16")
    alpha = _has_alpha(image)
    return _Appearance(_depth_range(image) if deep else False, alpha, alpha and _is_stencil(image))


def _show_tile(tile: Image.Image, look: _Appearance, mode: str) -> Image.Image:
    """One tile as a viewer shows it, in ``mode`` ("L" or "RGB"): 8 bits, alpha composited over white in
    integers, round(colour·alpha/255 + 255·(1 − alpha/255)) exactly (or, for a stencil, its alpha as the ink)."""
    if look.depth is not False:
        tile = Image.fromarray(_to_8_bits(np.asarray(tile), look.depth), "L")
    if look.alpha:
        rgba = np.asarray(tile.convert("RGBA"))
        if look.stencil:
            seen = np.repeat(rgba[..., 3:], 3, axis=2)
        else:  # in uint16, in place: colour·alpha + 255·(255 − alpha) + 127 is at most 65152
            alpha = rgba[..., 3:].astype(np.uint16)
            seen = rgba[..., :3].astype(np.uint16)
            seen *= alpha
            seen += (255 - alpha) * 255 + 127  # (h, w, 1), over the three colours
            seen //= 255
            seen = seen.astype(np.uint8)
        tile = Image.fromarray(np.ascontiguousarray(seen), "RGB")
    return tile.convert(mode)


def _show(region: Image.Image, look: _Appearance, channels: int) -> Image.Image:
    """A region of an image as a viewer shows it, in "L" (``channels`` 1) or "RGB" (3), converted a tile at a
    time (every step is per pixel): the region itself when it needs no conversion."""
    mode = "L" if channels == 1 else "RGB"
    if look.depth is False and not look.alpha and region.mode == mode:
        return region
    shown = Image.new(mode, region.size)
    for box in _tiles(*region.size):
        shown.paste(_show_tile(region.crop(box), look, mode), box[:2])
    return shown


# EXIF orientation -> the transposition that shows the stored pixels upright (as ImageOps.exif_transpose)
_ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) a viewer applies; 1 when there is none or the EXIF block is damaged."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block: a viewer shows the pixels unrotated, and so do we
        return 1
    return orientation if orientation in _ORIENTATIONS else 1


def _oriented(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a damaged EXIF block: a viewer shows the pixels unrotated, and so do we
        return image


def _stored_box(box: tuple[int, int, int, int], orientation: int, width: int, height: int) -> tuple[int, ...]:
    """The box of the stored pixels that EXIF ``orientation`` shows as ``box`` (left, top, right, bottom) of the
    upright photo; ``width``×``height`` is the stored size."""
    left, top, right, bottom = box
    return {1: (left, top, right, bottom),
            2: (width - right, top, width - left, bottom),  # mirrored left-right
            3: (width - right, height - bottom, width - left, height - top),  # rotated 180°
            4: (left, height - bottom, right, height - top),  # mirrored top-bottom
            5: (top, left, bottom, right),  # transposed (mirrored along the main diagonal)
            6: (top, height - right, bottom, height - left),  # shown rotated 90° clockwise
            7: (width - bottom, height - right, width - top, height - left),  # transversed
            8: (width - bottom, left, width - top, right)}[orientation]  # shown rotated 90° counter-clockwise


# ---------------------------------------------------------------------------------------------------------------
# What the model sees
# ---------------------------------------------------------------------------------------------------------------

def _resized_crop(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """How the model's square comes out of a ``width``×``height`` photo: the photo resized so that its shorter side
    is ``size`` (each side rounded, never below ``size``), then the centre ``size``×``size`` cut with the offsets
    rounded down: (resized width, resized height, left, top) in the resized photo's pixels."""
    scale = size / min(width, height)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    return (*resized, (resized[0] - size) // 2, (resized[1] - size) // 2)


def centre_square(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The part of a ``width``×``height`` photo that the model sees at ``size``×``size``, in the photo's pixels, as
    (left, top, right, bottom): `_resized_crop`'s square mapped back through each axis's own scale."""
    resized_width, resized_height, left, top = _resized_crop(width, height, size)
    x_scale, y_scale = resized_width / width, resized_height / height
    return left / x_scale, top / y_scale, (left + size) / x_scale, (top + size) / y_scale


def model_pixels(image: Image.Image, size: int, channels: int) -> tuple[torch.Tensor, tuple[float, ...]]:
    """What the model sees of a decoded image: uint8 (channels, size, size), and the square's box (left, top,
    width, height) in the oriented photo, at the shorter side's scale (where a page draws the class map).

    The square is cut first (with the margin the bilinear filter reads), from the stored pixels, then shown, turned
    upright and resized, which gives the pixels that resizing the whole upright photo and cutting its centre gives,
    at the cost of the square alone.
    """
    assert channels in (1, 3), f"channels must be 1 or 3, got {channels}"
    image.load()  # Pillow turns a TIFF upright while loading it (and drops its orientation tag)
    orientation = _orientation(image)
    width, height = image.size[::-1] if orientation in (5, 6, 7, 8) else image.size  # as shown
    region_box, inside = _cut(width, height, size)
    stored = _stored_box(region_box, orientation, *image.size)
    region = image if stored == (0, 0, *image.size) else image.crop(stored)  # a whole photo is not copied
    region = _show(region, _appearance(image), channels)
    if orientation != 1:  # the cut region turned upright, not the photo
        region = region.transpose(_ORIENTATIONS[orientation])
    array = np.asarray(_resized(region, inside, size), dtype=np.uint8).reshape(size, size, channels)
    _, _, left_px, top_px = _resized_crop(width, height, size)
    scale = size / min(width, height)  # the box as the page draws it: a square, at the shorter side's scale
    box = (left_px / scale, top_px / scale, size / scale, size / scale)
    return torch.from_numpy(array.transpose(2, 0, 1).copy()), box


def square_of(image: Image.Image, size: int) -> Image.Image:
    """The centre square of ``image`` (as stored: no orientation, no conversion) resized to ``size``×``size`` with
    `model_pixels`' geometry, in any mode Pillow resizes ("F" included: a float tensor's channel)."""
    region_box, inside = _cut(*image.size, size)
    return _resized(image.crop(region_box), inside, size)


def _cut(width: int, height: int, size: int) -> tuple[tuple[int, int, int, int], tuple[float, float, float, float]]:
    """The region to cut from a ``width``×``height`` photo (the centre square and the margin the bilinear filter
    reads) and where the square lies inside that region."""
    left, top, right, bottom = centre_square(width, height, size)
    margin = math.ceil(max(1.0, (right - left) / size)) + 2  # the bilinear filter's reach, in source pixels
    region_box = (max(0, math.floor(left) - margin), max(0, math.floor(top) - margin),
                  min(width, math.ceil(right) + margin), min(height, math.ceil(bottom) + margin))
    return region_box, (left - region_box[0], top - region_box[1], right - region_box[0], bottom - region_box[1])


def _resized(region: Image.Image, inside: tuple[float, float, float, float], size: int) -> Image.Image:
    """The square ``inside`` the region at ``size``×``size``: a plain cut when it already is, else Pillow's
    bilinear resize of that box (the filter reading the margin around it)."""
    if (inside[2] - inside[0], inside[3] - inside[1]) == (size, size) and all(float(v).is_integer() for v in inside):
        return region.crop(tuple(int(v) for v in inside))
    return region.resize((size, size), Image.BILINEAR, box=inside)


def read_image(path: str | os.PathLike, image_size: int, channels: int,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode one image file as the model sees it (see the module docstring): uint8 (channels, size, size).

    16-bit images ("I;16", and "I" with values in 0..65535, as Pillow opens 16-bit PNGs) are scaled by the
    type's full range (value / 257), other "I" and float ("F", float TIFF) images by their own min–max range;
    images with alpha (RGBA, LA, P or L/RGB with a transparent colour) are composited over white, except that an
    image whose visible pixels all have one colour (a stencil) becomes its alpha channel, ink bright on black.

    Args:
        path: Any format Pillow decodes.
        image_size: Output height and width.
        channels: 1 (grayscale) or 3 (RGB).
        max_pixels: Refuse images with more pixels than this (decompression-bomb guard), checked before decoding.
    """
    assert channels in (1, 3), f"channels must be 1 or 3, got {channels}"
    return _decode(path, max_pixels, lambda image: model_pixels(image, image_size, channels)[0])


def decode_image(data: bytes, image_size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 formats: tuple[str, ...] | None = None) -> DecodedImage:
    """Decode an image held in memory (an upload) as `read_image` decodes a file, keeping where the square lies.

    Raises:
        ImageTooLarge: More than ``max_pixels`` pixels. NotAnImage: no format in ``formats`` (None: any Pillow
        knows) recognises the bytes. DataError: empty or damaged.
    """
    def convert(image: Image.Image) -> DecodedImage:
        pixels, box = model_pixels(image, image_size, channels)
        width, height = image.size[::-1] if _orientation(image) in (5, 6, 7, 8) else image.size  # as shown
        return DecodedImage(pixels, width, height, box)

    return _decode(data, max_pixels, convert, formats)


def read_photo(path: str | os.PathLike, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode one image as `read_image` shows it, but whole and at its own size: a PIL image ("L" or "RGB").

    `nin visualize --images` draws the class map on it; the square `read_image` cuts is its `centre_square`.
    """
    assert channels in (1, 3), f"channels must be 1 or 3, got {channels}"

    def convert(image: Image.Image) -> Image.Image:
        image = _oriented(image)
        return _show(image, _appearance(image), channels)

    return _decode(path, max_pixels, convert)
