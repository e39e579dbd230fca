"""Turning one planned ``Dispatch`` into messages for the block's workers.

Where a request's state comes from on each member: it is already there, it is
broadcast by a member that holds it (growing an SP group), it arrives as bytes
through the engine (moving to a block that holds none of it), or it is
created fresh (the first step).
"""
from __future__ import annotations

from typing import Callable

from genserve.scheduler.types import Dispatch
from genserve.tracked import Tracked
from genserve.workers import protocol as P


def is_aligned(block: tuple[int, ...]) -> bool:
    k = len(block)
    return (k > 0 and k & (k - 1) == 0 and block[0] % k == 0
            and block == tuple(range(block[0], block[0] + k)))


def check_dispatch(d: Dispatch, ts: list[Tracked | None], idle: set[int], max_sp_degree: int,
                   sp_limit: Callable[[str], int] | None = None) -> str:
    """Why the executor cannot run ``d`` ('' when it can). ``sp_limit(model)``:
    the largest block a step of that model runs on (None: max_sp_degree)."""
    block = tuple(d.device_ids)
    if not is_aligned(block) or len(block) > max_sp_degree:
        return f"{block} is not an aligned block of at most {max_sp_degree} devices"
    if not set(block) <= idle:
        return "device not idle"
    if not ts or any(t is None or t.done or t.running for t in ts):
        return "unknown, finished or running request"
    if len({t.req.model for t in ts}) != 1:
        return "mixed models in one batch"
    if len(block) > 1 and (len(ts) != 1 or ts[0].req.task != "video"):
        return "only a single video runs on a multi-device block"
    if sp_limit is not None and len(block) > sp_limit(ts[0].req.model):
        return f"model {ts[0].req.model} runs on at most {sp_limit(ts[0].req.model)} devices"
    if d.num_steps < 1 or any(d.num_steps > t.req.params.num_steps - t.steps_done for t in ts):
        return "num_steps outside 1..steps left"
    return ""


def needs_move(t: Tracked, block: tuple[int, ...]) -> bool:
    """True when the state lives only outside ``block``: it moves as bytes."""
    return bool(t.holders) and not (t.holders & set(block))


def member_messages(dispatch_id: int, d: Dispatch, ts: list[Tracked],
                    moved: dict[str, bytes]) -> dict[int, P.RunSteps]:
    """One RunSteps per member of the block, each with its own ``new``."""
    block = tuple(d.device_ids)
    model = ts[0].req.model
    state_src = -1
    for t in ts:
        inside = t.holders & set(block)
        if inside and inside != set(block):
            state_src = min(inside)  # grow: a member broadcasts to the rest
    out = {}
    for member in block:
        new = []
        for t in ts:
            if member in t.holders:
                continue
            r = t.req
            if r.req_id in moved:
                source, data = P.BYTES, moved[r.req_id]
            elif t.holders & set(block):
                source, data = P.PEER, b""
            else:
                source, data = P.FRESH, b""
            new.append(P.NewRequest(r.req_id, model, r.params, r.output_format, r.fps, source, data))
        out[member] = P.RunSteps(dispatch_id, model, d.req_ids, d.num_steps, tuple(new), block, state_src)
    return out
