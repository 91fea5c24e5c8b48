import io

import numpy as np
import pytest
from PIL import Image

from models.images.colour import merge_luma, rgb_to_ycbcr, split_luma
from models.images.imaging import DecodedImage, ImageError, decode_image, encode_png, open_image, to_uint, to_uint8
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
    for row in (0, 31, 32, 47):  # one coloured pixel in the first, at a band's edge, in the last band of rows
        tinted = np.stack([gray] * 3, -1)
        tinted[row, 63, 2] ^= 1
        assert decode_image(_png(tinted)).is_color


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
    """The decoder names the problem; the service maps the code to the HTTP status (app/http/state.py)."""
    from app.http.state import image_error

    with pytest.raises(ImageError) as exc:
        decode_image(data)
    assert exc.value.code == code and image_error(exc.value).status == status


def test_pixel_limit_checked_before_decoding():
    with pytest.raises(ImageError) as exc:
        decode_image(_png(np.zeros((100, 100), np.uint8)), max_pixels=5000)
    assert exc.value.code == "image_too_large" and "5000" in exc.value.detail


def test_ycbcr_matches_jpeg_convention_and_round_trips():
    rgb = np.random.default_rng(2).random((10, 10, 3)).astype(np.float32)
    y, chroma = split_luma(DecodedImage(rgb, 8))  # what the service keeps of a colour input, and merges back
    np.testing.assert_allclose(merge_luma(y, chroma), rgb, atol=1e-5)
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


def test_samples_of_a_colour_merge_are_c_ordered_and_rounded_as_before():
    """The merge's RGB (a channel-last view of planes) comes out of to_uint / to_uint8 in the C order every writer
    reads, with the values of round(clip(x) * 255)."""
    planes = np.random.default_rng(5).uniform(-0.1, 1.1, (3, 9, 11)).astype(np.float32)
    rgb = np.moveaxis(planes, 0, -1)
    expected = np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)
    for samples in (to_uint(rgb, 8), to_uint8(rgb)):
        assert samples.flags.c_contiguous and samples.dtype == np.uint8
        np.testing.assert_array_equal(samples, expected)
    assert to_uint(planes[0], 16).flags.c_contiguous


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
