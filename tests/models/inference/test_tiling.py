"""Tiled fusion: exact below one tile, seamless blending, bounded UNet inputs, work dropped when unwanted."""

from __future__ import annotations

import numpy as np
import pytest

from models.images.pair_input import prepare_pair
from models.images.phantoms import phantom_pair
from models.inference.pipeline import FusionPipeline
from models.inference.tiling import TileAccumulator, blend_window, tile_grid, tile_starts
from tests.conftest import decoded


def _tiny(**kw) -> FusionPipeline:
    return FusionPipeline.random_init("tiny", seed=0, **kw)


def _pair(h: int, w: int, modality: str = "pet", seed: int = 1):
    m, f = phantom_pair(modality, h, w, seed=seed)
    return prepare_pair(decoded(m), decoded(f), modality)


def _unet_inputs(pipe: FusionPipeline) -> list[tuple[int, ...]]:
    """Record the shape of every UNet forward call."""
    shapes: list[tuple[int, ...]] = []
    pipe.unet.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
    return shapes


@pytest.mark.parametrize("length,tile,overlap", [(100, 32, 8), (256, 256, 32), (257, 256, 32), (4096, 256, 32),
                                                 (1000, 64, 0), (90, 64, 32)])
def test_tiles_cover_the_axis_with_at_least_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0
    if length <= tile:
        assert starts == [0]
        return
    assert starts[-1] + tile == length
    shared = [a + tile - b for a, b in zip(starts, starts[1:], strict=False)]
    assert min(shared) >= overlap


def test_blending_identical_tiles_reconstructs_the_image_exactly():
    """Every pixel's weights sum to one: tiles that agree blend back into the image with no seam."""
    rng = np.random.default_rng(0)
    img = rng.random((150, 230), dtype=np.float32)
    acc = TileAccumulator(150, 230, overlap=16)
    for t in tile_grid(150, 230, 64, 64, 16):
        acc.add(t, img[t.y:t.y + t.h, t.x:t.x + t.w])
    np.testing.assert_allclose(acc.result(), img, atol=1e-6)
    win = blend_window(64, 64, 16)
    assert win.min() > 0 and win[32, 32] == 1.0


def test_pairs_up_to_one_tile_are_fused_exactly_as_before():
    """The untiled path is unchanged: a tile size larger than the image gives bit-identical output."""
    pair = _pair(64, 48)
    a = _tiny(tile_size=64).fuse([pair])[0].pixels
    b = _tiny(tile_size=512).fuse([pair])[0].pixels
    assert np.array_equal(a, b)


def test_large_pair_is_fused_in_tiles_of_bounded_size():
    pipe = _tiny(tile_size=64, tile_overlap=16)
    shapes = _unet_inputs(pipe)
    pair = _pair(200, 150)
    out = pipe.fuse([pair])[0].pixels
    assert out.shape == (200, 150, 3) and np.isfinite(out).all()
    assert shapes and all(s[-2:] == (64, 64) for s in shapes)  # never the whole image at once
    n_tiles = len(tile_grid(200, 150, 64, 64, 16))
    assert len(shapes) == n_tiles * 2 * len(pipe.cfg.fusion.timesteps) // pipe.chunk_size


def test_tiled_output_is_close_to_untiled_and_deterministic():
    pair = _pair(160, 160, "ct")
    tiled = _tiny(tile_size=64, tile_overlap=16)
    a = tiled.fuse([pair])[0].pixels
    assert np.array_equal(a, tiled.fuse([pair])[0].pixels)
    whole = _tiny(tile_size=256).fuse([pair])[0].pixels
    assert np.abs(a - whole).mean() < 0.05  # same model, a smaller context per tile: close, not equal


def test_thin_strip_is_tiled_along_its_long_side_only():
    pipe = _tiny(tile_size=64, tile_overlap=8)
    shapes = _unet_inputs(pipe)
    out = pipe.fuse([_pair(18, 300, "ct")])[0].pixels
    assert out.shape == (18, 300)
    m = pipe.cfg.unet.size_multiple
    assert {s[-2:] for s in shapes} == {(-(-18 // m) * m, 64)}  # height padded to the UNet multiple, width tiled


def test_unwanted_work_stops_between_chunks():
    pipe = _tiny(tile_size=64, tile_overlap=16)
    shapes = _unet_inputs(pipe)
    calls_before_drop = 5
    results = pipe.fuse([_pair(256, 256)], alive=lambda i: len(shapes) < calls_before_drop)
    assert results == [None]
    assert len(shapes) == calls_before_drop  # stopped at the next check, not after all 36 tiles
    # Small pairs: a dead pair is skipped, the live one in the same call is fused.
    shapes.clear()
    small = [_pair(48, 48, seed=2), _pair(48, 48, seed=3)]
    out = pipe.fuse(small, alive=lambda i: i == 1)
    assert out[0] is None and out[1] is not None


def test_tile_settings_are_validated():
    with pytest.raises(ValueError, match="tile_size"):
        _tiny(tile_size=30)
    with pytest.raises(ValueError, match="tile_overlap"):
        _tiny(tile_size=64, tile_overlap=40)
