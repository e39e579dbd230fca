"""Reading diffusers checkpoint directories: which family, and saved limits."""
from __future__ import annotations

import dataclasses
import json
import os

from genserve.models.base import ModelLimits

# Optional file beside model_index.json: the ModelLimits to serve a checkpoint
# with (written when a tiny preset is saved); absent in upstream checkpoints.
LIMITS_FILE = "genserve_limits.json"
# model_index.json ``_class_name`` -> family
FAMILIES = {"StableDiffusion3Pipeline": "sd3", "WanPipeline": "wan"}


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"sd3-tiny"`` -> ("sd3-tiny", None); ``"NAME=PATH"`` -> (NAME, PATH).
    Torch-free: the server configuration checks the names with it."""
    if "=" not in spec:
        return spec, None
    name, path = spec.split("=", 1)
    if not name or not path:
        raise ValueError(f"model spec {spec!r} is not NAME=PATH")
    return name, path


def pipeline_class(path: str) -> str:
    """``_class_name`` of the directory's model_index.json. OSError (the
    path is missing, no folder, or has no model_index.json) or ValueError
    (the file is malformed) naming the path or the file at fault."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is not a folder (give the checkpoint directory, which holds "
                                 "model_index.json)")
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{path!r} is not a diffusers checkpoint directory (no model_index.json)")
    with open(index) as f:
        try:
            content = json.load(f)
        except ValueError as err:  # (JSONDecodeError, UnicodeDecodeError)
            raise ValueError(f"{index} is not valid JSON: {err}") from None
    cls = content.get("_class_name") if isinstance(content, dict) else None
    if not isinstance(cls, str):
        raise ValueError(f"{index} names no pipeline class (no \"_class_name\" string)")
    return cls


def checkpoint_family(path: str) -> str:
    """The model family (``"sd3"``, ``"wan"``) of the checkpoint directory
    ``path``; ValueError for a pipeline class the server does not support."""
    cls = pipeline_class(path)
    if cls not in FAMILIES:
        raise ValueError(f"{path}: pipeline {cls!r} is not supported; known: {sorted(FAMILIES)}")
    return FAMILIES[cls]


def write_limits(path: str, limits: ModelLimits) -> None:
    with open(os.path.join(path, LIMITS_FILE), "w") as f:
        json.dump(dataclasses.asdict(limits), f, indent=1)


def read_limits(path: str) -> ModelLimits | None:
    """The saved limits of a checkpoint directory, or None when it has none."""
    file = os.path.join(path, LIMITS_FILE)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return ModelLimits(**json.load(f))
