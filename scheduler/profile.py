"""Latency profiles: the measured (or published, or estimated) points a
``LatencyModel`` interpolates between, and their JSON form.

A profile is plain data: per model, its task, its text-encode time, a list of
step-time points keyed by (shape, SP degree, batch size) and a list of decode
points keyed by (shape, SP degree). Every point says where its number comes
from (``kind``: measured, published, derived, estimate, model) and may carry a
``note`` with the derivation. The JSON layout is documented in
docs/scheduler.md ("Profile JSON"); ``Profile.to_dict``/``Profile.from_dict``
are its only reader and writer, and loading from a file is a separate step
(``load_profile``).
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from .types import IMAGE, TASKS, VIDEO

SCHEMA_VERSION = 1
POINT_KINDS = ("measured", "published", "derived", "estimate", "model")
BUILTIN_PROFILES = ("reference-h100",)


class ProfileError(ValueError):
    """A profile that is malformed or lacks what a caller asked for."""


@dataclass(frozen=True, slots=True)
class StepPoint:
    """Time of one denoising step of a batch of ``batch_size`` requests."""

    width: int
    height: int
    num_frames: int
    sp_degree: int
    batch_size: int
    step_ms: float
    kind: str = "measured"
    note: str = ""


@dataclass(frozen=True, slots=True)
class DecodePoint:
    """Time of the VAE decode (and media encode) of one request."""

    width: int
    height: int
    num_frames: int
    sp_degree: int
    decode_ms: float
    kind: str = "measured"
    note: str = ""


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """Everything the latency model knows about one model."""

    name: str
    task: str  # IMAGE or VIDEO
    default_steps: int
    encode_ms: float
    steps: tuple[StepPoint, ...]
    decodes: tuple[DecodePoint, ...]
    move_ms: float = 2.0  # moving one request's state to other devices
    note: str = ""


@dataclass(frozen=True, slots=True)
class StepSample:
    """One measured step, as ``genserve profile`` records it."""

    model: str
    task: str
    width: int
    height: int
    num_frames: int
    sp_degree: int
    batch_size: int
    step_ms: float


@dataclass(frozen=True, slots=True)
class DecodeSample:
    """One measured decode."""

    model: str
    width: int
    height: int
    num_frames: int
    sp_degree: int
    decode_ms: float


@dataclass(frozen=True, slots=True)
class Profile:
    """A named set of model profiles and the default model of each task."""

    name: str
    models: tuple[ModelProfile, ...]
    default_models: tuple[tuple[str, str], ...] = ()  # (task, model) pairs
    hardware: str = ""
    description: str = ""
    notes: tuple[str, ...] = ()
    # (model, kind, w, h, frames, sp, batch, ratio): saved calibration
    calibration: tuple[tuple[Any, ...], ...] = field(default=())
    # one dispatch's cost beyond the workers' compute: engine to worker and
    # back, and the engine's turnaround to the next dispatch (a step-level
    # policy pays it every step)
    dispatch_ms: float = 0.0
    dispatch_note: str = ""

    def model(self, name: str) -> ModelProfile:
        for m in self.models:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.models)
        raise ProfileError(f"profile {self.name!r} has no model {name!r} (known: {known})")

    def default_model(self, task: str) -> str:
        for t, m in self.default_models:
            if t == task:
                return m
        for m in self.models:
            if m.task == task:
                return m.name
        raise ProfileError(f"profile {self.name!r} has no model for task {task!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "hardware": self.hardware,
            "description": self.description,
            "notes": list(self.notes),
            "default_models": dict(self.default_models),
            "models": {m.name: _model_to_dict(m) for m in self.models},
            "calibration": [list(c) for c in self.calibration],
            "dispatch_ms": self.dispatch_ms,
            "dispatch_note": self.dispatch_note,
        }

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "Profile":
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ProfileError(f"unsupported profile schema_version {version}")
        models = tuple(_model_from_dict(name, m) for name, m in data["models"].items())
        if not models:
            raise ProfileError("a profile needs at least one model")
        defaults = tuple(sorted(dict(data.get("default_models", {})).items()))
        profile = Profile(
            name=str(data.get("name", "unnamed")), models=models,
            default_models=defaults, hardware=str(data.get("hardware", "")),
            description=str(data.get("description", "")),
            notes=tuple(data.get("notes", ())),
            calibration=tuple(tuple(c) for c in data.get("calibration", ())),
            dispatch_ms=float(data.get("dispatch_ms", 0.0)),
            dispatch_note=str(data.get("dispatch_note", "")))
        if not (profile.dispatch_ms >= 0 and math.isfinite(profile.dispatch_ms)):
            raise ProfileError(f"dispatch_ms must be a finite number >= 0, got {profile.dispatch_ms}")
        for task, model in defaults:
            if task not in TASKS or profile.model(model).task != task:
                raise ProfileError(f"default model {model!r} does not serve {task!r}")
        return profile

    @staticmethod
    def from_measurements(name: str, steps: Iterable[StepSample],
                          decodes: Iterable[DecodeSample] = (),
                          encode_ms: Mapping[str, float] | None = None,
                          default_steps: Mapping[str, int] | None = None,
                          default_models: Mapping[str, str] | None = None,
                          hardware: str = "", dispatch_ms: float = 0.0,
                          dispatch_note: str = "") -> "Profile":
        """Build a profile from raw samples (median per key, kind "measured").

        Models are named by the samples; ``encode_ms`` and ``default_steps``
        map model name to a value (defaults: 0 ms and 28 / 50 steps).
        """
        step_groups: dict[tuple, list[float]] = {}
        tasks: dict[str, str] = {}
        for s in steps:
            tasks[s.model] = s.task
            key = (s.model, s.width, s.height, s.num_frames, s.sp_degree, s.batch_size)
            step_groups.setdefault(key, []).append(s.step_ms)
        decode_groups: dict[tuple, list[float]] = {}
        for d in decodes:
            key = (d.model, d.width, d.height, d.num_frames, d.sp_degree)
            decode_groups.setdefault(key, []).append(d.decode_ms)
        models = []
        for model, task in sorted(tasks.items()):
            pts = tuple(StepPoint(*k[1:], step_ms=statistics.median(v),
                                  note=f"median of {len(v)} samples")
                        for k, v in sorted(step_groups.items()) if k[0] == model)
            dps = tuple(DecodePoint(*k[1:], decode_ms=statistics.median(v),
                                    note=f"median of {len(v)} samples")
                        for k, v in sorted(decode_groups.items()) if k[0] == model)
            steps_default = (default_steps or {}).get(model, 28 if task == IMAGE else 50)
            models.append(ModelProfile(model, task, steps_default,
                                       float((encode_ms or {}).get(model, 0.0)), pts, dps))
        return Profile.from_dict(Profile(
            name, tuple(models), tuple(sorted((default_models or {}).items())),
            hardware=hardware, dispatch_ms=dispatch_ms, dispatch_note=dispatch_note).to_dict())


def _model_to_dict(m: ModelProfile) -> dict[str, Any]:
    return {
        "task": m.task, "default_steps": m.default_steps, "encode_ms": m.encode_ms,
        "move_ms": m.move_ms, "note": m.note,
        "steps": [{"width": p.width, "height": p.height, "num_frames": p.num_frames,
                   "sp_degree": p.sp_degree, "batch_size": p.batch_size,
                   "step_ms": p.step_ms, "kind": p.kind, "note": p.note} for p in m.steps],
        "decode": [{"width": p.width, "height": p.height, "num_frames": p.num_frames,
                    "sp_degree": p.sp_degree, "decode_ms": p.decode_ms, "kind": p.kind,
                    "note": p.note} for p in m.decodes],
    }


def _model_from_dict(name: str, d: Mapping[str, Any]) -> ModelProfile:
    task = d.get("task")
    if task not in (IMAGE, VIDEO):
        raise ProfileError(f"model {name!r}: task must be image or video, got {task!r}")
    steps = tuple(_point(StepPoint, p, "step_ms", name) for p in d.get("steps", ()))
    if not any(p.batch_size == 1 for p in steps):
        raise ProfileError(f"model {name!r} needs at least one step point at batch_size 1")
    decodes = tuple(_point(DecodePoint, p, "decode_ms", name) for p in d.get("decode", ()))
    return ModelProfile(name=name, task=task, default_steps=int(d.get("default_steps", 0)),
                        encode_ms=float(d.get("encode_ms", 0.0)), steps=steps,
                        decodes=decodes, move_ms=float(d.get("move_ms", 2.0)),
                        note=str(d.get("note", "")))


def _point(cls, p: Mapping[str, Any], value_key: str, model: str):
    kind = p.get("kind", "measured")
    if kind not in POINT_KINDS:
        raise ProfileError(f"model {model!r}: unknown point kind {kind!r}")
    args = dict(width=int(p["width"]), height=int(p["height"]),
                num_frames=int(p.get("num_frames", 1)), sp_degree=int(p.get("sp_degree", 1)))
    if cls is StepPoint:
        args["batch_size"] = int(p.get("batch_size", 1))
    value = float(p[value_key])
    if value <= 0 or min(args.values()) < 1:
        raise ProfileError(f"model {model!r}: bad point {dict(p)}")
    args[value_key] = value
    return cls(**args, kind=kind, note=str(p.get("note", "")))


def load_profile(name_or_path: str | Path) -> Profile:
    """A built-in profile by name (``BUILTIN_PROFILES``) or a JSON file."""
    text = None
    if str(name_or_path) in BUILTIN_PROFILES:
        ref = resources.files(__package__).joinpath("profiles", f"{name_or_path}.json")
        text = ref.read_text(encoding="utf-8")
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ProfileError(f"no built-in profile or file named {str(name_or_path)!r} "
                               f"(built-in: {', '.join(BUILTIN_PROFILES)})")
        text = path.read_text(encoding="utf-8")
    try:
        return Profile.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # not JSON, or not a profile
        raise ProfileError(f"profile {str(name_or_path)!r} is not a valid profile: "
                           f"{type(err).__name__}: {err}") from err


def save_profile(profile: Profile, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile.to_dict(), indent=1) + "\n", encoding="utf-8")
