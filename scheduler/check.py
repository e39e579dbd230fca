"""Plan invariants, checked by the simulator, the tests and (cheaply) the engine.

``check_plan`` returns every violation it finds as a sentence; an empty list
means the plan is valid for the inputs it was made from.
"""
from __future__ import annotations

from typing import Sequence

from .blocks import is_aligned_block
from .types import IMAGE, VIDEO, ClusterSpec, DeviceView, RequestView, StepPlan


def check_plan(plan: StepPlan, requests: Sequence[RequestView],
               devices: Sequence[DeviceView], cluster: ClusterSpec) -> list[str]:
    errors: list[str] = []
    by_id = {r.req_id: r for r in requests}
    idle = {d.device_id for d in devices if d.idle}
    used_devices: set[int] = set()
    dispatched: set[str] = set()
    for i, disp in enumerate(plan.dispatches):
        where = f"dispatch {i} {disp.req_ids}->{disp.device_ids}"
        errors += _check_devices(where, disp.device_ids, idle, used_devices, cluster)
        used_devices.update(disp.device_ids)
        members = []
        for rid in disp.req_ids:
            r = by_id.get(rid)
            if r is None:
                errors.append(f"{where}: unknown request {rid}")
            elif rid in dispatched:
                errors.append(f"{where}: request {rid} in two dispatches")
            else:
                members.append(r)
            dispatched.add(rid)
        if not disp.req_ids:
            errors.append(f"{where}: no requests")
        errors += _check_members(where, disp.num_steps, tuple(disp.device_ids), members, cluster)
    errors += _check_preempted(plan, requests, dispatched)
    errors += _check_rejected(plan, by_id, dispatched)
    return errors


def _check_devices(where, device_ids, idle, used, cluster) -> list[str]:
    errors = []
    if not is_aligned_block(tuple(device_ids), cluster.num_devices):
        errors.append(f"{where}: devices are not an aligned power-of-two block")
    if len(device_ids) > cluster.max_sp_degree:
        errors.append(f"{where}: degree {len(device_ids)} > max_sp_degree")
    for d in device_ids:
        if d not in idle:
            errors.append(f"{where}: device {d} is not idle")
        if d in used:
            errors.append(f"{where}: device {d} is in two dispatches")
    return errors


def _check_members(where, num_steps, device_ids, members, cluster) -> list[str]:
    errors = []
    if not members:
        return errors
    if len(members) > 1:
        if any(r.task != IMAGE for r in members):
            errors.append(f"{where}: only images are batched")
        if len({(r.model, r.width, r.height, r.num_frames) for r in members}) > 1:
            errors.append(f"{where}: batch mixes models or resolutions")
        if len(members) > cluster.max_image_batch:
            errors.append(f"{where}: batch of {len(members)} > max_image_batch")
    for r in members:
        if r.running:
            errors.append(f"{where}: {r.req_id} is already running")
        if not 1 <= num_steps <= r.steps_left:
            errors.append(f"{where}: num_steps {num_steps} not in 1..{r.steps_left} for {r.req_id}")
        if (not cluster.migratable and r.steps_done > 0
                and tuple(sorted(r.device_ids)) != tuple(sorted(device_ids))):
            errors.append(f"{where}: {r.req_id} must resume on {r.device_ids}")
        if r.task == VIDEO and len(members) > 1:
            errors.append(f"{where}: video {r.req_id} batched")
        if r.task == IMAGE and len(device_ids) > cluster.max_image_sp_degree:
            errors.append(f"{where}: image {r.req_id} on {len(device_ids)} devices > max_image_sp_degree")
        if r.task == VIDEO and len(device_ids) > cluster.video_sp_limit(r.model):
            errors.append(f"{where}: video {r.req_id} on {len(device_ids)} devices > its model's "
                          f"SP limit {cluster.video_sp_limit(r.model)}")
    return errors


def expected_preempted(requests: Sequence[RequestView], dispatched: set[str]) -> set[str]:
    """The exact set StepPlan.preempted must hold (see its docstring)."""
    return {r.req_id for r in requests
            if r.steps_done > 0 and not r.running and not r.paused
            and r.req_id not in dispatched}


def _check_preempted(plan, requests, dispatched) -> list[str]:
    want = expected_preempted(requests, dispatched)
    got = set(plan.preempted)
    errors = []
    if len(got) != len(plan.preempted):
        errors.append("preempted lists a request twice")
    if got != want:
        errors.append(f"preempted {sorted(got)} but the rule gives {sorted(want)}")
    return errors


def _check_rejected(plan, by_id, dispatched) -> list[str]:
    errors = []
    seen: set[str] = set()
    for rej in plan.rejected:
        r = by_id.get(rej.req_id)
        if r is None:
            errors.append(f"rejected unknown request {rej.req_id}")
        elif r.steps_done > 0 or r.running:
            errors.append(f"rejected {rej.req_id}, which has started")
        if rej.req_id in dispatched:
            errors.append(f"rejected {rej.req_id} and dispatched it")
        if rej.req_id in seen:
            errors.append(f"rejected {rej.req_id} twice")
        seen.add(rej.req_id)
    return errors
