"""Reading diffusers checkpoint directories: which family, and saved limits."""
from __future__ import annotations

import dataclasses
import json
import os

from genserve.models.base import ModelLimits

# Optional file beside model_index.json: the ModelLimits to serve a checkpoint
# with (written when a tiny preset is saved); absent in upstream checkpoints.
LIMITS_FILE = "genserve_limits.json"


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
    """``_class_name`` of the directory's model_index.json."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{path!r} is not a diffusers checkpoint directory (no model_index.json)")
    with open(index) as f:
        return json.load(f)["_class_name"]


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
