import numpy as np
import pytest
import torch

from models.images.colour import rgb_to_ycbcr, split_luma
from models.images.imaging import ImageError
from models.images.pair_input import prepare_pair
from models.inference.pipeline import FusionPipeline
from models.inference.weights import open_pipeline
from tests.conftest import decoded
from tests.picture_compare import HUE_DEG, picture_differences


def test_odd_sizes_are_padded_and_cropped_back(tiny_pipeline, pet_pair):
    mri, pet = pet_pair
    out = tiny_pipeline.fuse([prepare_pair(decoded(mri), decoded(pet))])[0]
    assert out.pixels.shape == (72, 90, 3) and out.modality == "pet"
    assert out.pixels.min() >= 0 and out.pixels.max() <= 1


def test_colour_preserved(tiny_pipeline, pet_pair):
    mri, pet = pet_pair
    out = tiny_pipeline.fuse([prepare_pair(decoded(mri), decoded(pet), "spect")])[0]
    _, chroma = split_luma(decoded(pet))
    inside = np.all((out.pixels > 0.001) & (out.pixels < 0.999), axis=-1)  # where RGB was not clipped
    assert inside.mean() > 0.3
    got = rgb_to_ycbcr(out.pixels)[..., 1:]
    np.testing.assert_allclose(got[inside], chroma[inside], atol=1e-4)


def test_gray_functional_stays_gray(tiny_pipeline, ct_pair):
    mri, ct = ct_pair
    out = tiny_pipeline.fuse([prepare_pair(decoded(mri), decoded(ct))])[0]
    assert out.pixels.ndim == 2 and out.modality == "ct"


def test_16bit_input(tiny_pipeline, ct_pair):
    mri, ct = ct_pair
    q = lambda a: np.round(a * 65535) / 65535  # noqa: E731
    out16 = tiny_pipeline.fuse([prepare_pair(decoded(q(mri), 16), decoded(q(ct), 16))])[0]
    out8 = tiny_pipeline.fuse([prepare_pair(decoded(mri), decoded(ct))])[0]
    assert np.abs(out16.pixels - out8.pixels).mean() < 2 / 255


def test_deterministic_and_batch_independent(tiny_pipeline, pet_pair, ct_pair):
    a = prepare_pair(decoded(pet_pair[0]), decoded(pet_pair[1]))
    b = prepare_pair(decoded(ct_pair[0]), decoded(ct_pair[1]))
    alone = tiny_pipeline.fuse([a])[0].pixels
    again = tiny_pipeline.fuse([a])[0].pixels
    np.testing.assert_array_equal(alone, again)
    batched = tiny_pipeline.fuse([b, a, a, b])
    # batch-mates move at most a grey level of luminance; colour as luminance and hue (tests/picture_compare.py)
    d = picture_differences(batched[1].pixels, alone)
    assert d["y_max"] < 1.0 and d["hue_max"] <= HUE_DEG, d
    assert np.abs(batched[0].pixels - tiny_pipeline.fuse([b])[0].pixels).max() < 1 / 255  # gray: as is


def test_fresh_noise_switch_changes_outputs(pet_pair):
    from models.nets.configs import get_config

    cfg = get_config("tiny")
    fresh = cfg.model_copy(update={"fusion": cfg.fusion.model_copy(update={"fresh_noise": True, "timesteps": (1500,)})})
    pipe = FusionPipeline.random_init(fresh, precision="fp32")
    p = prepare_pair(decoded(pet_pair[0]), decoded(pet_pair[1]))
    assert not np.array_equal(pipe.fuse([p])[0].pixels, pipe.fuse([p])[0].pixels)


def test_bf16_close_to_fp32(pet_pair):
    p = prepare_pair(decoded(pet_pair[0]), decoded(pet_pair[1]))
    bf = FusionPipeline.random_init("tiny", precision="bf16").fuse([p])[0].pixels
    fp = FusionPipeline.random_init("tiny", precision="fp32").fuse([p])[0].pixels
    assert np.abs(bf - fp).mean() < 1 / 255


def test_mismatched_sizes_error_or_resize(pet_pair, tiny_pipeline):
    mri, pet = pet_pair
    with pytest.raises(ImageError, match="co-register") as exc:
        prepare_pair(decoded(mri), decoded(pet[:-2]))
    assert exc.value.code == "size_mismatch"
    p = prepare_pair(decoded(mri), decoded(pet[:-2]), resize=True)
    assert tiny_pipeline.fuse([p])[0].pixels.shape == (72, 90, 3)


def test_bad_modality(pet_pair):
    with pytest.raises(ImageError) as exc:
        prepare_pair(decoded(pet_pair[0]), decoded(pet_pair[1]), "xray")
    assert exc.value.code == "bad_modality"


def test_open_pipeline_random_and_missing(tmp_path):
    assert open_pipeline("random:tiny").is_random
    with pytest.raises(FileNotFoundError):
        open_pipeline(str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="precision"):
        FusionPipeline.random_init("tiny", precision="fp16")


def test_reuse_timestep_runs_the_unet_once_and_feeds_every_slot():
    import torch

    from models.nets.configs import FusionConfig

    base = FusionPipeline.random_init("tiny", seed=2)
    fusion = base.cfg.fusion.model_copy(update={"reuse_timestep": 20})
    reuse = FusionPipeline(base.cfg.model_copy(update={"fusion": fusion}), base.unet, base.head)
    calls = []
    hook = base.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    a, b = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    full_a, _ = base.features(a, b)
    n_full = sum(calls)
    calls.clear()
    one_a, _ = reuse.features(a, b)
    hook.remove()
    assert n_full == 4 and sum(calls) == 2  # 2 images x 2 timesteps, then 2 images x 1
    for s, f in full_a.items():
        c = f.shape[1] // 2  # tiny: timesteps (5, 20); the second block of channels is t = 20
        assert torch.allclose(one_a[s], f[:, c:].repeat(1, 2, 1, 1), atol=1e-6)
    with pytest.raises(ValueError, match="reuse_timestep 7"):
        FusionConfig(timesteps=(5, 20), reuse_timestep=7)


@pytest.mark.parametrize(("unet_steps", "head_steps"), [(1, 3), (3, 3), (2, 2)])
def test_channels_last_features_are_the_same_values_in_the_heads_layout(unet_steps, head_steps):
    """The bf16 path hands the head channels_last features made in one copy: the same values as the default
    path's reshape and repeat, per scale and image, and already in that memory format."""
    from models.inference.pipeline import per_image_features

    g = torch.Generator().manual_seed(3)
    n = 3
    feats = {s: torch.randn(unet_steps * 2 * n, 8, 32 >> s, 32 >> s, generator=g).to(torch.bfloat16)
             .contiguous(memory_format=torch.channels_last) for s in range(3)}
    plain = per_image_features(feats, unet_steps, n, head_steps)
    fast = per_image_features(feats, unet_steps, n, head_steps, channels_last=True)
    for ours, theirs in zip(fast, plain, strict=True):
        for s in feats:
            assert torch.equal(ours[s], theirs[s]) and ours[s].shape == (n, 8 * head_steps, 32 >> s, 32 >> s)
            assert ours[s].is_contiguous(memory_format=torch.channels_last)
