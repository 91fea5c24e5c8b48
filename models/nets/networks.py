"""The networks of a configuration, freshly built (the weights loader and the pipeline both start here)."""

from __future__ import annotations

from models.nets.configs import ModelConfig
from models.nets.fusion_head import FusionHead
from models.nets.unet import UNet


def build_networks(cfg: ModelConfig) -> tuple[UNet, FusionHead]:
    """Fresh UNet and fusion head for a configuration."""
    unet = UNet(cfg.unet)
    return unet, FusionHead(cfg.fusion, unet.feature_channels)
