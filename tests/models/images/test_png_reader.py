"""The strict PNG front end (models/images/png_reader.py): every accepted file decodes to Pillow's own pixels of the
original, oriented by the one rule; every damaged, inconsistent or hostile file is corrupt_image, quickly."""

from __future__ import annotations

import time
import zlib

import numpy as np
import pytest
from PIL import Image

from models.images.imaging import ImageError, decode_image, encode_png, open_image
from models.images.png import _chunk
from models.images.png_reader import column_sums, inflate_image_data, plain_pixels, read_layout
from tests.png_craft import (
    chunks,
    flip_bit,
    idat_stream,
    incomplete_code_stream,
    pillow_png,
    reference_pixels,
    with_chunk,
    with_stream,
)

RNG = np.random.default_rng(3)
GRAY = np.clip(np.add.outer(np.arange(37), np.arange(53)) * 3 + RNG.integers(0, 9, (37, 53)), 0, 255).astype(np.uint8)
RGB = RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _xmp(orientation: int) -> bytes:
    return (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="%d"/></rdf:RDF>'
            b"</x:xmpmeta>" % orientation)


def accepted_files() -> dict[str, bytes]:
    """Valid PNGs of every kind the service takes: encoders, chunk layouts, modes, orientation carriers."""
    raw = _exif(6)
    magick = b"Raw profile type exif\0" + f"\nexif\n{len(raw):8d}\n{raw.hex()}\n".encode()
    trns = pillow_png(RGB, transparency=(1, 2, 3))
    files = {
        "gray_pillow": pillow_png(GRAY), "rgb_pillow": pillow_png(RGB),
        "rgb_optimized": pillow_png(RGB, optimize=True), "gray_as_rgb": pillow_png(np.stack([GRAY] * 3, -1)),
        "gray_ours": encode_png(GRAY / 255.0), "rgb_ours": encode_png(RGB / 255.0),
        "gray16": pillow_png(GRAY.astype(np.uint16) * 257), "palette": pillow_png(Image.fromarray(RGB).quantize(16)),
        "interlaced": _interlaced(GRAY), "gray_alpha": pillow_png(np.stack([GRAY, GRAY[::-1]], -1)),
        "rgba": pillow_png(np.dstack([RGB, GRAY])), "trns": trns,
        "split_idat": with_stream(pillow_png(RGB), idat_stream(pillow_png(RGB)), parts=3),
        "empty_idat_between": with_stream(pillow_png(GRAY), idat_stream(pillow_png(GRAY)), parts=2,
                                          between=_chunk(b"IDAT", b"")),
        "text_before": with_chunk(pillow_png(GRAY), b"tEXt", b"Comment\0before the image data"),
        "gamma": with_chunk(pillow_png(RGB), b"gAMA", (100000).to_bytes(4, "big")),
        "sbit": with_chunk(pillow_png(GRAY), b"sBIT", bytes([5])),
        "private_chunk": with_chunk(pillow_png(GRAY), b"prVt", b"anything"),
        "exif_chunk": pillow_png(GRAY, exif=raw),
        "magick_exif": with_chunk(encode_png(GRAY / 255.0), b"tEXt", magick),
        "text_exif": with_chunk(encode_png(GRAY / 255.0), b"tEXt", b"exif\0" + b"Exif\0\0" + raw),
        "xmp": with_chunk(encode_png(GRAY / 255.0), b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + _xmp(8)),
        "xmp_trns": with_chunk(with_chunk(encode_png(RGB / 255.0), b"tRNS", bytes(6)), b"iTXt",
                               b"XML:com.adobe.xmp\0\0\0\0\0" + _xmp(8)),
        "none_and_up_rows": _none_and_up(RGB),
    }
    return files


def _interlaced(arr: np.ndarray) -> bytes:
    """Adam7-interlaced PNG, written here (Pillow writes none): every pass's rows, filter None."""
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    rows = b"".join(b"\0" + arr[y, x0::dx].tobytes() for x0, y0, dx, dy in passes
                    for y in range(y0, arr.shape[0], dy) if arr[y, x0::dx].size)
    header = arr.shape[1].to_bytes(4, "big") + arr.shape[0].to_bytes(4, "big") + bytes([8, 0, 0, 0, 1])
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def _none_and_up(arr: np.ndarray) -> bytes:
    """Rows filtered None and Up in turn (the plain path's column sums restart at None rows)."""
    flat = arr.reshape(arr.shape[0], -1)
    rows = []
    for i, row in enumerate(flat):
        up = i % 3 != 0
        rows.append(bytes([2 if up else 0]) + ((row - flat[i - 1]) if up else row).astype(np.uint8).tobytes())
    return with_stream(encode_png(arr / 255.0), zlib.compress(b"".join(rows)))


@pytest.mark.parametrize("name", sorted(accepted_files()))
def test_every_accepted_file_gives_pillows_pixels_of_the_original_after_the_one_orientation_rule(name):
    data = accepted_files()[name]
    got = decode_image(data).pixels
    want = reference_pixels(data)
    assert got.shape == want.shape and np.array_equal(got, want), name


def test_orientation_carried_anywhere_is_applied_the_same_with_or_without_transparency():
    files = accepted_files()
    for name in ("exif_chunk", "magick_exif", "text_exif", "xmp"):
        assert decode_image(files[name]).size == (53, 37), name  # rotated: width and height swapped
    assert decode_image(files["xmp_trns"]).size == (53, 37)


def test_the_plain_path_takes_only_files_pillow_would_not_orient_or_alter():
    files = accepted_files()
    taken = {n for n, d in files.items() if (lay := read_layout(d)).plain and
             plain_pixels(inflate_image_data(d, lay), lay) is not None}
    assert {"gray_ours", "rgb_ours", "none_and_up_rows"} <= taken
    assert not taken & {"magick_exif", "text_exif", "xmp", "xmp_trns", "exif_chunk", "trns", "palette", "gray16",
                        "interlaced", "private_chunk"}


def test_column_sums_are_a_modulo_256_cumulative_sum():
    for height in (1, 2, 3, 7, 64, 257):
        rows = RNG.integers(0, 256, (height, 11), dtype=np.uint8)
        assert np.array_equal(column_sums(rows), np.cumsum(rows, axis=0, dtype=np.uint8))


def _refused(data: bytes, words: str = "") -> str:
    with pytest.raises(ImageError) as err:
        decode_image(open_image(data))
    assert err.value.code == "corrupt_image", err.value.detail
    assert words in err.value.detail, err.value.detail
    return err.value.detail


def test_damaged_or_inconsistent_files_are_refused_with_what_is_wrong():
    good = pillow_png(GRAY)
    rows = zlib.decompress(idat_stream(good))
    idat = next(p for p, k, _ in chunks(good) if k == b"IDAT")
    wrong_adler = idat_stream(good)[:-1] + bytes([idat_stream(good)[-1] ^ 1])
    window_16 = bytes([0x88, 0x1C]) + idat_stream(good)[2:]  # window field 8 (> 32 KiB), check bits right
    assert (0x88 << 8 | 0x1C) % 31 == 0
    bad_filter = bytes([7]) + rows[1:]
    cases = {
        "CRC mismatch": flip_bit(good, idat + 20, 3, fix_crc=False),
        "CRC mismatch in a tEXt": flip_bit(with_chunk(good, b"tEXt", b"Comment\0x"), 37, 0, fix_crc=False),
        "damaged image data": with_stream(good, wrong_adler),
        "image data in two places": with_stream(good, idat_stream(good), 2, between=_chunk(b"tEXt", b"a\0b")),
        "truncated": good[:-30],
        "more image data": with_stream(good, zlib.compress(rows + bytes(54))),
        "truncated image data": with_stream(good, zlib.compress(rows[:-54])),
        "bytes after the end of the image data": with_stream(good, idat_stream(good) + b"\0\0"),
        "bytes after IEND": good + b"\0",
        "invalid zlib header": with_stream(good, window_16),
        "invalid row filter": with_stream(good, zlib.compress(bad_filter)),
        "PLTE after the image data": _palette_after_data(),
        "unknown critical chunk": with_chunk(good, b"CRIT", b""),
        "APNG": with_chunk(good, b"acTL", bytes(8)),
        "IHDR is not the first": good[:8] + _chunk(b"tEXt", b"a\0b") + good[8:],
        "invalid bit depth": good[:24] + bytes([3]) + good[25:],
    }
    for words, data in cases.items():
        _refused(data, words.split(" in a ")[0] if words.startswith("CRC") else "")


def _palette_after_data() -> bytes:
    """A palette PNG with PLTE (and tRNS) after IDAT: Pillow's convert raised AssertionError (a 500) on it."""
    data = pillow_png(Image.fromarray(RGB).quantize(4))
    plte = next((p, n) for p, k, n in chunks(data) if k == b"PLTE")
    chunk = data[plte[0]:plte[0] + 12 + plte[1]]
    without = data[:plte[0]] + data[plte[0] + 12 + plte[1]:]
    return with_chunk(with_chunk(without, b"tRNS", b"\0"), b"PLTE", chunk[8:-4], after=b"IDAT")


def test_streams_zlib_refuses_are_refused_though_a_faster_inflater_takes_them():
    from isal import isal_zlib

    stream = incomplete_code_stream(8 * 9)  # an 8x8 gray image's rows: all zero
    assert isal_zlib.decompress(stream) == bytes(72)
    with pytest.raises(zlib.error):
        zlib.decompress(stream)
    _refused(with_stream(pillow_png(np.zeros((8, 8), np.uint8)), stream), "damaged image data")


def test_every_bit_flipped_in_the_compressed_pixels_is_refused_never_a_different_picture():
    """The probe's 13-15% of flipped bits that decoded into a wrong PET picture: with the CRC made right again,
    each flip must be refused (or, if the stream still inflates to the same bytes, give the same picture)."""
    for data in (encode_png(RGB / 255.0), pillow_png(np.dstack([RGB, GRAY]))):
        original = reference_pixels(data)
        idat = next((p, n) for p, k, n in chunks(data) if k == b"IDAT")
        offsets = np.random.default_rng(1).integers(idat[0] + 8, idat[0] + 8 + idat[1], 300)
        for i, offset in enumerate(offsets):
            try:
                got = decode_image(flip_bit(data, int(offset), i % 8)).pixels
            except ImageError as exc:
                assert exc.code == "corrupt_image"
                continue
            assert np.array_equal(got, original)


def test_a_deflate_bomb_stops_as_soon_as_it_passes_the_image_size():
    """Valid rows followed by 64 MB of compressed zeros in the same stream: refused after inflating one byte more
    than the rows (libpng inflated all of it on the event loop: 48.5 s for a 16 MB upload)."""
    good = pillow_png(GRAY)
    rows = zlib.decompress(idat_stream(good))
    squeeze = zlib.compressobj(9)
    stream = squeeze.compress(rows) + b"".join(squeeze.compress(bytes(2**20)) for _ in range(64)) + squeeze.flush()
    bomb = with_stream(good, stream, parts=max(1, len(stream) // 8192))
    t0 = time.process_time()
    _refused(bomb, "more image data")
    assert time.process_time() - t0 < 0.5  # bounded by the image, not the stream (typically ~1 ms)


def test_chunk_floods_are_refused_before_any_decoder_walks_them():
    """A million empty IDAT chunks (12 MB) cost 5.6 s of event-loop time; a file may hold 64 chunks + 1 per KiB."""
    good = pillow_png(GRAY)
    stream = idat_stream(good)
    flood = with_stream(good, stream, 1, between=_chunk(b"IDAT", b"") * 200_000)
    t0 = time.process_time()
    _refused(flood, "chunks for a file")
    assert time.process_time() - t0 < 0.5


def test_twenty_thousand_refusals_leave_memory_flat():
    """The libpng binding leaked its buffer on every refusal; this front end is Python: 20,000 refused files
    (bad CRC, wrong Adler-32, bomb) leave the heap where it was."""
    import tracemalloc

    good = pillow_png(np.zeros((64, 64, 3), np.uint8))
    bad = [flip_bit(good, next(p for p, k, _ in chunks(good) if k == b"IDAT") + 9, 0, fix_crc=False),
           with_stream(good, idat_stream(good)[:-1] + b"\0"), with_stream(good, zlib.compress(bytes(64 * 193 * 2)))]
    for data in bad:
        _refused(data)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(20_000 // len(bad)):
        for data in bad:
            try:
                decode_image(data)
            except ImageError:
                pass
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 64 * 1024, grown
