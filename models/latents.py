"""Latent noise in, uint8 pixels out: helpers shared by the model families."""
from __future__ import annotations

import numpy as np
import torch


def initial_noise(shape: tuple[int, ...], seed: int, device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of ``shape`` from a CPU generator seeded with
    ``seed``, then moved to ``device``: the same seed gives the same noise on
    every device, and equals a diffusers pipeline called with
    ``generator=torch.Generator("cpu").manual_seed(seed)``. That generator
    uses the seed's low 32 bits: seeds 2^32 apart give the same noise."""
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype).to(device)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """VAE output in [-1, 1], shape (frames, 3, H, W) -> uint8 (frames, H, W, 3)."""
    unit = (pixels.float() * 0.5 + 0.5).clamp(0, 1)
    return (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
