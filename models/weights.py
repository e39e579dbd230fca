"""Placing modules on a device / dtype, and a loader that needs no accelerate."""
from __future__ import annotations

import glob
import os

import torch


def place(module, device, dtype: torch.dtype):
    """Move to ``device``; cast to ``dtype`` except the submodules the class
    keeps in float32 (``_keep_in_fp32_modules``, as ``from_pretrained`` does).
    Returns the module in eval mode."""
    module.to(device)
    if dtype != torch.float32:
        torch.nn.Module.to(module, dtype=dtype)  # nn.Module's: diffusers' own warns
        keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if keep.intersection(name.split(".")) and tensor.is_floating_point():
                tensor.data = tensor.data.float()
    return module.eval()


def load_model_dir(cls, folder: str, device, dtype: torch.dtype):
    """A diffusers model from ``folder`` (config.json + safetensors, one file
    or shards) without ``accelerate``: diffusers' ``from_pretrained`` refuses
    classes with ``_keep_in_fp32_modules`` (Wan's transformer) when accelerate
    is missing."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    model = cls.from_config(cls.load_config(folder, local_files_only=True))
    state: dict = {}
    for file in files:
        state.update(load_file(file))
    model.load_state_dict(state, strict=True)
    return place(model, device, dtype)
