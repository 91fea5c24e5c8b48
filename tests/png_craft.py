"""PNG files built to show one property each (for the reader's tests, the fuzz seeds and the hostile-upload tests),
and the independent reference decode they are compared with."""

from __future__ import annotations

import functools
import io
import zlib

import numpy as np
from PIL import Image

from models.images.png import _chunk


def pillow_png(arr: np.ndarray | Image.Image, **save) -> bytes:
    """``arr`` written by Pillow (its own encoder: adaptive filters)."""
    buf = io.BytesIO()
    (arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(buf, "PNG", **save)
    return buf.getvalue()


def chunks(png: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, data length) of every chunk."""
    out, pos = [], 8
    while pos + 8 <= len(png):
        length = int.from_bytes(png[pos:pos + 4], "big")
        out.append((pos, png[pos + 4:pos + 8], length))
        pos += 12 + length
    return out


def with_chunk(png: bytes, kind: bytes, data: bytes, after: bytes = b"IHDR") -> bytes:
    """``png`` with one more chunk (CRC computed) right after the first chunk of type ``after``."""
    for pos, k, length in chunks(png):
        if k == after:
            end = pos + 12 + length
            return png[:end] + _chunk(kind, data) + png[end:]
    raise ValueError(f"no {after!r} chunk")


def idat_stream(png: bytes) -> bytes:
    """The zlib stream of the image data (all IDAT chunks joined)."""
    return b"".join(png[p + 8:p + 8 + n] for p, k, n in chunks(png) if k == b"IDAT")


def with_stream(png: bytes, stream: bytes, parts: int = 1, between: bytes = b"") -> bytes:
    """``png`` with its image data replaced by ``stream`` (any bytes) cut into ``parts`` IDAT chunks, ``between``
    put after the first; every CRC right."""
    spots = [(p, n) for p, k, n in chunks(png) if k == b"IDAT"]
    first, last = spots[0][0], spots[-1][0] + 12 + spots[-1][1]
    step = max(1, -(-len(stream) // parts))
    pieces = [_chunk(b"IDAT", stream[i:i + step]) for i in range(0, len(stream), step)] or [_chunk(b"IDAT", b"")]
    return png[:first] + pieces[0] + between + b"".join(pieces[1:]) + png[last:]


def flip_bit(png: bytes, offset: int, bit: int, fix_crc: bool = True) -> bytes:
    """``png`` with one bit flipped at ``offset``; the CRC of its chunk made right again when ``fix_crc``."""
    data = bytearray(png)
    data[offset] ^= 1 << bit
    if fix_crc:
        for pos, _, length in chunks(png):
            if pos + 8 <= offset < pos + 8 + length:
                crc = zlib.crc32(bytes(data[pos + 4:pos + 8 + length]))
                data[pos + 8 + length:pos + 12 + length] = crc.to_bytes(4, "big")
    return bytes(data)


def reference_pixels(png: bytes) -> np.ndarray:
    """Pillow's decode of the original file (its own inflate and unfilter), oriented as its EXIF says, as the
    service's [0, 1] float planes (bench/fuzz.py's oracle, one implementation); fails if Pillow refuses it."""
    pixels = fuzz_module().pillow_reference(png)
    assert pixels is not None, "Pillow refuses this file"
    return pixels


@functools.cache
def fuzz_module():  # noqa: ANN201 - bench/fuzz.py as a module (bench/ is not a package), loaded once
    """bench/fuzz.py: the fuzz targets, their checks and the Pillow oracle."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("dmfnet_bench_fuzz", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def incomplete_code_stream(count: int) -> bytes:
    """A zlib stream whose dynamic block has an incomplete code-length code (zlib and libpng refuse it; ISA-L
    decodes it): it inflates to ``count`` zero bytes with a right Adler-32."""
    bits: list[int] = []

    def put(value: int, n: int) -> None:  # deflate's fields: least significant bit first
        bits.extend((value >> i) & 1 for i in range(n))

    def code(value: int, n: int) -> None:  # Huffman codes: most significant bit first
        bits.extend((value >> i) & 1 for i in reversed(range(n)))

    put(1, 1)
    put(2, 2)  # final block, dynamic codes
    put(0, 5)
    put(0, 5)
    put(14, 4)  # 257 literal/length codes, 1 distance code, 18 code-length codes
    order = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1]
    lengths = {18: 2, 1: 2}  # two codes of two bits: half the code space unused (incomplete)
    for symbol in order:
        put(lengths.get(symbol, 0), 3)
    code(0, 2)  # literal 0 gets length 1
    code(1, 2)
    put(127, 7)  # 138 zeros
    code(1, 2)
    put(106, 7)  # 117 zeros
    code(0, 2)  # end-of-block gets length 1
    code(0, 2)  # the one distance code, length 1
    bits.extend([0] * count)  # literal 0 (code 0) count times
    code(1, 1)  # end of block
    while len(bits) % 8:
        bits.append(0)
    body = bytes(sum(b << i for i, b in enumerate(bits[k:k + 8])) for k in range(0, len(bits), 8))
    return b"\x78\x01" + body + zlib.adler32(bytes(count)).to_bytes(4, "big")
