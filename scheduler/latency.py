"""``LatencyModel``: the profile-driven cost model, calibrated online.

Prediction = base × calibration ratio.

* base: interpolated from the profile's points. Over shape, on
  tokens = width × height × num_frames, piecewise linear in log-log between
  the points of the same (SP degree, batch size), extrapolated along the end
  segments (slope 1 when there is a single point). Over batch size, linear
  between the known batch sizes at that degree; past the largest, along the
  last segment's per-request slope; with only batch 1 known, ``b × step(1)``
  (no batching gain assumed). Over SP degree: a degree with no point uses the
  largest known degree below it (no speed-up assumed); below the smallest
  known degree, time grows in proportion (``k0 / k``).
* ratio: a bounded EWMA of measured / base per exact key; a key never
  measured uses the EWMA of its model (so a uniformly slower machine is
  corrected after the first few steps of any shape).

The per-dispatch overhead (``dispatch_ms``: engine to worker and back, and
the engine's turnaround) is the profile's figure, then an EWMA of measured
overheads (``observe_dispatch``); it is additive, not a ratio, since a
profile may say 0.

Not thread-safe: one engine loop owns it.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from .profile import Profile, ProfileError, load_profile, save_profile

STEP = "step"
DECODE = "decode"
ENCODE = "encode"
MAX_DISPATCH_MS = 1000.0  # a longer stall (a swap, a pause) is not the usual overhead


@dataclass(frozen=True, slots=True)
class ErrorStats:
    """Prediction error of one key: relative error = (measured - predicted) / predicted,
    with ``predicted`` the calibrated prediction just before the measurement."""

    model: str
    kind: str  # STEP or DECODE
    width: int
    height: int
    num_frames: int
    sp_degree: int
    batch_size: int
    count: int
    mean_abs_rel_error: float
    last_rel_error: float
    calibration_ratio: float


class _Curve:
    """log(ms) piecewise linear in log(tokens)."""

    __slots__ = ("xs", "ys")

    def __init__(self, points: Iterable[tuple[float, float]]):
        merged: dict[float, list[float]] = {}
        for tokens, ms in points:
            merged.setdefault(math.log(tokens), []).append(math.log(ms))
        self.xs = sorted(merged)
        self.ys = [sum(merged[x]) / len(merged[x]) for x in self.xs]

    def at(self, tokens: float) -> float:
        x, xs, ys = math.log(tokens), self.xs, self.ys
        if len(xs) == 1:
            return math.exp(ys[0] + (x - xs[0]))
        i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


class _ModelTable:
    """Base (uncalibrated) predictions of one model."""

    def __init__(self, profile: Profile, name: str):
        self.spec = profile.model(name)
        steps: dict[tuple[int, int], list] = {}
        for p in self.spec.steps:
            steps.setdefault((p.sp_degree, p.batch_size), []).append(
                (p.width * p.height * p.num_frames, p.step_ms))
        self.step_curves = {k: _Curve(v) for k, v in steps.items()}
        self.step_degrees = sorted({k for k, _ in steps})
        decodes: dict[int, list] = {}
        for p in self.spec.decodes:
            decodes.setdefault(p.sp_degree, []).append((p.width * p.height * p.num_frames,
                                                        p.decode_ms))
        self.decode_curves = {k: _Curve(v) for k, v in decodes.items()}
        self.decode_degrees = sorted(decodes)

    def step_ms(self, tokens: int, degree: int, batch: int) -> float:
        known = self.step_degrees
        below = [k for k in known if k <= degree]
        base_degree = below[-1] if below else known[0]
        scale = 1.0 if below else base_degree / degree
        return scale * self._batched(tokens, base_degree, batch)

    def _batched(self, tokens: int, degree: int, batch: int) -> float:
        sizes = sorted(b for d, b in self.step_curves if d == degree)
        if batch in sizes:
            return self.step_curves[(degree, batch)].at(tokens)
        if len(sizes) == 1:
            return batch * self.step_curves[(degree, sizes[0])].at(tokens) / sizes[0]
        i = min(max(bisect.bisect_left(sizes, batch), 1), len(sizes) - 1)
        b0, b1 = sizes[i - 1], sizes[i]
        t0 = self.step_curves[(degree, b0)].at(tokens)
        t1 = self.step_curves[(degree, b1)].at(tokens)
        slope = max((t1 - t0) / (b1 - b0), 0.0)
        return max(t0 + slope * (batch - b0), 1e-3)

    def decode_ms(self, tokens: int, degree: int) -> float:
        if not self.decode_degrees:
            return 0.0
        below = [k for k in self.decode_degrees if k <= degree]
        if below:
            return self.decode_curves[below[-1]].at(tokens)
        k0 = self.decode_degrees[0]
        return self.decode_curves[k0].at(tokens) * k0 / degree


class LatencyModel:
    """A ``CostModel`` over a ``Profile``, calibrated online by ``observe_step``."""

    def __init__(self, profile: Profile, *, ewma_alpha: float = 0.2,
                 ratio_bounds: tuple[float, float] = (0.25, 4.0)):
        if not 0.0 < ewma_alpha <= 1.0:
            raise ValueError("ewma_alpha must be in (0, 1]")
        self.profile = profile
        self.ewma_alpha = ewma_alpha
        self.ratio_bounds = ratio_bounds
        self._tables = {m.name: _ModelTable(profile, m.name) for m in profile.models}
        self._base: dict[tuple, float] = {  # uncalibrated predictions (encode: the profile's)
            _encode_key(name): table.spec.encode_ms for name, table in self._tables.items()}
        self._ratio: dict[tuple, float] = {}  # exact key -> EWMA ratio
        self._model_ratio: dict[tuple[str, str], float] = {}  # (model, kind) -> EWMA
        self._errors: dict[tuple, list[float]] = {}  # key -> [count, sum_abs, last]
        self.last_rel_error: float | None = None
        self._dispatch_ms = profile.dispatch_ms
        # bumped by every calibration that changes a prediction: predictions made
        # at one version hold until it changes (a policy may keep them from one
        # decision to the next)
        self.version = 0
        for c in profile.calibration:
            model, kind, *shape, ratio = c
            key = (model, kind, *map(int, shape))
            self._ratio[key] = self._clamp(float(ratio))

    # -- construction -------------------------------------------------------
    @staticmethod
    def load(name_or_path: str | Path, **options) -> "LatencyModel":
        """A built-in profile name (``reference-h100``) or a profile JSON path."""
        return LatencyModel(load_profile(name_or_path), **options)

    def save(self, path: str | Path) -> None:
        """Write the profile with the current per-key calibration folded in."""
        rows = tuple(sorted((*k, round(r, 6)) for k, r in self._ratio.items()))
        save_profile(replace(self.profile, calibration=rows, dispatch_ms=self._dispatch_ms), path)

    def fresh(self) -> "LatencyModel":
        """A copy with the same profile and options and no calibration state."""
        return LatencyModel(replace(self.profile, calibration=()), ewma_alpha=self.ewma_alpha,
                            ratio_bounds=self.ratio_bounds)

    # -- queries -------------------------------------------------------------
    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self._tables)

    def task_of(self, model: str) -> str:
        return self._table(model).spec.task

    def default_model(self, task: str) -> str:
        return self.profile.default_model(task)

    def default_steps(self, model: str) -> int:
        return self._table(model).spec.default_steps

    def step_ms(self, model: str, width: int, height: int, num_frames: int,
                sp_degree: int, batch_size: int) -> float:
        key = (model, STEP, width, height, num_frames, sp_degree, batch_size)
        base = self._base.get(key)
        if base is None:
            base = self._make_base(key)
        # the key's ratio, else its model's: predictions are the simulator's hottest calls
        ratio = self._ratio.get(key)
        return base * (self._model_ratio.get((model, STEP), 1.0) if ratio is None else ratio)

    def encode_ms(self, model: str) -> float:
        key = _encode_key(model)
        base = self._base.get(key)  # every model's encode is there from the start
        if base is None:
            self._table(model)  # raises: an unknown model
        ratio = self._ratio.get(key)
        return base * (self._model_ratio.get((model, ENCODE), 1.0) if ratio is None else ratio)

    def decode_ms(self, model: str, width: int, height: int, num_frames: int,
                  sp_degree: int) -> float:
        key = (model, DECODE, width, height, num_frames, sp_degree, 1)
        base = self._base.get(key)
        if base is None:
            base = self._make_base(key)
        ratio = self._ratio.get(key)
        return base * (self._model_ratio.get((model, DECODE), 1.0) if ratio is None else ratio)

    def dispatch_ms(self) -> float:
        """What one dispatch costs beyond its compute (see the module docstring)."""
        return self._dispatch_ms

    def move_ms(self, model: str) -> float:
        """Cost of moving one request's state (latents, embeddings) between devices."""
        return self._table(model).spec.move_ms

    def isolated_latency_ms(self, model: str, width: int, height: int, num_frames: int,
                            num_steps: int, task: str | None = None,
                            max_devices: int = 1) -> float:
        """Encode + steps + decode of the request alone, at the best power-of-two
        SP degree not above ``max_devices`` (the basis of slo = scale × isolated).
        ``task`` is checked against the model's task when given."""
        if task is not None and task != self.task_of(model):
            raise ProfileError(f"model {model!r} serves {self.task_of(model)!r}, not {task!r}")
        best = math.inf
        degree = 1
        while degree <= max(max_devices, 1):
            total = (num_steps * self.step_ms(model, width, height, num_frames, degree, 1)
                     + self.decode_ms(model, width, height, num_frames, degree))
            best = min(best, total)
            degree *= 2
        return self.encode_ms(model) + best

    # -- calibration ---------------------------------------------------------
    def observe_step(self, model: str, width: int, height: int, num_frames: int,
                     sp_degree: int, batch_size: int, measured_ms: float,
                     count: int = 1) -> None:
        """Feed a measured step time. ``count`` > 1 applies the same
        measurement that many times in one go (the EWMA in closed form; the
        error statistics count it ``count`` times at the first error)."""
        self._observe((model, STEP, width, height, num_frames, sp_degree, batch_size),
                      measured_ms, count)

    def observe_decode(self, model: str, width: int, height: int, num_frames: int,
                       sp_degree: int, measured_ms: float) -> None:
        self._observe((model, DECODE, width, height, num_frames, sp_degree, 1), measured_ms)

    def observe_encode(self, model: str, measured_ms: float) -> None:
        """Feed a measured prompt encode (and latent set-up) of one request."""
        self._observe(_encode_key(model), measured_ms)

    def observe_dispatch(self, measured_ms: float) -> None:
        """Feed one dispatch's measured overhead (wall time minus the compute
        the workers report); bounded, as the ratios are."""
        if not (measured_ms >= 0 and math.isfinite(measured_ms)):
            return
        self.version += 1
        self._dispatch_ms += self.ewma_alpha * (min(measured_ms, MAX_DISPATCH_MS) - self._dispatch_ms)

    def prediction_error(self) -> tuple[ErrorStats, ...]:
        """Per-key error statistics of every key observed so far."""
        out = []
        for key, (count, sum_abs, last) in sorted(self._errors.items()):
            out.append(ErrorStats(*key, count=int(count), mean_abs_rel_error=sum_abs / count,
                                  last_rel_error=last,
                                  calibration_ratio=self._ratio.get(key, 1.0)))
        return tuple(out)

    def _observe(self, key: tuple, measured_ms: float, count: int = 1) -> None:
        """Feed a measurement of ``key`` (a step, decode or encode key), compared
        with its calibrated prediction just before it: what ``step_ms``,
        ``decode_ms`` or ``encode_ms`` gives, computed here from the same
        lookups the update needs (the simulator calibrates three times a request)."""
        base = self._base.get(key)
        if base is None:
            base = self._make_base(key)
        mkey = key[:2]
        old_model = self._model_ratio.get(mkey, 1.0)
        # first sight of a key: its predictions used its model's level (prior
        # 1.0), and its EWMA starts from there
        old = self._ratio.get(key, old_model)
        predicted = base * old
        if not 0.0 < measured_ms < math.inf or predicted <= 0 or count < 1:  # NaN fails too
            return
        rel = (measured_ms - predicted) / predicted
        self.last_rel_error = rel
        stats = self._errors.get(key)
        if stats is None:
            stats = self._errors[key] = [0, 0.0, 0.0]
        stats[0] += count
        stats[1] += abs(rel) * count
        stats[2] = rel
        lo, hi = self.ratio_bounds  # _clamp twice, inlined: the simulator calibrates a lot
        sample = measured_ms / base
        sample = lo if lo > sample else sample
        sample = hi if hi < sample else sample
        keep = (1 - self.ewma_alpha) ** count  # weight left on the old value
        model = self._model_ratio[mkey] = keep * old_model + (1 - keep) * sample
        ratio = keep * old + (1 - keep) * sample
        ratio = lo if lo > ratio else ratio
        ratio = self._ratio[key] = hi if hi < ratio else ratio
        if ratio != old or model != old_model:  # a measurement equal to its prediction changes none
            self.version += 1

    def _make_base(self, key: tuple) -> float:
        """The uncalibrated prediction of a step or decode key, memoised (an
        encode key's is there from the start: a missing one is an unknown model)."""
        model, kind, width, height, num_frames, sp_degree, batch_size = key
        table = self._table(model)  # raises for an unknown model
        tokens = width * height * num_frames
        if kind == STEP:
            base = table.step_ms(tokens, sp_degree, max(batch_size, 1))
        elif kind == DECODE:
            base = table.decode_ms(tokens, sp_degree)
        else:
            raise KeyError(key)
        self._base[key] = base
        return base

    def _clamp(self, ratio: float) -> float:
        lo, hi = self.ratio_bounds
        return min(max(ratio, lo), hi)

    def _table(self, model: str) -> _ModelTable:
        table = self._tables.get(model)
        if table is None:
            raise ProfileError(f"profile {self.profile.name!r} has no model {model!r} "
                               f"(known: {', '.join(self._tables)})")
        return table


def _encode_key(model: str) -> tuple:
    """Calibration key of a model's prompt encode (the step key's shape)."""
    return (model, ENCODE, 0, 0, 0, 1, 1)
