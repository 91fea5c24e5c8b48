"""Image decoding, validation limits and PNG encoding (one place for image I/O; colour: models/images/colour.py)."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from models.images.errors import ImageError
from models.images.png import write_png
from models.images.png_reader import (
    PngError,
    PngLayout,
    inflate_image_data,
    plain_pixels,
    read_layout,
    with_stored_image_data,
)
from models.images.preflight import MAX_METADATA_BYTES, check_metadata, tiff_pixel_format

DEFAULT_MAX_PIXELS = 4096 * 4096
DERIVED_NOTE = "DERIVED IMAGE - DM-FNet fusion - not for primary diagnosis"

# The only formats we open. Pillow would otherwise hand EPS/PS/PDF to Ghostscript (a subprocess with no
# timeout: a 73-byte endless-loop EPS held a worker for good) and accept GIF/BMP/WebP that we never promised.
ACCEPTED_FORMATS = ("PNG", "JPEG", "TIFF")


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: ``pixels`` float32 in [0, 1], (H, W) gray or (H, W, 3) RGB."""

    pixels: np.ndarray
    bit_depth: int

    @property
    def is_color(self) -> bool:
        """True for an RGB image whose channels differ (pseudo-colour); equal channels count as gray."""
        return self.pixels.ndim == 3

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.pixels.shape[0], self.pixels.shape[1]


PngImagePlugin.MAX_TEXT_MEMORY = MAX_METADATA_BYTES  # total of decompressed PNG text chunks (default 64 MB)

EXIF_ORIENTATION = 0x0112
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N")


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says, before any pixel is decoded: for size limits and memory admission."""

    width: int
    height: int
    bands: int  # 1 gray, 3 colour (or possibly colour: palette, RGBA, CMYK)

    @property
    def pixels(self) -> int:  # noqa: D102
        return self.width * self.height


@contextlib.contextmanager
def _pillow_errors(label: str) -> Iterator[None]:
    """Pillow's exceptions (opening or decoding) as ImageErrors; decompression-bomb warnings are errors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except UnidentifiedImageError:
        raise ImageError("not_an_image", f"{label}: not a recognised image (PNG, JPEG or TIFF)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("image_too_large", f"{label}: decompression bomb rejected") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError("corrupt_image", f"{label}: corrupt or truncated image ({type(exc).__name__})") from None


def _check_size(width: int, height: int, max_pixels: int, label: str) -> None:
    if width * height > max_pixels:  # checked from the header, before any pixel is decoded
        raise ImageError("image_too_large", f"{label}: {width}x{height} exceeds the {max_pixels}-pixel limit")
    if width < 8 or height < 8:
        raise ImageError("image_too_small", f"{label}: {width}x{height} is smaller than 8x8")


def _open(source: bytes, max_pixels: int, label: str) -> Image.Image | PngLayout:
    """Open (header only) with every check that needs no pixels: format, metadata bounds, pixel limits. A PNG is
    walked by the strict front end (models/images/png_reader.py, every chunk and CRC) and never opened by Pillow
    until its image data has been checked; JPEG and TIFF are opened by Pillow."""
    if not source:
        raise ImageError("empty_image", f"{label}: empty input")
    if source.startswith(b"\x89PNG"):
        try:
            layout = read_layout(source)
        except PngError as exc:
            raise ImageError("corrupt_image", f"{label}: corrupt PNG ({exc})") from None
        _check_size(layout.width, layout.height, max_pixels, label)
        return layout
    check_metadata(source, label)
    try:
        with _pillow_errors(label):
            im = Image.open(io.BytesIO(source), formats=ACCEPTED_FORMATS[1:])
    except ImageError as exc:  # a TIFF in a pixel format Pillow has no reader for is a TIFF all the same
        if exc.code == "not_an_image" and (fmt := tiff_pixel_format(source)) is not None:
            raise ImageError("unsupported_mode", f"{label}: TIFF pixel format {fmt} is not supported "
                             "(8/16-bit gray or RGB)") from None
        raise
    _check_size(*im.size, max_pixels, label)
    return im


def _decode_png(source: bytes, layout: PngLayout, label: str) -> Image.Image | np.ndarray:
    """A walked PNG's image data inflated and checked here, then unfiltered: here when it is plain (8-bit pixels,
    nothing that could orient them), else by Pillow from stored blocks."""
    try:
        rows = inflate_image_data(source, layout)
    except PngError as exc:
        raise ImageError("corrupt_image", f"{label}: corrupt PNG ({exc})") from None
    pixels = plain_pixels(rows, layout)
    if pixels is not None:
        return pixels
    stored = with_stored_image_data(source, layout, rows)
    del rows
    with _pillow_errors(label):
        im = Image.open(io.BytesIO(stored), formats=("PNG",))
        im.load()
    return im


class OpenedImage:
    """A file whose header passed every check that needs no pixels, not decoded yet: its header sizes the memory
    reservation, then :func:`decode_image` decodes it without parsing the file a second time (opening every image
    twice cost ~8% of the service's CPU per 256 px pair in an A/B). Decoded once: the decode takes the opened
    state, so a held OpenedImage keeps no decoded pixels alive."""

    __slots__ = ("header", "label", "_opened", "_source")

    def __init__(self, opened: Image.Image | PngLayout, source: bytes, label: str) -> None:
        if isinstance(opened, PngLayout):
            self.header = ImageHeader(opened.width, opened.height, 1 if opened.colour_type in (0, 4) else 3)
        else:
            self.header = ImageHeader(opened.size[0], opened.size[1], 1 if opened.mode in GRAY_MODES else 3)
        self.label = label
        self._opened: Image.Image | PngLayout | None = opened
        self._source = source

    @property
    def nbytes(self) -> int:
        """Size of the file (0 once decoded)."""
        return len(self._source)

    def take(self) -> tuple[Image.Image | PngLayout, bytes]:
        """The opened image (Pillow's, or a PNG's checked layout) and the file's bytes, once."""
        opened, source, self._opened, self._source = self._opened, self._source, None, b""
        if opened is None:
            raise RuntimeError(f"{self.label}: already decoded")
        return opened, source


def open_image(source: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, label: str = "image") -> OpenedImage:
    """Open from the header (the same checks as :func:`decode_image`, no pixel decoded)."""
    return OpenedImage(_open(source, max_pixels, label), source, label)


def decode_image(
    source: bytes | str | Path | OpenedImage, max_pixels: int = DEFAULT_MAX_PIXELS, label: str = "image"
) -> DecodedImage:
    """Decode PNG/JPEG/TIFF bytes, a file or an :class:`OpenedImage` (8/16-bit, gray or RGB) with size checks
    before decoding (an OpenedImage passed them when it was opened, under its own limit and label).

    Anything else is ``not_an_image`` (415), whatever Pillow could open: no other decoder ever runs. A PNG's
    structure, checksums and image data are checked first (models/images/png_reader.py). One orientation rule for
    every format: EXIF Orientation as Pillow reads it (eXIf, an EXIF text profile, XMP ``tiff:Orientation``) is
    applied (a phone or viewer export may store the pixels rotated).
    """
    if isinstance(source, OpenedImage):
        label = source.label
        im, source = source.take()
    else:
        if isinstance(source, (str, Path)):
            try:
                source = Path(source).read_bytes()
            except OSError as exc:
                raise ImageError("unreadable_file", f"{label}: cannot read file ({exc.strerror})") from None
        im = _open(source, max_pixels, label)
    if isinstance(im, PngLayout):
        im = _decode_png(source, im, label)
        if isinstance(im, np.ndarray):
            return _from_8bit(im)
    del source
    with _pillow_errors(label):
        im.load()
        if im.getexif().get(EXIF_ORIENTATION, 1) != 1:  # the one orientation rule, every format and path
            im = ImageOps.exif_transpose(im)
    return _to_array(im, label)


def _to_array(im: Image.Image, label: str) -> DecodedImage:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im)
        if arr.dtype.kind == "i" and arr.min() < 0:
            raise ImageError("unsupported_bit_depth", f"{label}: signed integer samples (values below 0) are not "
                             "supported: send unsigned 8/16-bit")
        if arr.max() > 65535:
            raise ImageError("unsupported_bit_depth", f"{label}: 32-bit integer images are not supported")
        return DecodedImage((arr.astype(np.float32) / 65535.0), 16)
    if mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"):
        gray = mode in ("L", "LA", "1")
        return _from_8bit(np.asarray(im if mode in ("L", "RGB") else im.convert("L" if gray else "RGB")))
    raise ImageError("unsupported_mode", f"{label}: pixel format {mode!r} is not supported (8/16-bit gray or RGB)")


def _from_8bit(pixels: np.ndarray) -> DecodedImage:
    """8-bit gray (H, W) or RGB (H, W, 3) samples as a DecodedImage; RGB whose channels are equal is gray."""
    if pixels.ndim == 3 and _channels_equal(pixels):
        pixels = pixels[..., 0]  # gray stored as RGB (compared in 8 bits, then scaled once)
    return DecodedImage(_unit_float(pixels), 8)


def _channels_equal(rgb: np.ndarray, rows: int = 32) -> bool:
    """R == G == B everywhere, compared a band of rows at a time: a colour image stops at its first coloured band
    (a 256 px PET 0.10 -> 0.02 ms; every colour upload asks), a gray one costs what one whole comparison did."""
    for top in range(0, rgb.shape[0], rows):
        band = rgb[top:top + rows]
        if not (np.array_equal(band[..., 0], band[..., 1]) and np.array_equal(band[..., 1], band[..., 2])):
            return False
    return True


def _unit_float(u8: np.ndarray) -> np.ndarray:
    """8-bit samples / 255 as float32, divided in place (one array, not two; the same values)."""
    out = u8.astype(np.float32)
    out /= np.float32(255.0)
    return out


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> 8-bit (rounded, clipped; :func:`to_uint`); 8-bit input passes unchanged."""
    return x if x.dtype == np.uint8 else to_uint(x, 8)


def resize_to(img: DecodedImage, size: tuple[int, int]) -> DecodedImage:
    """Bicubic resize to (height, width) (used only when a caller explicitly asks for it)."""
    h, w = size
    chans = [img.pixels] if not img.is_color else [img.pixels[..., c] for c in range(3)]
    out = [
        np.asarray(Image.fromarray(np.ascontiguousarray(c, dtype=np.float32)).resize((w, h), Image.Resampling.BICUBIC))
        for c in chans
    ]
    arr = out[0] if len(out) == 1 else np.stack(out, axis=-1)
    return DecodedImage(np.clip(arr, 0.0, 1.0).astype(np.float32), img.bit_depth)


def to_uint(pixels: np.ndarray, bit_depth: int = 8) -> np.ndarray:
    """[0, 1] floats -> uint8 or uint16 with rounding."""
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, not {bit_depth}")
    top = 255 if bit_depth == 8 else 65535
    # round(clip(x) * top) in one scratch array: the same values with fewer passes (every fused PNG comes here)
    scaled = np.clip(pixels, 0.0, 1.0)
    np.multiply(scaled, top, out=scaled)
    np.rint(scaled, out=scaled)
    return _c_ordered(scaled, np.uint8 if bit_depth == 8 else np.uint16)


def _c_ordered(samples: np.ndarray, dtype: type) -> np.ndarray:
    """``samples`` cast to ``dtype`` in C order, the layout every writer (PNG rows, DICOM PixelData, NIfTI RGB24)
    reads. The colour merge returns RGB as a channel-last view of three planes: cast one channel at a time, as
    numpy's general strided copy walks the 3-sample inner axis (0.54 ms for a 256 px image against 0.09 ms,
    Intel Xeon; it was paid again by each writer's own copy)."""
    if samples.ndim == 3 and not samples.flags.c_contiguous:
        out = np.empty(samples.shape, dtype)
        for channel in range(samples.shape[2]):
            out[..., channel] = samples[..., channel]
        return out
    return samples.astype(dtype)


def encode_png(pixels: np.ndarray, bit_depth: int = 8, text: dict[str, str] | None = None,
               compress_level: int = 3) -> bytes:
    """Encode [0, 1] gray or RGB as PNG (models/images/png.py); 16-bit RGB is refused.

    ``compress_level`` 0-9 as zlib's: 1-3 with ISA-L (a 256 px RGB result: ~0.6 ms, 81 kB at 1, 80 kB at 3,
    against 5.5 ms and 81 kB for Pillow's level 1), 4-9 with zlib (6: 10 ms, 72 kB); the service uses 1."""
    arr = to_uint(pixels, bit_depth)
    if bit_depth == 16 and arr.ndim == 3:
        raise ImageError("unsupported_output", "16-bit output is available for gray results only")
    return write_png(arr, text, compress_level)


def png_provenance(model: str, weights: str) -> dict[str, str]:
    """Text chunks of every fused PNG: software and model, the weights' checksum, the derived-image warning."""
    from models import __version__

    return {"Software": f"dmfnet {__version__} ({model})", "Comment": DERIVED_NOTE,
            "Source": f"weights sha256 {weights}"}
