"""Loading a network's tensors from a weights file, with one error that says what does not match."""

from __future__ import annotations

import torch

from models.inference.errors import WeightsError


def load_state(net: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict with one clear error listing missing/unexpected/mis-shaped tensors."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
            f"shape mismatches: {shapes[:3]}" if shapes else "",
        ]
        raise WeightsError(f"{what} weights do not match the configuration: " + "; ".join(p for p in parts if p))
    net.load_state_dict(state)
