"""PNG writing (8/16-bit gray, 8-bit RGB, text chunks) with ISA-L's deflate at the fast levels, and libpng's
decode of the 8-bit uploads it gives exactly as Pillow does (their image data inflated by ISA-L first).

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
STORED_BLOCK = 65535  # deflate's stored blocks hold at most this many bytes


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


def _chunks(source: bytes):  # noqa: ANN202 - an iterator of (position, type, data length)
    """The chunks after the signature as (position, type, data length), up to IEND (a walk over the chunk
    headers: a few steps per file)."""
    pos = 8
    while pos + 8 <= len(source):
        length, kind = int.from_bytes(source[pos:pos + 4], "big"), source[pos + 4:pos + 8]
        yield pos, kind, length
        if kind == b"IEND":
            return
        pos += 12 + length


def _libpng_gives_pillows_pixels(source: bytes) -> bool:
    """8-bit, non-interlaced, and no chunk of ``_PILLOW_ONLY`` nor an EXIF text chunk (searching the whole file
    for each name instead of walking the chunk headers cost ~2% of a pair's CPU)."""
    if source[24] != 8 or source[28] != 0:
        return False
    return not any(kind in _PILLOW_ONLY or (kind in _TEXT_CHUNKS and source.startswith(_EXIF_TEXT_KEY, pos + 8))
                   for pos, kind, _ in _chunks(source))


def _with_stored_pixels(source: bytes, size: tuple[int, int]) -> bytes | None:
    """The same PNG with its image data inflated here by ISA-L and stored uncompressed (deflate's stored blocks
    in one IDAT), so that libpng only copies and unfilters it; None (decode the file as it is) when anything is
    unusual: a colour type other than gray/RGB, IDAT chunks apart, a CRC or the zlib stream wrong, more or less
    data than the header's rows. Every other chunk is kept byte for byte, so libpng reads the same file.

    Why: the zlib that libpng links in imagecodecs' wheels (1.2.13) inflated at half ISA-L's speed and inflating
    was most of a decode (256 px gray: 0.41 -> 0.20 ms, RGB 0.40 -> 0.34 ms, the same pixels; 2-core EPYC).
    ISA-L checks the stream's Adler-32 and this walk every IDAT's CRC, so a damaged file still falls back to
    libpng's own refusal. Transient memory: the inflated rows twice (2x8 bits per sample), below what the float
    planes made from them take next (a 2048 px gray + colour pair's decode peaks at 44.2 B/px either way,
    tracemalloc).
    """
    channels = {GRAY: 1, RGB: 3}.get(source[25])
    if channels is None:
        return None
    width, height = size
    expected = height * (1 + width * channels)  # a filter byte per row
    first = end = None
    parts = []
    for pos, kind, length in _chunks(source):
        if kind != b"IDAT":
            continue
        if end is not None and pos != end:  # image data in two places: libpng's error to give
            return None
        typed = memoryview(source)[pos + 4:pos + 8 + length]  # type + data: what the CRC covers
        if len(typed) != 4 + length or source[pos + 8 + length:pos + 12 + length] != \
                isal_zlib.crc32(typed).to_bytes(4, "big"):
            return None
        first = pos if first is None else first
        parts.append(typed[4:])
        end = pos + 12 + length
    if first is None:
        return None
    stream = b"".join(parts)
    inflater = isal_zlib.decompressobj()
    try:
        rows = inflater.decompress(stream, expected + 1)
    except isal_zlib.error:
        return None
    if not inflater.eof or len(rows) != expected or inflater.unused_data:
        return None
    view = memoryview(rows)
    pieces = [b"\x78\x01"]  # zlib header: deflate, 32 kB window, no dictionary (a multiple of 31, as required)
    for start in range(0, expected, STORED_BLOCK):
        block = view[start:start + STORED_BLOCK]
        pieces += [struct.pack("<BHH", start + STORED_BLOCK >= expected, len(block), 0xFFFF ^ len(block)), block]
    pieces.append(stream[-4:])  # the same bytes, so the same Adler-32
    crc = isal_zlib.crc32(b"IDAT")
    for piece in pieces:
        crc = isal_zlib.crc32(piece, crc)
    data_length = sum(len(piece) for piece in pieces)
    return b"".join([source[:first], struct.pack(">I", data_length), b"IDAT", *pieces, struct.pack(">I", crc),
                     source[end:]])


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
        pixels = imagecodecs.png_decode(_with_stored_pixels(source, size) or source)
    except imagecodecs.PngError as exc:
        raise ValueError(str(exc)) from None
    if pixels.shape[:2] != size[::-1] or pixels.dtype != np.uint8 or pixels.shape[2:] not in ((), (3,)):
        raise ValueError("pixels do not match the header")
    return pixels
