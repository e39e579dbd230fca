"""Build a model adapter from a preset name or a ``NAME=PATH`` spec."""
from __future__ import annotations

import threading

import torch

from genserve.models.base import ModelAdapter
from genserve.models.checkpoint import checkpoint_family, parse_spec
from genserve.models.presets import PRESETS

# diffusers' and transformers' lazy module attributes are not thread-safe on
# first import: workers run as threads (tests) must not build concurrently.
_BUILD_LOCK = threading.Lock()


def build_model(name_or_spec: str, device="cpu", dtype=torch.float32) -> ModelAdapter:
    """A preset by name (``sd3-tiny``, ``wan-tiny``; the real-size random
    ``sd3-medium-random``, ``wan-1.3b-random`` for GPUs), or ``NAME=PATH``: the
    diffusers checkpoint directory at PATH served as NAME, family taken from
    its model_index.json. ``dtype`` may be a torch dtype or its name.
    Thread-safe (builds are serialised)."""
    with _BUILD_LOCK:
        return _build(name_or_spec, device, dtype)


def model_family(name_or_spec: str) -> str:
    """What a model spec builds: ``"preset"`` for a built-in preset's name,
    else its checkpoint's family (``"sd3"``, ``"wan"``, from model_index.json).
    ValueError (OSError for a path that is missing or not a folder) naming
    the model and the path or file at fault. Cheap: the server checks every
    ``--model`` with it before any worker starts."""
    name, path = parse_spec(name_or_spec)
    if path is None:
        if name not in PRESETS:
            raise ValueError(f"unknown model {name!r}; presets: {sorted(PRESETS)}, or NAME=PATH")
        return "preset"
    try:
        return checkpoint_family(path)
    except (OSError, ValueError) as err:
        raise type(err)(f"model {name!r}: {err}") from None


def _build(name_or_spec: str, device, dtype) -> ModelAdapter:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    family = model_family(name_or_spec)
    name, path = parse_spec(name_or_spec)
    if family == "preset":
        return PRESETS[name](device=device, dtype=dtype)
    if family == "sd3":
        from genserve.models.sd3 import load_sd3

        return load_sd3(path, name=name, device=device, dtype=dtype)
    from genserve.models.wan import load_wan

    return load_wan(path, name=name, device=device, dtype=dtype)
