"""ONNX export of both tiers as one graph each, with dynamic batch, height and width.

- ``dmfnet-fast``: inputs ``mri`` and ``other`` (N, 1, H, W) luminance in [0, 1] -> ``fused`` (N, 1, H, W).
- DM-FNet: the same, plus ``noise`` (T, 2, H, W): the fixed per-size noise of each UNet timestep for the MRI
  (channel 0) and the other image (channel 1). It is an input, not a constant, because it depends on the
  padded size; ``pipeline.graph_feeds`` builds it from the pipeline's seeded noise, so an ONNX runtime gives the
  same output as the torch pipeline. UNet features of every timestep and scale and the fusion head are one
  graph.

H and W must be multiples of the model's size multiple (the pipeline pads before calling a runtime).
The export needs the ``onnx`` and ``onnxscript`` packages (``pip install .[export]``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from models.inference.fast_pipeline import FastPipeline
from models.inference.pipeline import Fuser, FusionPipeline, noisy_inputs, per_image_features, per_step_noise

OPSET = 18


class DMFNetGraph(nn.Module):
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
        return ((self.head(fa, fb) + 1) / 2).clamp(0, 1)


class FastGraph(nn.Module):
    """The fast network with the pipeline's final clamp."""

    def __init__(self, pipe: FastPipeline) -> None:
        super().__init__()
        self.net = pipe.net

    def forward(self, mri: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) x 2 in [0, 1] -> fused (N, 1, H, W) in [0, 1]."""
        return self.net(mri, other).clamp(0, 1)


def graph_of(pipe: Fuser) -> nn.Module:
    """The exportable module of a pipeline (fp32, CPU)."""
    graph = DMFNetGraph(pipe) if isinstance(pipe, FusionPipeline) else FastGraph(pipe)  # type: ignore[arg-type]
    return graph.eval().float().cpu()


def export_onnx(pipe: Fuser, path: str | Path, size: int = 64) -> Path:
    """Write the pipeline's model as ONNX (dynamic N, H, W) with its provenance in the metadata."""
    import onnx

    path = Path(path)
    graph = graph_of(pipe)
    m = pipe.size_multiple
    size = max(size, 2 * m) // m * m
    x = torch.rand(3, 1, size, size)  # batch > 2: torch.export specialises example sizes 0, 1 (and here 2)
    feeds = pipe.graph_feeds(x, x.clone())
    n, h, w = torch.export.Dim("n", max=256), torch.export.Dim("h", max=8192), torch.export.Dim("w", max=8192)
    dims = {"mri": {0: n, 2: h, 3: w}, "other": {0: n, 2: h, 3: w}}
    if "noise" in feeds:
        dims["noise"] = {2: h, 3: w}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on axis renaming and absent torchvision ops
        program = torch.onnx.export(graph, tuple(feeds.values()), input_names=list(feeds), output_names=["fused"],
                                    dynamic_shapes=tuple(dims.values()), opset_version=OPSET, dynamo=True,
                                    verbose=False)
    program.save(str(path))
    model = onnx.load(str(path))
    meta = {"model": pipe.model_name, "weights_sha256": str(pipe.weights_sha256 or pipe.weights_path),
            "size_multiple": str(m), "inputs": json.dumps(list(feeds))}
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


def triton_repository(pipe: Fuser, onnx_path: str | Path, folder: str | Path) -> Path:
    """An NVIDIA Triton model repository: ``folder/<model>/config.pbtxt`` + ``folder/<model>/1/model.onnx``.

    ``max_batch_size: 0`` because the graph's batch axis is its own (and DM-FNet's ``noise`` has none); the
    client pads H and W to the size multiple recorded in the ONNX metadata, as the pipeline does.
    """
    import shutil

    name = pipe.model_name.replace("-", "_")
    model_dir = Path(folder) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, model_dir / "1" / "model.onnx")
    inputs = [("mri", "[ -1, 1, -1, -1 ]"), ("other", "[ -1, 1, -1, -1 ]")]
    if isinstance(pipe, FusionPipeline):
        inputs.append(("noise", f"[ {len(pipe.cfg.fusion.unet_timesteps)}, 2, -1, -1 ]"))
    blocks = ",\n".join(f'  {{ name: "{n}" data_type: TYPE_FP32 dims: {d} }}' for n, d in inputs)
    (model_dir / "config.pbtxt").write_text(
        f'# {pipe.model_name}, weights sha256 {pipe.weights_sha256}; generated by `dmfnet export --triton`\n'
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
        f"input [\n{blocks}\n]\n"
        'output [\n  { name: "fused" data_type: TYPE_FP32 dims: [ -1, 1, -1, -1 ] }\n]\n'
        "instance_group [ { kind: KIND_GPU count: 1 } ]\n")
    return model_dir
