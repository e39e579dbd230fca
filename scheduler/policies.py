"""``make_policy``: every policy by name, with its options.

Options a policy does not use are ignored (so one set of flags can be passed
to all of them); an option no policy knows is an error.
"""
from __future__ import annotations

from dataclasses import fields

from .baselines import RequestLevelOptions, make_request_level
from .genserve_policy import GenServeOptions, make_genserve
from .step_policies import StepOptions, make_step_policy
from .types import ClusterSpec, Policy

POLICY_NAMES = ("genserve", "fcfs", "sjf", "edf", "static", "fixed-sp", "tetris", "edf-step",
                "genserve:no-preempt", "genserve:no-elastic-sp", "genserve:no-batching")
BASELINES = ("fcfs", "sjf", "edf", "static", "fixed-sp", "tetris")
ABLATIONS = ("edf-step", "genserve:no-preempt", "genserve:no-elastic-sp", "genserve:no-batching")

_GENSERVE = {f.name for f in fields(GenServeOptions)}
_REQUEST = {f.name for f in fields(RequestLevelOptions)} | {"fixed_sp_degree"}
_STEP = {f.name for f in fields(StepOptions)}
KNOWN_OPTIONS = frozenset(_GENSERVE | _REQUEST | _STEP)


def make_policy(name: str, cluster: ClusterSpec, **options) -> Policy:
    """A fresh policy object (policies keep per-engine bookkeeping: one per run).

    Common options: admission_control (bool), fixed_sp_degree (int, default 4:
    video degree of the request-level baselines, fixed-sp and
    genserve:no-elastic-sp), static_image_fraction (float), max_preemptions
    (int), starvation_factor (float), chunk_ms / round_ms (float).
    """
    unknown = set(options) - KNOWN_OPTIONS
    if unknown:
        raise TypeError(f"unknown policy options: {sorted(unknown)}")
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
    _validate(cluster)
    _validate_options(options)
    if name.startswith("genserve"):
        return make_genserve(cluster, name, **_pick(options, _GENSERVE))
    if name in ("tetris", "edf-step"):
        return make_step_policy(cluster, name, **_pick(options, _STEP))
    picked = _pick(options, _REQUEST)
    picked.pop("groups", None)
    if name not in ("static", "fixed-sp"):
        picked.pop("order", None)
    return make_request_level(cluster, name, **picked)


def _pick(options: dict, names: set) -> dict:
    return {k: v for k, v in options.items() if k in names and v is not None}


def _validate(cluster: ClusterSpec) -> None:
    if cluster.num_devices < 1:
        raise ValueError("num_devices must be at least 1")
    if cluster.max_sp_degree < 1 or cluster.max_sp_degree & (cluster.max_sp_degree - 1):
        raise ValueError("max_sp_degree must be a power of two")
    if cluster.max_image_batch < 1:
        raise ValueError("max_image_batch must be at least 1")
    if cluster.max_image_sp_degree < 1:
        raise ValueError("max_image_sp_degree must be at least 1")
    for model, limit in cluster.video_sp_limits:
        if not _is_power_of_two(limit):
            raise ValueError(f"the SP limit of {model!r} must be a power of two, not {limit!r}")


def _is_power_of_two(n) -> bool:
    return isinstance(n, int) and n >= 1 and not n & (n - 1)


def _validate_options(options: dict) -> None:
    """Values no policy could run with: an error, not a silent substitute."""
    get = options.get
    if get("fixed_sp_degree") is not None and not _is_power_of_two(get("fixed_sp_degree")):
        raise ValueError("fixed_sp_degree must be a power of two (1, 2, 4, 8 ...)")
    if get("static_image_fraction") is not None and not 0.0 <= get("static_image_fraction") <= 1.0:
        raise ValueError("static_image_fraction must be in [0, 1]")
    if get("max_preemptions") is not None and get("max_preemptions") < 0:
        raise ValueError("max_preemptions must not be negative")
    if get("starvation_factor") is not None and not get("starvation_factor") > 0:
        raise ValueError("starvation_factor must be positive")
    for key in ("chunk_ms", "round_ms"):
        if get(key) is not None and not get(key) >= 0:
            raise ValueError(f"{key} must not be negative")
