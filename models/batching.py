"""Turning a list of request states into transformer batches and back.

Continuous batching: requests at different steps share one forward pass, each
row with its own timestep. A request with classifier-free guidance takes two
rows (negative prompt first, then prompt, the SD3 pipeline's order); one
without takes a single row, so both kinds mix in one call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from genserve.models.base import RequestState


@dataclass(frozen=True, slots=True)
class RowBatch:
    """One forward pass worth of rows and how they map back to states."""

    latents: torch.Tensor  # (rows, ...) model input
    timesteps: torch.Tensor  # (rows,) each row's own timestep
    embeds: torch.Tensor  # (rows, seq_len, dim)
    pooled: torch.Tensor | None  # (rows, dim) or None
    first_rows: tuple[int, ...]  # per state: its first row (uncond row when CFG)


def group_states(states: list[RequestState]) -> list[list[int]]:
    """Indices of ``states`` split into groups that can share a forward pass
    (same latent shape and text length); order within a group is kept."""
    groups: dict[tuple, list[int]] = {}
    for i, st in enumerate(states):
        if st.done:
            raise ValueError(f"request state already finished all {st.params.num_steps} steps")
        key = (tuple(st.latents.shape), tuple(st.cond.embeds.shape), st.latents.dtype)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def assemble(states: list[RequestState], dtype: torch.dtype) -> RowBatch:
    """Stack ``states`` (one group) into rows: CFG states give (uncond, cond)."""
    lat, ts, emb, pooled, first_rows = [], [], [], [], []
    for st in states:
        first_rows.append(len(lat))
        t = st.timesteps[st.step_index]
        pairs = [(st.cond.neg_embeds, st.cond.neg_pooled)] if st.uses_cfg else []
        for e, p in pairs + [(st.cond.embeds, st.cond.pooled)]:
            if e is None:
                raise ValueError("guidance_scale > 1 but the cond has no negative embeddings")
            lat.append(st.latents)
            ts.append(t.reshape(1))
            emb.append(e)
            pooled.append(p)
    has_pooled = pooled[0] is not None
    return RowBatch(
        latents=torch.cat(lat).to(dtype),
        timesteps=torch.cat(ts),
        embeds=torch.cat(emb).to(dtype),
        pooled=torch.cat(pooled).to(dtype) if has_pooled else None,
        first_rows=tuple(first_rows),
    )


def guide(noise: torch.Tensor, batch: RowBatch, states: list[RequestState]) -> list[torch.Tensor]:
    """Per-state noise prediction, CFG applied: uncond + g * (cond - uncond)."""
    out = []
    for st, row in zip(states, batch.first_rows):
        if st.uses_cfg:
            uncond, cond = noise[row : row + 1], noise[row + 1 : row + 2]
            out.append(uncond + st.params.guidance_scale * (cond - uncond))
        else:
            out.append(noise[row : row + 1])
    return out
