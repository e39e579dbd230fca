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
from .workload import MAX_STEPS

SCHEMA_VERSION = 1
POINT_KINDS = ("measured", "published", "derived", "estimate", "model")
# the latency model's calibration keys: (model, kind, w, h, frames, sp, batch)
CALIBRATION_KINDS = ("step", "decode", "encode")
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

    def size_range(self) -> tuple[int, int]:
        """Smallest and largest width × height × frames of its step points:
        the latency model interpolates inside, extrapolates outside."""
        sizes = [p.width * p.height * p.num_frames for p in self.steps]
        return min(sizes), max(sizes)


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
        if "models" not in data:
            raise ProfileError("missing field 'models'")
        models = tuple(_model_from_dict(name, m) for name, m in data["models"].items())
        if not models:
            raise ProfileError("a profile needs at least one model")
        defaults = tuple(sorted(dict(data.get("default_models", {})).items()))
        rows = data.get("calibration", ())
        if not isinstance(rows, (list, tuple)):
            raise ProfileError(f"calibration must be a list of rows, got {rows!r}")
        profile = Profile(
            name=str(data.get("name", "unnamed")), models=models,
            default_models=defaults, hardware=str(data.get("hardware", "")),
            description=str(data.get("description", "")),
            notes=tuple(data.get("notes", ())),
            calibration=tuple(_calibration_row(i, c) for i, c in enumerate(rows)),
            dispatch_ms=_ms("", "dispatch_ms", data.get("dispatch_ms", 0.0), 0.0),
            dispatch_note=str(data.get("dispatch_note", "")))
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
    steps = tuple(_point(StepPoint, p, "step_ms", f"model {name!r}: steps[{i}]")
                  for i, p in enumerate(d.get("steps", ())))
    if not any(p.batch_size == 1 for p in steps):
        raise ProfileError(f"model {name!r} needs at least one step point at batch_size 1")
    decodes = tuple(_point(DecodePoint, p, "decode_ms", f"model {name!r}: decode[{i}]")
                    for i, p in enumerate(d.get("decode", ())))
    where = f"model {name!r}"
    return ModelProfile(name=name, task=task,
                        default_steps=_whole(where, "default_steps", d.get("default_steps"),
                                             1, MAX_STEPS),
                        encode_ms=_ms(where, "encode_ms", d.get("encode_ms", 0.0), 0.0),
                        steps=steps, decodes=decodes,
                        move_ms=_ms(where, "move_ms", d.get("move_ms", 2.0), 0.0),
                        note=str(d.get("note", "")))


def _point(cls, p: Mapping[str, Any], value_key: str, where: str):
    kind = p.get("kind", "measured")
    if kind not in POINT_KINDS:
        raise ProfileError(f"{where}: unknown point kind {kind!r}")
    missing = [key for key in ("width", "height", value_key) if key not in p]
    if missing:
        raise ProfileError(f"{where}: missing field {missing[0]!r}")
    args = {key: _whole(where, key, p[key] if default is None else p.get(key, default),
                        1, 2 ** 32 - 1)
            for key, default in (("width", None), ("height", None), ("num_frames", 1),
                                 ("sp_degree", 1))}
    if cls is StepPoint:
        args["batch_size"] = _whole(where, "batch_size", p.get("batch_size", 1), 1, 2 ** 32 - 1)
    args[value_key] = _ms(where, value_key, p[value_key])
    return cls(**args, kind=kind, note=str(p.get("note", "")))


def _calibration_row(i: int, row: Any) -> tuple[Any, ...]:
    """A saved calibration ratio, checked here: the latency model unpacks
    rows only when it is built (for ``serve``, after the workers load)."""
    where = f"calibration[{i}]"
    if not isinstance(row, (list, tuple)) or len(row) != 8:
        raise ProfileError(f"{where} must be [model, kind, width, height, frames, sp_degree, "
                           f"batch_size, ratio], got {row!r}")
    model, kind, *shape, ratio = row
    if not isinstance(model, str) or kind not in CALIBRATION_KINDS:
        raise ProfileError(f"{where}: needs a model name and a kind in "
                           f"{', '.join(CALIBRATION_KINDS)}, got {model!r}, {kind!r}")
    # an encode's key has zero sizes (see latency._encode_key)
    shape = [_whole(where, key, value, 0, 2 ** 32 - 1) for key, value in zip(
        ("width", "height", "frames", "sp_degree", "batch_size"), shape)]
    return (model, kind, *shape, _ms(where, "ratio", ratio, high=None))  # clamped when used


# No time in a profile is longer than this (a day is 8.64e7 ms): 1e300 ms passed
# as finite and a simulation reported latencies of 10^298 seconds.
MAX_MS = 1e8


def _ms(where: str, key: str, value: Any, low: float | None = None,
        high: float | None = MAX_MS) -> float:
    """``value`` as a finite float above 0 (at least ``low`` when given) and
    at most ``high``: NaN and infinities slip past a plain ``value <= 0`` and
    then hang a simulation or make an infinite SLO."""
    number = float(value) if not isinstance(value, bool) else math.nan
    prefix = f"{where}: " if where else ""
    if not math.isfinite(number) or (number < low if low is not None else number <= 0):
        rule = f">= {low:g}" if low is not None else "> 0"
        raise ProfileError(f"{prefix}{key} must be a finite number {rule}, got {value!r}")
    if high is not None and number > high:
        raise ProfileError(f"{prefix}{key} must be at most {high:g} ms, got {value!r}")
    return number


def _whole(where: str, key: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int in low..high: 512.0 is 512; 64.9, true and
    Infinity are refused (int() truncates them or raises OverflowError)."""
    whole = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer())
    if not (whole and low <= value <= high):
        raise ProfileError(f"{where}: {key} must be a whole number in {low}..{high}, got {value!r}")
    return int(value)


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
    try:
        if text is None:
            text = path.read_text(encoding="utf-8-sig")
        return Profile.from_dict(json.loads(text))
    except ProfileError as err:  # already says what is wrong
        raise ProfileError(f"profile {str(name_or_path)!r} is not a valid profile: {err}") from err
    except (ValueError, KeyError, TypeError, AttributeError,
            OverflowError, RecursionError) as err:  # not JSON (or too deep), or not a profile
        raise ProfileError(f"profile {str(name_or_path)!r} is not a valid profile: "
                           f"{type(err).__name__}: {err}") from err


def save_profile(profile: Profile, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile.to_dict(), indent=1) + "\n", encoding="utf-8")
