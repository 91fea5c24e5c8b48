import math

import pytest
import torch

from models.inference.state import load_state
from models.inference.weights import WeightsError, load_weights, save_weights
from models.nets.configs import CONFIGS, ModelConfig, UNetConfig, get_config
from models.nets.fusion_head import FusionHead
from models.nets.losses import gaussian_blur
from models.nets.networks import build_networks
from models.nets.unet import UNet


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_config_shapes(name):
    cfg = get_config(name)
    unet, head = build_networks(cfg)
    size = cfg.unet.size_multiple * 2
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        out, feats = unet(x, torch.rand(2), feature_scales=cfg.fusion.scales)
    assert out.shape == x.shape
    for s in cfg.fusion.scales:
        assert feats[s].shape == (2, unet.feature_channels[s], size >> s, size >> s)
    t = len(cfg.fusion.timesteps)
    stacked = {s: torch.cat([v] * t, 1) for s, v in feats.items()}
    with torch.no_grad():
        fused = head(stacked, stacked, x, x)
    assert fused.shape == (2, 1, size, size)
    assert fused.abs().max() <= 1.0


def _tiny_head_and_features(fusion: dict):
    """A new "tiny" head with ``fusion`` settings, the UNet features of two random sources, and the sources."""
    cfg = get_config("tiny")
    cfg = cfg.model_copy(update={"fusion": cfg.fusion.model_copy(update=fusion)})
    unet, head = build_networks(cfg)
    size = cfg.unet.size_multiple * 2
    a, b = torch.rand(2, 1, size, size) * 2 - 1, torch.rand(2, 1, size, size) * 2 - 1
    with torch.no_grad():
        _, feats = unet(a, torch.rand(2), feature_scales=cfg.fusion.scales)
    return head, {s: torch.cat([v] * len(cfg.fusion.timesteps), 1) for s, v in feats.items()}, a, b


def test_mix_head_starts_as_the_average_and_mixes_the_sources():
    """A "mix" head predicts a per-pixel weight and residual over the sources: new, it is their plain average;
    with a residual of zero, every output pixel lies between the two sources'."""
    head, stacked, a, b = _tiny_head_and_features({"output": "mix"})
    with torch.no_grad():
        torch.testing.assert_close(head(stacked, stacked, a, b), (a + b) / 2)
        torch.nn.init.normal_(head.out[2].weight, std=0.5)
        head.out[2].weight[1:].zero_()  # weight channel trained, residual channel zero
        head.out[2].bias.zero_()
        fused = head(stacked, stacked, a, b)
    assert not torch.allclose(fused, (a + b) / 2)
    assert bool(((fused >= torch.minimum(a, b) - 1e-6) & (fused <= torch.maximum(a, b) + 1e-6)).all())


def test_mix_gain_head_scales_the_mixs_own_local_contrast():
    """A "mix_gain" head adds k * (m - G * m) to its mix m: new (k = 0) it is the plain average; with a gain
    it is exactly that unsharp mask (the blur equals the loss's, which is checked against scipy), and the
    gain stays below 2 however large the logit."""
    head, stacked, a, b = _tiny_head_and_features({"output": "mix_gain", "gain_sigma": 1.5})
    assert head.out[2].weight.shape[0] == 2 and head.gain_out.weight.shape[0] == 1
    with torch.no_grad():
        torch.testing.assert_close(head(stacked, stacked, a, b), (a + b) / 2)
        m = (a + b) / 2
        torch.testing.assert_close(head.gain.detail(m), m - gaussian_blur(m, 1.5), atol=1e-6, rtol=0)
        head.gain_out.bias.fill_(0.5)  # k = 2 tanh(0.5) everywhere
        k = 2 * math.tanh(0.5)
        torch.testing.assert_close(head(stacked, stacked, a, b), m + k * (m - gaussian_blur(m, 1.5)), atol=1e-5,
                                   rtol=0)
        head.gain_out.bias.fill_(1e4)
        big = head(stacked, stacked, a, b)
    torch.testing.assert_close(big, m + 2 * (m - gaussian_blur(m, 1.5)), atol=1e-5, rtol=0)


def test_paper_config_matches_reference_size():
    unet, head = build_networks(get_config("paper"))
    assert abs(sum(p.numel() for p in unet.parameters()) / 1e6 - 20.0) < 0.1


def test_features_only_skips_output_and_matches():
    cfg = get_config("tiny")
    unet = UNet(cfg.unet).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        out, f_all = unet(x, feature_scales=(1, 2))
        none, f_only = unet(x, feature_scales=(1, 2), return_output=False)
    assert none is None and out is not None
    for s in (1, 2):
        torch.testing.assert_close(f_all[s], f_only[s])


def test_size_must_be_multiple():
    unet = UNet(get_config("tiny").unet)
    with pytest.raises(ValueError, match="multiple of 4"):
        unet(torch.randn(1, 1, 30, 32))


def test_noise_embedding_switch():
    cfg = UNetConfig(inner_channel=8, channel_multiplier=(1, 2), norm_groups=4, with_noise_level_emb=True, res_blocks=1)
    unet = UNet(cfg).eval()
    x = torch.randn(1, 1, 16, 16)
    with pytest.raises(ValueError, match="noise_level"):
        unet(x)
    with torch.no_grad():
        a, _ = unet(x, torch.tensor([0.9]))
        b, _ = unet(x, torch.tensor([0.1]))
    assert not torch.allclose(a, b)


def test_attention_placement_follows_reference_ladder():
    # image_size 160: the ladder 160, 80, 40, 20, 10 never hits 16 -> attention only in the middle block.
    unet = UNet(get_config("paper").unet)
    attn = [n for n, _ in unet.named_modules() if n.endswith(".attn") and "mid" not in n]
    assert attn == []
    on = UNet(get_config("paper").unet.model_copy(update={"image_size": 256}))
    assert any(n.endswith(".attn") and "mid" not in n for n, _ in on.named_modules())


def test_bad_config_rejected():
    with pytest.raises(ValueError, match="norm_groups"):
        UNetConfig(inner_channel=10, norm_groups=4)
    with pytest.raises(ValueError, match="scales"):
        ModelConfig(unet=UNetConfig(channel_multiplier=(1, 1)), fusion={"scales": (0, 3)})
    with pytest.raises(KeyError, match="known"):
        get_config("huge")


def test_weights_round_trip_and_mismatch(tmp_path):
    cfg = get_config("tiny")
    unet, head = build_networks(cfg)
    path = tmp_path / "w.pt"
    sha = save_weights(path, cfg, unet, head, {"note": "test"})
    cfg2, unet2, head2, meta = load_weights(path, sha)
    assert cfg2 == cfg and meta == {"note": "test"}
    for a, b in zip(unet.state_dict().values(), unet2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(WeightsError, match="sha256"):
        load_weights(path, "0" * 64)
    other = FusionHead(get_config("small").fusion, UNet(get_config("small").unet).feature_channels)
    with pytest.raises(WeightsError, match="do not match"):
        load_state(other, head.state_dict(), "fusion head")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="could not be read"):
        load_weights(tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="not found"):
        load_weights(tmp_path / "missing.pt")
