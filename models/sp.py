"""Sequence parallelism (Ulysses) with the group chosen per call.

A video's step may run on 1, 2, 4 or 8 devices, a different number at every
step. Every member of the group holds the full request state and makes the
same adapter call at the same time; inside the transformer each member keeps
only its 1/k slice of the token sequence. Self-attention needs every token, so
it swaps the split with one all-to-all: (B, S/k, H, D) -> (B, S, H/k, D),
attends over the whole sequence for its H/k heads, and swaps back. Everything
else in a DiT block is per token (norms, projections, FFN, cross-attention to
the text, which every member holds in full). The token outputs are all-gathered
at the end, so every member gets the same bytes and applies the same
noise-scheduler update: members stay bit-identical and any of them can go on
alone or in another group.

Nothing is installed on the shared model: ``wan_forward_sp`` runs its own
block loop with the attention function passed in, so two calls with different
groups (or none) can interleave freely.

A sequence that does not divide by k is padded at the end with zero tokens;
the padding is dropped before attention (so real tokens never attend to it)
and again after the gather. Head counts must divide by k (``heads % k == 0``).

Collectives: ``all_to_all_single`` and ``all_gather`` only, which both gloo
(CPU) and NCCL (CUDA) implement. Either failing (a member died) raises
``CollectiveError``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from genserve.models.base import collective

BACKENDS = ("sdpa", "xformers")


@dataclass(frozen=True, slots=True)
class SPGroup:
    """One sequence-parallel group as seen from one member.

    ``group`` is a torch.distributed ProcessGroup (None: the default group),
    ``rank`` this member's rank within it (its shard index), ``size`` the
    degree. ``attention`` picks the attention kernel: ``sdpa`` (PyTorch) or
    ``xformers`` (CUDA only, optional; see ``check_backend``).
    """

    group: Any
    rank: int
    size: int
    attention: str = "sdpa"

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"bad SP group: rank {self.rank} of size {self.size}")
        if self.attention not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, not {self.attention!r}")

    @property
    def parallel(self) -> bool:
        return self.size > 1


# ---- groups -----------------------------------------------------------------
def aligned_blocks(world_size: int, sizes=(2, 4, 8)) -> list[tuple[int, ...]]:
    """Every aligned block of ranks of each size in ``sizes`` that fits in
    ``world_size``: sizes ascending, then by first rank. ``new_sp_groups``
    creates groups in this order."""
    return [tuple(range(start, start + size))
            for size in sorted(sizes) if size <= world_size
            for start in range(0, world_size - size + 1, size)]


def new_sp_groups(sizes=(2, 4, 8), backend: str | None = None,
                  attention: str = "sdpa") -> dict[tuple[int, ...], SPGroup]:
    """Create a process group for every aligned block (``aligned_blocks``) and
    return this rank's: {global ranks of the block: SPGroup}.

    Collective: every rank of the default group must call it once, after
    ``init_process_group``, with the same arguments (``dist.new_group`` must
    be called by all ranks for every group, in the same order).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {}
    for ranks in aligned_blocks(world, sizes):
        group = dist.new_group(list(ranks), backend=backend)
        if rank in ranks:
            mine[ranks] = SPGroup(group, ranks.index(rank), len(ranks), attention)
    return mine


def check_group(sp: SPGroup) -> None:
    """Raise unless ``sp`` matches its process group (rank and size)."""
    if not sp.parallel:
        return
    if not dist.is_initialized():
        raise RuntimeError("SP degree > 1 needs torch.distributed to be initialised")
    size, rank = dist.get_world_size(sp.group), dist.get_rank(sp.group)
    if (rank, size) != (sp.rank, sp.size):
        raise ValueError(f"SPGroup says rank {sp.rank} of {sp.size}, process group says {rank} of {size}")


def check_backend(name: str, device: torch.device | str) -> None:
    """Raise unless attention backend ``name`` can run on ``device``. Workers
    call it once at start; xformers is imported here, never at module load."""
    if name == "sdpa":
        return
    if name != "xformers":
        raise ValueError(f"attention backend must be one of {BACKENDS}, not {name!r}")
    if torch.device(device).type != "cuda":
        raise ValueError("the xformers attention backend needs a CUDA device")
    try:
        import xformers.ops  # noqa: F401
    except ImportError as exc:
        raise ValueError("the xformers attention backend needs the xformers package") from exc


# ---- token shards -----------------------------------------------------------
def shard_len(seq_len: int, size: int) -> int:
    """Tokens per member: the sequence padded up to a multiple of ``size``."""
    return -(-seq_len // size)


def shard_tokens(x: torch.Tensor, sp: SPGroup, dim: int = 1) -> torch.Tensor:
    """This member's slice of ``x`` along ``dim`` (zero-padded at the end of
    the sequence when it does not divide by the group size)."""
    seq_len = x.shape[dim]
    local = shard_len(seq_len, sp.size)
    pad = local * sp.size - seq_len
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    return x.narrow(dim, sp.rank * local, local)


def gather_tokens(x: torch.Tensor, sp: SPGroup, seq_len: int, dim: int = 1) -> torch.Tensor:
    """Inverse of ``shard_tokens``: every member's slice, in rank order,
    padding dropped. Collective over ``sp.group``."""
    if sp.parallel:
        parts = [torch.empty_like(x) for _ in range(sp.size)]
        with collective("all_gather of the SP group's tokens"):
            dist.all_gather(parts, x.contiguous(), group=sp.group)
        x = torch.cat(parts, dim=dim)
    return x.narrow(dim, 0, seq_len)


# ---- attention ------------------------------------------------------------------
def attention(q, k, v, backend: str = "sdpa") -> torch.Tensor:
    """Plain self-attention over (B, S, H, D) tensors; returns (B, S, H, D)."""
    if backend == "xformers":
        import xformers.ops as xops  # optional, CUDA only: imported on first use

        return xops.memory_efficient_attention(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _exchange(x: torch.Tensor, sp: SPGroup) -> torch.Tensor:
    """all-to-all along dim 0 (length ``sp.size``): slot j goes to member j,
    and slot j of the result came from member j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    with collective("all_to_all of the SP group's attention"):
        dist.all_to_all_single(out, x, group=sp.group)
    return out


def ulysses_attention(q, k, v, sp: SPGroup, seq_len: int) -> torch.Tensor:
    """Self-attention over the whole sequence from per-member token shards.

    ``q``, ``k``, ``v``: (B, L, H, D), this member's L = S_padded / k tokens
    with every head (rotary already applied). ``seq_len``: the real length S
    before padding. Returns (B, L, H, D) for the same tokens. Collective over
    ``sp.group``: every member calls it with the same shapes.
    """
    if not sp.parallel:
        return attention(q[:, :seq_len], k[:, :seq_len], v[:, :seq_len], sp.attention)
    b, local, heads, dim = q.shape
    size = sp.size
    if heads % size:
        raise ValueError(f"{heads} attention heads do not split over an SP group of {size}")
    # (3, B, L, H, D) -> slot j = head group j of my tokens
    qkv = torch.stack([q, k, v]).view(3, b, local, size, heads // size, dim).permute(3, 0, 1, 2, 4, 5)
    # slot j = my head group of member j's tokens -> (3, B, S_padded, H/k, D)
    qkv = _exchange(qkv, sp).permute(1, 2, 0, 3, 4, 5).reshape(3, b, size * local, heads // size, dim)
    out = attention(*qkv[:, :, :seq_len].unbind(0), sp.attention)
    pad = size * local - seq_len
    if pad:
        out = torch.cat([out, out.new_zeros(b, pad, heads // size, dim)], dim=1)
    # slot j = member j's tokens of my head group -> back: slot j = head group j of my tokens
    out = out.reshape(b, size, local, heads // size, dim).permute(1, 0, 2, 3, 4)
    return _exchange(out, sp).permute(1, 2, 0, 3, 4).reshape(b, local, heads, dim)


# ---- Wan transformer under SP ---------------------------------------------------
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved channel pairs of (B, L, H, D)."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2).type_as(x)


def _self_attention(attn, x, rope, attend: AttentionFn) -> torch.Tensor:
    """A ``WanAttention`` self-attention layer with ``attend`` as its kernel."""
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    q, k = attn.norm_q(q), attn.norm_k(k)
    q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
    q, k = _rotate(q, *rope), _rotate(k, *rope)
    out = attend(q, k, v).flatten(2, 3).type_as(q)
    return attn.to_out[1](attn.to_out[0](out))


def _wan_block(block, x, text, tproj, rope, attend: AttentionFn) -> torch.Tensor:
    """``WanTransformerBlock.forward`` (Wan 2.1: one timestep per row) on a
    token shard, self-attention through ``attend``."""
    shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table + tproj.float()).chunk(6, dim=1)
    h = (block.norm1(x.float()) * (1 + scale) + shift).type_as(x)
    x = (x.float() + _self_attention(block.attn1, h, rope, attend) * gate).type_as(x)
    h = block.norm2(x.float()).type_as(x)
    x = x + block.attn2(h, text, None, None)  # cross-attention: local queries, full text
    h = (block.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
    return (x.float() + block.ffn(h).float() * c_gate).type_as(x)


def wan_forward_sp(model, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                   sp: SPGroup) -> torch.Tensor:
    """``WanTransformer3DModel`` forward (text-to-video, one timestep per
    row) with the token sequence split over ``sp``; returns the full flow
    prediction (B, C, F, H, W) on every member. Collective over ``sp.group``:
    every member calls it with identical inputs."""
    cfg = model.config
    if timesteps.ndim != 1 or cfg.image_dim is not None or cfg.added_kv_proj_dim is not None:
        raise NotImplementedError("SP supports Wan 2.1 text-to-video (one timestep per row, no image)")
    if cfg.num_attention_heads % sp.size:
        raise ValueError(f"{cfg.num_attention_heads} attention heads do not split over {sp.size} devices")
    check_group(sp)
    b, _, frames, height, width = latents.shape
    p_t, p_h, p_w = cfg.patch_size
    grid = (frames // p_t, height // p_h, width // p_w)

    cos, sin = model.rope(latents)  # (1, S, 1, D) each, for the full sequence
    x = model.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()  # (B, S, C)
    seq_len = x.shape[1]
    temb, tproj, text, _ = model.condition_embedder(timesteps, embeds, None)
    tproj = tproj.unflatten(1, (6, -1))

    x, rope = shard_tokens(x, sp), (shard_tokens(cos, sp), shard_tokens(sin, sp))

    def attend(q, k, v):
        return ulysses_attention(q, k, v, sp, seq_len)

    for block in model.blocks:
        x = _wan_block(block, x, text, tproj, rope, attend)

    shift, scale = (model.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
    x = (model.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
    # proj_out is per token: gather its output, far narrower than the hidden states
    x = gather_tokens(model.proj_out(x), sp, seq_len)
    x = x.reshape(b, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
