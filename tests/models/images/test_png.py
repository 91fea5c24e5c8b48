"""The PNG writer (models/images/png.py) against two independent decoders: Pillow's and the upload front end's."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from models.images.imaging import encode_png, to_uint
from models.images.png import write_png

SHAPES = [((1, 1), 8), ((37, 53), 8), ((37, 53, 3), 8), ((300, 7), 16), ((64, 80, 3), 8), ((5, 256), 16)]


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, checking each CRC on the way."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    out, i = [], 8
    while i < len(png):
        (n,) = struct.unpack(">I", png[i : i + 4])
        kind, data = png[i + 4 : i + 8], png[i + 8 : i + 8 + n]
        assert struct.unpack(">I", png[i + 8 + n : i + 12 + n])[0] == zlib.crc32(kind + data), kind
        out.append((kind, data))
        i += 12 + n
    return out


@pytest.mark.parametrize(("shape", "bits"), SHAPES)
@pytest.mark.parametrize("level", [0, 1, 3, 6, 9])
def test_pixels_round_trip_through_pillow_exactly(shape, bits, level):
    x = np.random.default_rng(sum(shape) + level).random(shape).astype(np.float32)
    png = encode_png(x, bits, {"Comment": "DERIVED"}, level)
    Image.open(io.BytesIO(png)).verify()  # Pillow's own structure and CRC checks
    im = Image.open(io.BytesIO(png))
    assert im.mode == {8: "L", 16: "I;16"}[bits] if len(shape) == 2 else im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), to_uint(x, bits))


@pytest.mark.parametrize(("shape", "bits"), SHAPES)
def test_pixels_round_trip_through_the_strict_reader_exactly(shape, bits):
    """Every file the writer makes passes the upload front end's checks (CRCs, Adler-32, exact size) and its
    rows, inflated by zlib-ng, are the pixels that went in (16-bit as big-endian sample pairs)."""
    from models.images.png_reader import inflate_image_data, read_layout

    x = np.random.default_rng(len(shape)).random(shape).astype(np.float32)
    data = encode_png(x, bits, {"Software": "dmfnet"}, 1)
    layout = read_layout(data)
    rows = np.frombuffer(inflate_image_data(data, layout), np.uint8).reshape(shape[0], -1)
    assert (rows[:, 0] == 2).all()  # every row "Up"
    pixels = np.cumsum(rows[:, 1:], axis=0, dtype=np.uint8)
    want = to_uint(x, bits)
    np.testing.assert_array_equal(pixels.view(">u2").astype(np.uint16) if bits == 16 else pixels,
                                  want.reshape(shape[0], -1))


def test_text_chunks_latin1_as_text_and_the_rest_as_utf8():
    text = {"Software": "dmfnet 1.0", "Comment": "DERIVED IMAGE - not for primary diagnosis", "Author": "Müller",
            "Title": "fused ✓ 融合"}
    png = write_png(np.zeros((4, 4), np.uint8), text)
    kinds = {data.split(b"\0")[0].decode(): kind for kind, data in _chunks(png) if kind in (b"tEXt", b"iTXt")}
    assert kinds == {"Software": b"tEXt", "Comment": b"tEXt", "Author": b"tEXt", "Title": b"iTXt"}
    assert Image.open(io.BytesIO(png)).text == text


def test_chunk_order_and_header():
    png = write_png(np.full((3, 5, 3), 7, np.uint8), {"Comment": "x"})
    kinds = [k for k, _ in _chunks(png)]
    assert kinds == [b"IHDR", b"tEXt", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBBBBB", _chunks(png)[0][1]) == (5, 3, 8, 2, 0, 0, 0)


def test_rgb_from_planes_is_written_as_its_pixels():
    """RGB given as a channel-last view of three planes: the same file as its interleaved copy, and Pillow reads
    the pixels back."""
    planes = np.random.default_rng(3).integers(0, 256, (3, 17, 23), dtype=np.uint8)
    view = np.moveaxis(planes, 0, -1)
    assert not view.flags.c_contiguous
    png = write_png(view, None, 1)
    assert png == write_png(np.ascontiguousarray(view), None, 1)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), view)


def test_fast_level_is_as_small_as_pillows():
    """ISA-L at level 1 with the Up filter: within 5% of Pillow's level-1 file on a smooth image."""
    yy, xx = np.mgrid[0:256, 0:256] / 255.0
    img = to_uint(np.stack([np.sin(6 * xx) ** 2, yy, np.cos(4 * yy * xx) ** 2], -1), 8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    assert len(write_png(img, None, 1)) <= 1.05 * len(buf.getvalue())


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.uint16), np.zeros((4, 4), np.float32),
                                 np.zeros((0, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((2, 2, 2, 2), np.uint8)])
def test_refuses_what_png_cannot_hold_here(bad):
    with pytest.raises(ValueError, match="cannot write"):
        write_png(bad)


def test_bad_keyword_is_refused():
    with pytest.raises(ValueError, match="keyword"):
        write_png(np.zeros((2, 2), np.uint8), {"": "x"})
