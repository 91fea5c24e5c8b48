"""FusionPipeline: the one inference path used by the CLI, the service, evaluation and training.

A batch of N pairs is fused with all N x 2 modalities x T timesteps going through the UNet in chunks
(``chunk_size`` images per forward call), then one fusion-head call per chunk of pairs. Noise for each
(modality, timestep, padded size) comes from a fixed seed, so a pair's output does not depend on the
batch it was fused in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import torch

from models.inference.fuser import Fuser, FusionCancelled
from models.inference.hardware import autocast
from models.inference.state import load_state
from models.nets.configs import ModelConfig, get_config
from models.nets.diffusion import Diffusion
from models.nets.fusion_head import FusionHead
from models.nets.networks import build_networks
from models.nets.unet import UNet


def _noise_seed(base: int, modality_index: int, t: int, h: int, w: int) -> int:
    digest = hashlib.sha256(f"{base}/{modality_index}/{t}/{h}x{w}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

class FusionPipeline(Fuser):
    """DM-FNet: frozen UNet + fusion head on one device; ``fuse`` maps pairs to fused images deterministically."""

    def __init__(self, cfg: ModelConfig, unet: UNet, head: FusionHead, device: str | torch.device = "cpu",
                 **kw) -> None:
        super().__init__(cfg.unet.size_multiple, device, **kw)
        self.cfg = cfg
        self.unet = self._frozen(unet)
        self.head = self._frozen(head)
        self.diffusion = Diffusion(cfg.diffusion)
        self._noise: dict[tuple[int, int, int, int], torch.Tensor] = {}

    # ------------------------------------------------------------------ construction
    @staticmethod
    def networks_from(obj: dict) -> tuple[ModelConfig, UNet, FusionHead, dict]:
        """(config, UNet, fusion head, metadata) of a ``dmfnet-weights/1`` file's object."""
        cfg = ModelConfig.model_validate(obj["config"])
        unet, head = build_networks(cfg)
        load_state(unet, obj["unet"], "UNet")
        load_state(head, obj["head"], "fusion head")
        return cfg, unet, head, json.loads(obj.get("meta") or "{}")

    @classmethod
    def from_weights(cls, obj: dict, **kw) -> FusionPipeline:
        """The pipeline of a read weights file (models/inference/weights.py checked its checksum and format)."""
        cfg, unet, head, _ = cls.networks_from(obj)
        return cls(cfg, unet, head, **kw)

    def export_graph(self) -> torch.nn.Module:
        """UNet features of both images at every fusion timestep + fusion head, as one module (ONNX export)."""
        return DMFNetGraph(self)

    def graph_input_dims(self) -> list[tuple[str, str]]:
        """The exported graph's inputs and their dims (Triton's notation): the two images and the noise."""
        return [*super().graph_input_dims(), ("noise", f"[ {len(self.cfg.fusion.unet_timesteps)}, 2, -1, -1 ]")]

    @classmethod
    def random_init(cls, config: str | ModelConfig = "small", seed: int = 0, **kw) -> FusionPipeline:
        """An untrained, seeded model: for tests and for benchmarks of speed, never for images."""
        cfg = get_config(config) if isinstance(config, str) else config
        torch.manual_seed(seed)
        unet, head = build_networks(cfg)
        return cls(cfg, unet, head, weights_path=f"random:{cfg.name} (seed {seed})", random_init=True, **kw)

    def use_head(self, head: torch.nn.Module) -> None:
        """Swap the fusion head (Stage II trains one, possibly wrapped in DistributedDataParallel)."""
        self.head = head

    @property
    def model_name(self) -> str:
        """``dmfnet-<config>`` (``dmfnet-small`` for the shipped weights)."""
        return f"dmfnet-{self.cfg.name}"

    def describe(self) -> dict:
        """Device, dtype, config and weights (for ``dmfnet info`` and ``/version``)."""
        return {
            **super().describe(),
            "config": self.cfg.name,
            "timesteps": list(self.cfg.fusion.timesteps),
            "unet_timesteps": list(self.cfg.fusion.unet_timesteps),
            "scales": list(self.cfg.fusion.scales),
            "unet_params": sum(p.numel() for p in self.unet.parameters()),
            "head_params": sum(p.numel() for p in self.head.parameters()),
        }

    def graph_feeds(self, mri_y: torch.Tensor, func_y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Graph inputs plus ``noise`` (T, 2, H, W): this pipeline's fixed noise per timestep and modality."""
        return {**super().graph_feeds(mri_y, func_y), "noise": self.fixed_noise(*mri_y.shape[-2:])}

    def fixed_noise(self, h: int, w: int) -> torch.Tensor:
        """(T, 2, H, W): the noise of every UNet timestep for the MRI (channel 0) and the other image (1)."""
        return torch.stack([torch.cat([self.noise_for(0, t, h, w)[0], self.noise_for(1, t, h, w)[0]])
                            for t in self.cfg.fusion.unet_timesteps])

    # ------------------------------------------------------------------ inference
    def noise_for(self, modality_index: int, t: int, h: int, w: int) -> torch.Tensor:
        """Fixed noise per (modality, timestep, padded size); fresh noise if the config asks for it."""
        if self.cfg.fusion.fresh_noise:
            return torch.randn(1, 1, h, w)
        key = (modality_index, t, h, w)
        if key not in self._noise:
            if len(self._noise) > 64:  # bound the cache: many distinct sizes in a long-running service
                self._noise.clear()
            g = torch.Generator().manual_seed(_noise_seed(self.cfg.fusion.noise_seed, modality_index, t, h, w))
            self._noise[key] = torch.randn(1, 1, h, w, generator=g)
        return self._noise[key]

    @torch.no_grad()
    def features(
        self,
        mri_y: torch.Tensor,
        func_y: torch.Tensor,
        generator: torch.Generator | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Frozen-UNet decoder features of both modalities, timesteps concatenated on channels.

        Inputs (N, 1, H, W) in [0, 1], H and W multiples of the UNet's size multiple. With a ``generator``
        the noise is drawn from it (training); otherwise it is the fixed per-size noise (inference).
        ``stop`` is asked before every UNet chunk; when it says True, :class:`FusionCancelled` is raised.
        """
        n, _, h, w = mri_y.shape
        m = self.cfg.unet.size_multiple
        if h % m or w % m:
            raise ValueError(f"inputs must be padded to a multiple of {m}, got {h}x{w}")
        steps, scales = self.cfg.fusion.unet_timesteps, self.cfg.fusion.scales
        x = self._to_device(torch.cat([mri_y, func_y])) * 2 - 1  # (2N, 1, H, W) in [-1, 1]
        if generator is not None:
            noises = [torch.randn(x.shape, generator=generator) for _ in steps]
        else:
            noises = per_step_noise(self.fixed_noise(h, w), n)
        noises = [self._to_device(z) for z in noises]
        batch, gamma = noisy_inputs(self.diffusion, [self.diffusion.level(t) for t in steps], x, noises)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        collected: dict[int, list[torch.Tensor]] = {s: [] for s in scales}
        with autocast(self.device, self.precision):
            for i in range(0, len(batch), self.chunk_size):
                if stop is not None and stop():
                    raise FusionCancelled
                chunk = batch[i : i + self.chunk_size].contiguous(memory_format=fmt)
                _, f = self.unet(chunk, gamma[i : i + self.chunk_size], feature_scales=scales, return_output=False)
                for s in scales:
                    collected[s].append(f[s])
        feats_a, feats_b = per_image_features({s: torch.cat(v) for s, v in collected.items()}, len(steps), n,
                                              len(self.cfg.fusion.timesteps), self.channels_last)
        return ({s: f.contiguous(memory_format=fmt) for s, f in feats_a.items()},
                {s: f.contiguous(memory_format=fmt) for s, f in feats_b.items()})

    def head_forward(self, feats_a: dict[int, torch.Tensor], feats_b: dict[int, torch.Tensor],
                     mri_y: torch.Tensor, func_y: torch.Tensor) -> torch.Tensor:
        """Fusion head under the pipeline's precision -> fused luminance (N, 1, H, W), float32; [0, 1] after
        clamping. ``mri_y``, ``func_y``: the sources (N, 1, H, W) in [0, 1] (a "mix" head mixes them)."""
        a, b = (self._to_device(y) * 2 - 1 for y in (mri_y, func_y))
        with autocast(self.device, self.precision):
            out = self.head(feats_a, feats_b, a, b)
        return (out.float() + 1) / 2

    @torch.inference_mode()
    def fuse_luma(
        self, mri_y: torch.Tensor, func_y: torch.Tensor, stop: Callable[[], bool] | None = None
    ) -> torch.Tensor:
        """Fuse (N, 1, H, W) luminances in [0, 1] of one padded size -> fused (N, 1, H, W) in [0, 1]."""
        n = mri_y.shape[0]
        outs = []
        for i in range(0, n, self.pairs_per_call):
            a, b = mri_y[i : i + self.pairs_per_call], func_y[i : i + self.pairs_per_call]
            fa, fb = self.features(a, b, stop=stop)
            outs.append(self.head_forward(fa, fb, a, b))
        return torch.cat(outs).clamp(0, 1).cpu()

def per_step_noise(noise: torch.Tensor, n: int) -> list[torch.Tensor]:
    """(T, 2, H, W) noise -> one (2N, 1, H, W) tensor per timestep: N x the MRI's, then N x the other's
    (the order of the UNet batch; shared by the pipeline and the ONNX graph)."""
    return [torch.cat([noise[k : k + 1, :1].expand(n, -1, -1, -1), noise[k : k + 1, 1:].expand(n, -1, -1, -1)])
            for k in range(noise.shape[0])]


def noisy_inputs(diffusion: Diffusion, levels: list[float], x: torch.Tensor,
                 noises: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """All UNet inputs of a call: ``x`` (2N, 1, H, W) in [-1, 1] noised to each timestep's level with its
    noise, stacked t-major, and the matching noise levels (shared by the pipeline and the ONNX graph)."""
    batch = torch.cat([diffusion.q_sample(x, g, nz) for g, nz in zip(levels, noises, strict=True)])
    gamma = torch.cat([torch.full((x.shape[0],), g) for g in levels]).to(x.device)
    return batch, gamma


def per_image_features(feats: dict[int, torch.Tensor], n_steps: int, n: int, head_steps: int,
                       channels_last: bool = False) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """UNet features of the t-major batch (T*2N, C, h, w) per scale -> per image, timesteps on channels:
    ({scale: (N, T*C, h, w)} of the MRI, the same of the other modality). With one UNet timestep and a head
    that takes ``head_steps`` (``reuse_timestep``), the features are repeated into every slot.

    ``channels_last``: the result in that memory format, made in one copy (channel k*T*C + t*C + c of image i at
    (y, x) is [i][y][x][k][t][c] in memory): the default path's reshape, repeat and format change were three
    copies of every feature map, ~1.7 s of a 35-slice DM-FNet study on a 2-core Xeon (AMX, bf16)."""
    feats_a, feats_b = {}, {}
    for s, fs in feats.items():
        c, hs, ws = fs.shape[1:]
        if channels_last:
            nhwc = fs.permute(0, 2, 3, 1).reshape(n_steps, 2 * n, hs, ws, c).permute(1, 2, 3, 0, 4)
            if head_steps != n_steps:
                nhwc = nhwc.unsqueeze(3).expand(2 * n, hs, ws, head_steps, n_steps, c)
            per_image = nhwc.reshape(2 * n, hs, ws, -1).permute(0, 3, 1, 2)
        else:
            per_image = fs.reshape(n_steps, 2 * n, c, hs, ws).transpose(0, 1).reshape(2 * n, -1, hs, ws)
            if head_steps != n_steps:
                per_image = per_image.repeat(1, head_steps, 1, 1)
        feats_a[s], feats_b[s] = per_image[:n], per_image[n:]
    return feats_a, feats_b


class DMFNetGraph(torch.nn.Module):
    """UNet features of both images at every fusion timestep + fusion head, as one module."""

    def __init__(self, pipe: FusionPipeline) -> None:
        super().__init__()
        self.unet, self.head, self.diffusion = pipe.unet, pipe.head, pipe.diffusion
        self.steps, self.scales = tuple(pipe.cfg.fusion.unet_timesteps), tuple(pipe.cfg.fusion.scales)
        self.head_steps = len(pipe.cfg.fusion.timesteps)
        self.levels = [pipe.diffusion.level(t) for t in self.steps]  # Python floats: constants in the graph

    def forward(self, mri: torch.Tensor, other: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) x 2 in [0, 1] and noise (T, 2, H, W) -> fused (N, 1, H, W) in [0, 1]."""
        n = mri.shape[0]
        x = torch.cat([mri, other]) * 2 - 1
        batch, gamma = noisy_inputs(self.diffusion, self.levels, x, per_step_noise(noise, n))
        _, f = self.unet(batch, gamma, feature_scales=self.scales, return_output=False)
        fa, fb = per_image_features(f, len(self.steps), n, self.head_steps)
        return ((self.head(fa, fb, x[:n], x[n:]) + 1) / 2).clamp(0, 1)
