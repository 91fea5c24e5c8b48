"""PNG writing (8/16-bit gray, 8-bit RGB, text chunks) with ISA-L's deflate at the fast levels, and libpng's
decode of the 8-bit uploads it gives exactly as Pillow does.

Why not Pillow: for a 256 px RGB result Pillow's encoder (zlib level 1 after per-row filter selection) took
5.5 ms of a pair's ~8 ms of service CPU; every row "Up"-filtered and compressed with python-isal at level 1
takes 0.5 ms for a file within 1% of the same size (measured on a 2-core AMD EPYC, bench/load.py for the whole
path). The format is small (PNG 1.2, ISO/IEC 15948): signature, IHDR, text chunks, one IDAT, IEND, each chunk
length + type + data + CRC-32. Decoders (Pillow, libpng, browsers) read it as any other PNG.
"""

from __future__ import annotations

import struct
import zlib

import imagecodecs
import numpy as np
from isal import isal_zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILTER_UP = 2  # each byte minus the byte above it: smooth medical images compress well, and it vectorises
GRAY, RGB = 0, 2  # IHDR colour types


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _text_chunk(key: str, value: str) -> bytes:
    """tEXt when the text is Latin-1 (what the standard asks), else iTXt (UTF-8, uncompressed)."""
    keyword = key.encode("latin-1")
    if not 1 <= len(keyword) <= 79:
        raise ValueError(f"PNG text keyword must be 1-79 Latin-1 characters, not {key!r}")
    try:
        return _chunk(b"tEXt", keyword + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        return _chunk(b"iTXt", keyword + b"\0\0\0\0\0" + value.encode("utf-8"))


def deflate(data: bytes | memoryview, level: int) -> bytes:
    """zlib stream at ``level`` 0-9: 1-3 with ISA-L (3-5x faster than zlib at a like ratio), 0 stored, 4-9 zlib's
    own (where a caller asks for small files over speed)."""
    if 1 <= level <= 3:
        return isal_zlib.compress(data, level)
    return zlib.compress(data, level)


def write_png(pixels: np.ndarray, text: dict[str, str] | None = None, level: int = 1) -> bytes:
    """PNG bytes of uint8 gray (H, W), uint8 RGB (H, W, 3) or uint16 gray (H, W); ``text`` as text chunks."""
    if pixels.dtype not in (np.uint8, np.uint16) or pixels.ndim not in (2, 3) or pixels.size == 0 \
            or (pixels.ndim == 3 and (pixels.shape[2] != 3 or pixels.dtype != np.uint8)):
        raise ValueError(f"cannot write {pixels.dtype} {pixels.shape} as PNG: uint8 gray/RGB or uint16 gray")
    height, width = pixels.shape[:2]
    colour = RGB if pixels.ndim == 3 else GRAY
    bits = 8 * pixels.dtype.itemsize
    rows = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder(">")).view(np.uint8).reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = FILTER_UP
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG's does
    header = struct.pack(">IIBBBBB", width, height, bits, colour, 0, 0, 0)
    chunks = [_chunk(b"IHDR", header)]
    chunks += [_text_chunk(k, v) for k, v in (text or {}).items()]
    chunks += [_chunk(b"IDAT", deflate(memoryview(filtered), level)), _chunk(b"IEND", b"")]
    return SIGNATURE + b"".join(chunks)


# Chunks that may change what Pillow makes of the pixels: tRNS (libpng would add an alpha channel), eXIf (an
# orientation to apply), acTL (an APNG, whose first frame Pillow picks); and Pillow also reads EXIF from
# ImageMagick's text chunk of this keyword.
_PILLOW_ONLY = frozenset((b"tRNS", b"eXIf", b"acTL"))
_TEXT_CHUNKS = frozenset((b"tEXt", b"zTXt", b"iTXt"))
_EXIF_TEXT_KEY = b"Raw profile type exif\0"


def _libpng_gives_pillows_pixels(source: bytes) -> bool:
    """8-bit, non-interlaced, and no chunk of ``_PILLOW_ONLY`` nor an EXIF text chunk (a walk over the chunk
    headers: a few steps per file, where searching the whole file for each name cost ~2% of a pair's CPU)."""
    if source[24] != 8 or source[28] != 0:
        return False
    pos = 8
    while pos + 8 <= len(source):
        length, kind = int.from_bytes(source[pos:pos + 4], "big"), source[pos + 4:pos + 8]
        if kind in _PILLOW_ONLY or (kind in _TEXT_CHUNKS and source.startswith(_EXIF_TEXT_KEY, pos + 8)):
            return False
        if kind == b"IEND":
            break
        pos += 12 + length
    return True


def read_8bit_png(source: bytes, size: tuple[int, int]) -> np.ndarray | None:
    """The pixels of a PNG that Pillow opened as 8-bit gray or RGB ("L"/"RGB", ``size`` (width, height)), decoded
    by libpng (imagecodecs) when it is non-interlaced and nothing in it can make Pillow's samples differ; else None
    (Pillow decodes). ValueError: damaged.

    Pillow, inflating and unfiltering row by row, took ~2x as long per 256 px image, and the two decodes of every
    pair were the service's largest CPU item (service CPU 4.6 -> 4.0 ms per pair in an interleaved A/B of
    bench/service_only.py, 2-core EPYC). Pillow still opened the file: the format allow-list, metadata checks
    and pixel limits are the same for both. libpng checks every CRC and zlib's Adler-32, so a damaged file is
    refused, not decoded into a wrong picture (pyspng, measured too, decoded a flipped bit without a word).
    """
    if not _libpng_gives_pillows_pixels(source):
        return None
    try:
        pixels = imagecodecs.png_decode(source)
    except imagecodecs.PngError as exc:
        raise ValueError(str(exc)) from None
    if pixels.shape[:2] != size[::-1] or pixels.dtype != np.uint8 or pixels.shape[2:] not in ((), (3,)):
        raise ValueError("pixels do not match the header")
    return pixels
