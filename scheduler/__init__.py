"""GenServe's scheduler: pure, torch-free policies and the latency model.

The engine calls ``policy.plan(now_s, requests, devices, cost)`` at every
decision point and feeds measured step times to ``cost.observe_step``; the
simulator (``genserve.scheduler.simulator``) drives the same objects on a
simulated clock. See docs/scheduler.md.
"""
from .latency import ErrorStats, LatencyModel
from .policies import ABLATIONS, BASELINES, POLICY_NAMES, make_policy
from .profile import (BUILTIN_PROFILES, DecodePoint, DecodeSample, ModelProfile, Profile,
                      ProfileError, StepPoint, StepSample, load_profile, save_profile)
from .types import (IMAGE, TASKS, VIDEO, ClusterSpec, CostModel, DeviceView, Dispatch, Policy,
                    Rejection, RequestView, StepPlan)

__all__ = [
    "ABLATIONS", "BASELINES", "BUILTIN_PROFILES", "IMAGE", "POLICY_NAMES", "TASKS", "VIDEO",
    "ClusterSpec", "CostModel", "DecodePoint", "DecodeSample", "DeviceView", "Dispatch",
    "ErrorStats", "LatencyModel", "ModelProfile", "Policy", "Profile", "ProfileError",
    "Rejection", "RequestView", "StepPlan", "StepPoint", "StepSample", "load_profile",
    "make_policy", "save_profile",
]
