"""Checks on a JPEG or TIFF's bytes before Pillow parses them: metadata bounds, and naming a TIFF pixel format no
decoder of ours reads. (A PNG's are in models/images/png_reader.py.)"""

from __future__ import annotations

import struct

from models.images.errors import ImageError

# Metadata bounds, checked before Pillow parses a file: Pillow joins JPEG APP segments by repeated
# concatenation (58 MB of 64 kB Exif segments took 19.6 s, quadratic) and keeps PNG text chunks in memory.
MAX_METADATA_SEGMENTS = 128
MAX_METADATA_BYTES = 8 * 1024 * 1024
MAX_HEADER_SEGMENTS = 1024  # all JPEG segments before the scan (tables included): keeps this scan short


def check_metadata(data: bytes, label: str = "image") -> None:
    """Refuse a JPEG whose APPn/COM segments before the scan exceed the bounds (count or total bytes)."""
    if not data.startswith(b"\xff\xd8"):
        return
    pos, count, total = 2, 0, 0
    for _ in range(MAX_HEADER_SEGMENTS):
        if pos + 4 > len(data) or data[pos] != 0xFF:
            return  # not our business: Pillow reports a malformed file
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        if marker == 0xDA:  # start of scan: the metadata is behind us
            return
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            count, total = count + 1, total + length
            if count > MAX_METADATA_SEGMENTS or total > MAX_METADATA_BYTES:
                raise ImageError("metadata_too_large", f"{label}: more than {MAX_METADATA_SEGMENTS} metadata "
                                 f"segments or {MAX_METADATA_BYTES} bytes of Exif/ICC/comments")
        pos += 2 + length
    raise ImageError("metadata_too_large", f"{label}: more than {MAX_HEADER_SEGMENTS} segments before the image data")


_TIFF_SAMPLE_FORMATS = {1: "unsigned", 2: "signed", 3: "float"}


def tiff_pixel_format(source: bytes) -> str | None:
    """"S samples x B-bit KIND" from a TIFF's first directory (no decoder runs), or None if it is no readable
    TIFF header. Used to name what Pillow cannot read: 16-bit gray + alpha, float16, ..."""
    order = {b"II*\0": "<", b"MM\0*": ">"}.get(source[:4])
    if order is None or len(source) < 8:
        return None
    try:
        (ifd,) = struct.unpack_from(order + "I", source, 4)
        (count,) = struct.unpack_from(order + "H", source, ifd)
        tags = {}
        for n in range(min(count, 512)):
            tag, kind, items, value = struct.unpack_from(order + "HHI4s", source, ifd + 2 + 12 * n)
            size = 2 if kind == 3 else 4
            where = value if items * size <= 4 else source[struct.unpack_from(order + "I", value)[0]:]
            tags[tag] = struct.unpack_from(order + ("H" if kind == 3 else "I"), where)[0]  # the first value
    except struct.error:
        return None
    if 256 not in tags or 257 not in tags:  # no width or height: not a TIFF we could name, a broken file
        return None
    samples, bits = tags.get(277, 1), tags.get(258, 1)
    return f"{samples} sample(s) x {bits}-bit {_TIFF_SAMPLE_FORMATS.get(tags.get(339, 1), 'unknown')}"
