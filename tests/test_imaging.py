import io
import zlib

import numpy as np
import pytest
from PIL import Image

from models.images.imaging import (
    ImageError,
    decode_image,
    encode_png,
    merge_luma,
    open_image,
    rgb_to_ycbcr,
    split_luma,
    ycbcr_to_rgb,
)
from models.images.png import _chunk
from tests.conftest import decoded


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_decode_8bit_gray_rgb_and_gray_stored_as_rgb():
    gray = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(48, 64)
    d = decode_image(_png(gray))
    assert d.bit_depth == 8 and not d.is_color and d.size == (48, 64)
    np.testing.assert_allclose(d.pixels * 255, gray, atol=1e-3)
    assert not decode_image(_png(np.stack([gray] * 3, -1))).is_color
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    assert decode_image(_png(rgb)).is_color


def test_an_opened_image_decodes_as_its_bytes_do_once_and_keeps_its_own_limit_and_label():
    rgb = np.random.default_rng(1).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    arr16 = np.linspace(0, 65535, 40 * 40).astype(np.uint16).reshape(40, 40)
    for data in (_png(rgb), _png(rgb, "JPEG"), _png(arr16, "TIFF")):
        opened = open_image(data, label="functional")
        direct = decode_image(data)
        header = opened.header
        via_open = decode_image(opened, max_pixels=1)  # checked when opened, under the limit given then
        assert (header.width, header.height) == via_open.size[::-1]
        assert via_open.bit_depth == direct.bit_depth and np.array_equal(via_open.pixels, direct.pixels)
        with pytest.raises(RuntimeError, match="functional: already decoded"):
            decode_image(opened)
    with pytest.raises(ImageError) as exc:
        open_image(_png(rgb), max_pixels=100, label="mri")
    assert exc.value.code == "image_too_large" and exc.value.args[0].startswith("mri:")


def test_decode_16bit_keeps_precision():
    arr = np.linspace(0, 65535, 40 * 40).astype(np.uint16).reshape(40, 40)
    d = decode_image(_png(arr))
    assert d.bit_depth == 16
    np.testing.assert_allclose(d.pixels * 65535, arr, atol=0.5)


def test_decode_jpeg_and_tiff():
    rgb = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert decode_image(_png(rgb, "JPEG")).size == (32, 32)
    arr16 = np.full((16, 16), 1000, np.uint16)
    assert decode_image(_png(arr16, "TIFF")).bit_depth == 16


@pytest.mark.parametrize(
    ("data", "code", "status"),
    [
        (b"", "empty_image", 422),
        (b"definitely not an image", "not_an_image", 415),
        (_png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))[:300], "corrupt_image", 422),
        (_png(np.zeros((4, 4), np.uint8)), "image_too_small", 422),
        (_png(np.zeros((32, 32), np.float32), "TIFF"), "unsupported_mode", 422),
    ],
)
def test_decode_errors(data, code, status):
    """The decoder names the problem; the service maps the code to the HTTP status (app/state.py)."""
    from app.state import image_error

    with pytest.raises(ImageError) as exc:
        decode_image(data)
    assert exc.value.code == code and image_error(exc.value).status == status


def test_pixel_limit_checked_before_decoding():
    with pytest.raises(ImageError) as exc:
        decode_image(_png(np.zeros((100, 100), np.uint8)), max_pixels=5000)
    assert exc.value.code == "image_too_large" and "5000" in exc.value.detail


def test_ycbcr_matches_jpeg_convention_and_round_trips():
    rgb = np.random.default_rng(2).random((10, 10, 3)).astype(np.float32)
    np.testing.assert_allclose(ycbcr_to_rgb(rgb_to_ycbcr(rgb)), rgb, atol=1e-5)
    # Pillow's own JPEG-convention conversion (BT.601 full range) agrees within 8-bit rounding
    u8 = (rgb * 255).round().astype(np.uint8)
    pil = np.asarray(Image.fromarray(u8).convert("YCbCr"), np.float32) / 255
    np.testing.assert_allclose(rgb_to_ycbcr(u8 / 255.0), pil, atol=1.5 / 255)


def test_split_merge_keeps_gray_gray_and_colour_colour():
    gray = decoded(np.random.default_rng(3).random((8, 8)))
    y, c = split_luma(gray)
    assert c is None and merge_luma(y, c).ndim == 2
    rgb = decoded(np.random.default_rng(4).random((8, 8, 3)))
    y, c = split_luma(rgb)
    np.testing.assert_allclose(merge_luma(y, c), rgb.pixels, atol=1e-5)


def test_encode_png_8_16_and_text():
    img = np.random.default_rng(5).random((12, 12))
    for bits in (8, 16):
        d = decode_image(encode_png(img, bits, {"Comment": "DERIVED"}))
        assert d.bit_depth == bits
        np.testing.assert_allclose(d.pixels, img, atol=0.5 / (2**bits - 1) + 1e-6)
    assert Image.open(io.BytesIO(encode_png(img, 8, {"Comment": "DERIVED"}))).text["Comment"] == "DERIVED"
    with pytest.raises(ImageError, match="gray"):
        encode_png(np.zeros((4, 4, 3)), 16)


def test_exif_orientation_is_applied():
    """A JPEG stored sideways with Orientation 6 (rotate 90 degrees clockwise to view) decodes upright."""
    stored = np.zeros((16, 32), np.uint8)
    stored[0, :4] = 255  # a mark at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", exif=exif.tobytes(), quality=100)
    img = decode_image(buf.getvalue())
    assert img.size == (32, 16)  # height x width swapped
    assert np.unravel_index(img.pixels.argmax(), img.size) == (0, 15)  # the mark is now top-right


def test_many_metadata_segments_are_refused_quickly():
    """Pillow joins APP segments by repeated concatenation (quadratic); bounded before Pillow sees the file."""
    import time

    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buf, "JPEG")
    plain = buf.getvalue()
    segment = b"\xff\xe1" + (65535).to_bytes(2, "big") + b"Exif\x00\x00" + bytes(65533 - 6)
    bomb = plain[:2] + segment * 900 + plain[2:]  # ~58 MB of Exif, as in the probe
    t0 = time.perf_counter()
    with pytest.raises(ImageError) as err:
        decode_image(bomb)
    assert err.value.code == "metadata_too_large" and time.perf_counter() - t0 < 1
    few = plain[:2] + segment * 3 + plain[2:]
    assert decode_image(few).size == (64, 64)  # ordinary metadata still decodes


def _with_chunk(png: bytes, kind: bytes, data: bytes) -> bytes:
    """``png`` with one more chunk right after IHDR (CRC computed)."""
    return png[:33] + _chunk(kind, data) + png[33:]


def _split_idat(png: bytes, parts: int, between: bytes = b"") -> bytes:
    """``png`` (one IDAT) with its image data cut into ``parts`` IDAT chunks, ``between`` put after the first."""
    pos = png.index(b"IDAT") - 4
    length = int.from_bytes(png[pos:pos + 4], "big")
    data = png[pos + 8:pos + 8 + length]
    step = -(-len(data) // parts)
    chunks = [_chunk(b"IDAT", data[i:i + step]) for i in range(0, len(data), step)]
    return png[:pos] + chunks[0] + between + b"".join(chunks[1:]) + png[pos + 12 + length:]


def _with_stream(png: bytes, raw: bytes) -> bytes:
    """``png`` with its image data replaced by ``raw`` deflated (a valid stream of any length)."""
    pos = png.index(b"IDAT") - 4
    length = int.from_bytes(png[pos:pos + 4], "big")
    return png[:pos] + _chunk(b"IDAT", zlib.compress(raw)) + png[pos + 12 + length:]


def test_image_data_inflated_by_isal_gives_libpngs_own_pixels_or_leaves_the_file_to_libpng():
    """8-bit PNGs reach libpng with their image data inflated by ISA-L and stored (twice as fast): the pixels
    are libpng's own from the original file, for one IDAT or many, one stored block or several; anything unusual
    (bad CRC, damaged stream, image data in two places, too many or too few bytes) is left to libpng as it is."""
    import imagecodecs

    from models.images.png import _with_stored_pixels

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (300, 301, 3), dtype=np.uint8)  # 271 kB of rows: five stored blocks
    gray = np.clip(np.add.outer(np.arange(37), np.arange(53)) * 3 + rng.integers(0, 9, (37, 53)), 0, 255)
    gray = gray.astype(np.uint8)
    optimized = io.BytesIO()
    Image.fromarray(rgb).save(optimized, "PNG", optimize=True)
    for arr, data in ((gray, _png(gray)), (rgb, _png(rgb)), (rgb, optimized.getvalue()),
                      (gray, encode_png(gray / 255.0)), (rgb, _split_idat(_png(rgb), 3)),
                      (gray, _with_chunk(_split_idat(_png(gray), 2), b"tEXt", b"note\0before the image data"))):
        size = arr.shape[1::-1]
        stored = _with_stored_pixels(data, size)
        assert stored is not None and len(stored) > arr.size  # uncompressed rows
        assert np.array_equal(imagecodecs.png_decode(stored), imagecodecs.png_decode(data))
        assert np.array_equal(imagecodecs.png_decode(stored), arr)
    good = _png(gray)
    size = gray.shape[::-1]
    length = int.from_bytes(good[33:37], "big")
    bad_crc = bytearray(good)
    bad_crc[41 + length] ^= 1
    damaged = bytearray(good)
    damaged[60] ^= 0x10  # inside the compressed data, the CRC made right again
    damaged[41 + length:45 + length] = zlib.crc32(bytes(damaged[37:41 + length])).to_bytes(4, "big")
    rows = zlib.decompress(good[41:41 + length])
    apart = _split_idat(good, 2, between=_chunk(b"tEXt", b"note\0between image data"))
    for data in (bytes(bad_crc), bytes(damaged), apart, good[:len(good) - 40],
                 _with_stream(good, rows + bytes(54)), _with_stream(good, rows[:-54])):
        assert _with_stored_pixels(data, size) is None
    with pytest.raises(ImageError) as exc:
        decode_image(apart)
    assert exc.value.code == "corrupt_image"  # libpng's own refusal


def test_libpng_decodes_8bit_pngs_exactly_as_pillow_and_refuses_damaged_ones(monkeypatch):
    """Uploads' 8-bit gray/RGB PNGs go to libpng (imagecodecs), faster than Pillow; every such file gives Pillow's
    samples, and files where the two could differ (transparency, EXIF, 16-bit, palette, APNG) stay with Pillow.
    A flipped bit in the compressed pixels is a refusal, not a wrong picture (one PNG decoder checks no Adler-32)."""
    import imagecodecs

    from models.images import png

    calls = []
    real = imagecodecs.png_decode
    monkeypatch.setattr(png.imagecodecs, "png_decode", lambda data: calls.append(1) or real(data))
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    gray = np.clip(np.add.outer(np.arange(37), np.arange(53)) * 3 + rng.integers(0, 9, (37, 53)), 0, 255)
    gray = gray.astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", optimize=True)
    gamma = _with_chunk(_png(rgb), b"gAMA", (100000).to_bytes(4, "big"))
    sbit = _with_chunk(_png(gray), b"sBIT", bytes([5]))
    for data in (_png(gray), _png(rgb), _png(np.stack([gray] * 3, -1)), buf.getvalue(), gamma, sbit,
                 encode_png(rgb / 255.0), encode_png(gray / 255.0)):
        before = len(calls)
        got = decode_image(data)
        assert len(calls) == before + 1  # libpng decoded it
        pil = np.asarray(Image.open(io.BytesIO(data)))
        if pil.ndim == 3 and (pil == pil[..., :1]).all():
            pil = pil[..., 0]
        assert got.bit_depth == 8 and np.array_equal(got.pixels, pil.astype(np.float32) / np.float32(255))
    trns = io.BytesIO()
    Image.fromarray(rgb).save(trns, "PNG", transparency=(1, 2, 3))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = io.BytesIO()
    Image.fromarray(gray).save(rotated, "PNG", exif=exif.tobytes())
    palette = io.BytesIO()
    Image.fromarray(rgb).quantize(16).save(palette, "PNG")
    raw_exif = exif.tobytes()  # ImageMagick's copy of EXIF in a text chunk, which Pillow reads too
    magick = _with_chunk(_png(gray), b"tEXt", b"Raw profile type exif\0" +
                         f"\nexif\n{len(raw_exif):8d}\n{raw_exif.hex()}\n".encode())
    for data in (trns.getvalue(), rotated.getvalue(), magick, palette.getvalue(), _png(gray.astype(np.uint16) * 257)):
        before = len(calls)
        decode_image(data)
        assert len(calls) == before  # Pillow decoded it
    for data in (rotated.getvalue(), magick):
        assert decode_image(data).size == (53, 37)  # the orientation was applied
    good = _png(rgb)
    damaged = bytearray(good)
    damaged[60] ^= 0x10  # inside IDAT's compressed data; then the chunk's CRC made right again
    length = int.from_bytes(good[33:37], "big")
    damaged[41 + length:45 + length] = zlib.crc32(bytes(damaged[37:41 + length])).to_bytes(4, "big")
    for data in (bytes(damaged), good[: len(good) - 40]):
        with pytest.raises(ImageError) as exc:
            decode_image(data)
        assert exc.value.code == "corrupt_image"
