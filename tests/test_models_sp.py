"""Sequence parallelism contract for Wan: a step at SP=k equals the step on
one device, members stay bit-identical, and a request that moves between
degrees mid-run (1 -> 2 -> 1, 1 -> 2 -> 4 -> 1) equals the uninterrupted run.

The multi-process tests spawn real worker processes that talk gloo over
loopback on a free port; the SP=1 references are computed in this process.
"""
from __future__ import annotations

import copy
import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from genserve.models.base import GenParams
from genserve.models.registry import build_model
from genserve.models.sp import (SPGroup, aligned_blocks, attention, check_backend, gather_tokens, new_sp_groups,
                                shard_tokens, ulysses_attention, wan_forward_sp)


def params(seed, guidance=5.0, size=64, frames=9, steps=4):
    return GenParams("a cat walking", "static", size, size, frames, steps, guidance, seed)


# 64x64x9 -> 3x4x4 = 48 tokens; 48x48x9 -> 3x3x3 = 27 tokens (odd: padded under SP)
PREDICT_SPECS = [params(1), params(2, guidance=1.0), params(3, size=48)]
RUN_SPECS = [params(7), params(8, guidance=1.0, size=48, steps=3)]
ELASTIC_SPEC = params(9, steps=5)


def start(model, p):
    return model.prepare(p, model.encode_prompt(p))


def run(model, states, sp=None):
    while not all(st.done for st in states):
        model.denoise_step([st for st in states if not st.done], sp=sp)
    return states


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def model():
    return build_model("wan-tiny")


# ---- in-process ------------------------------------------------------------------
def test_groups_are_aligned_blocks_in_a_fixed_order():
    assert aligned_blocks(8) == [(0, 1), (2, 3), (4, 5), (6, 7), (0, 1, 2, 3), (4, 5, 6, 7), tuple(range(8))]
    assert aligned_blocks(6, sizes=(4, 2)) == [(0, 1), (2, 3), (4, 5), (0, 1, 2, 3)]
    assert aligned_blocks(1) == []


def test_group_and_backend_validation(model):
    with pytest.raises(ValueError):
        SPGroup(None, 2, 2)
    with pytest.raises(ValueError):
        SPGroup(None, 0, 2, attention="flash")
    check_backend("sdpa", "cpu")
    with pytest.raises(ValueError, match="CUDA"):
        check_backend("xformers", "cpu")
    assert [k for k in (1, 2, 3, 4, 8) if model.supports_sp(k)] == [1, 2, 4, 8]


def test_shards_pad_the_tail_and_gather_strips_it():
    x = torch.arange(27.0).view(1, 27, 1)
    shards = [shard_tokens(x, SPGroup(None, r, 4)) for r in range(4)]
    assert [s.shape[1] for s in shards] == [7] * 4
    assert torch.equal(torch.cat(shards, 1)[:, :27], x) and shards[3][0, -1, 0] == 0
    alone = SPGroup(None, 0, 1)
    assert torch.equal(gather_tokens(shard_tokens(x, alone), alone, 27), x)


def test_degree_one_block_loop_mirrors_diffusers(model):
    """The SP block loop at size 1 (no collectives) is the diffusers forward."""
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 16, 3, 8, 8), (1, 16, 3, 6, 6)]:
        lat, emb = torch.randn(*shape, generator=g), torch.randn(shape[0], 64, 32, generator=g)
        t = torch.linspace(999, 500, shape[0])
        with torch.no_grad():
            assert torch.equal(wan_forward_sp(model.transformer, lat, t, emb, SPGroup(None, 0, 1)),
                               model.forward(lat, t, emb))
    q, k, v = torch.randn(3, 2, 10, 4, 8, generator=g).unbind(0)
    assert torch.equal(ulysses_attention(q, k, v, SPGroup(None, 0, 1), 10), attention(q, k, v))


def test_degree_one_group_is_the_plain_path(model):
    a, b = start(model, params(1)), start(model, params(1))
    model.denoise_step([a], sp=SPGroup(None, 0, 1))
    model.denoise_step([b])
    assert torch.equal(a.latents, b.latents)


# ---- multi-process (gloo on loopback) -----------------------------------------------
# One spawn of 4 processes (each pays ~15 s of imports): both pairs run the SP=2
# cases at once on their own groups, then all four run them at SP=4.
WORLD = 4
ELASTIC_DEGREES = {"1-2-1": (1, 2, 2, 1, 1), "1-2-4-1": (1, 2, 2, 4, 1)}  # degree of each step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _elastic(model, groups, rank, degrees, snaps):
    """One request whose steps run at ``degrees`` on ranks 0..k-1; rank 0
    starts it and sends its state to whoever joins a bigger group."""
    state = start(model, ELASTIC_SPEC) if rank == 0 else None
    fresh = {0}  # ranks holding the current state
    for k in degrees:
        members = tuple(range(k))
        if not fresh.issuperset(members):  # every rank joins the broadcast (the default group)
            box = [state.to("cpu") if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            state, fresh = box[0], set(range(WORLD))
        fresh &= set(members)
        if rank in members:
            model.denoise_step([state], sp=groups.get(members))
            snaps[state.step_index] = state.latents.clone()
    return state.latents if rank == 0 else None


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        groups = new_sp_groups(sizes=(2, 4))
        model = build_model("wan-tiny")
        processors = dict(model.transformer.attn_processors)
        out = {}
        for k in (2, 4):
            first = rank // k * k
            sp = groups[tuple(range(first, first + k))]
            assert (sp.rank, sp.size) == (rank - first, k)
            out[k] = {"preds": model.predict_noise([start(model, p) for p in PREDICT_SPECS], sp=sp),
                      "runs": [st.latents for st in run(model, [start(model, p) for p in RUN_SPECS], sp=sp)]}
        for name, degrees in ELASTIC_DEGREES.items():
            snaps = out[name + " snaps"] = {}
            out[name] = _elastic(model, groups, rank, degrees, snaps)
        assert model.transformer.attn_processors == processors  # nothing left on the shared model
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the 4 spawned ranks computed."""
    out_dir = tmp_path_factory.mktemp("sp")
    mp.start_processes(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference(model):
    preds = model.predict_noise([start(model, p) for p in PREDICT_SPECS])
    runs = [run(model, [start(model, p)])[0] for p in RUN_SPECS]
    return {"preds": preds, "runs": runs, "elastic": run(model, [start(model, ELASTIC_SPEC)])[0].latents}


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 4])
def test_group_members_stay_bit_identical(ranks, k):
    for first in range(0, WORLD, k):
        a, *others = [ranks[r][k] for r in range(first, first + k)]
        for b in others:
            assert all(torch.equal(x, y) for x, y in zip(a["preds"] + a["runs"], b["preds"] + b["runs"]))


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 4])
def test_noise_prediction_equals_one_device(ranks, reference, k):
    """CFG and plain rows in one call, and a 27-token sequence (padded)."""
    for mine, ref in zip(ranks[0][k]["preds"], reference["preds"]):
        assert mine.shape == ref.shape and rel_err(mine, ref) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 4])
def test_full_run_equals_one_device(model, ranks, reference, k):
    for latents, ref in zip(ranks[0][k]["runs"], reference["runs"]):
        assert rel_err(latents, ref.latents) < 1e-4
        state = copy.copy(ref)
        state.latents = latents
        assert np.abs(model.decode(state).astype(int) - model.decode(ref).astype(int)).max() <= 2


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ELASTIC_DEGREES))
def test_resharded_mid_run_equals_uninterrupted(ranks, reference, name):
    assert rel_err(ranks[0][name], reference["elastic"]) < 1e-4
    for other in ranks[1:]:  # every rank that took part in a step holds rank 0's bytes
        for step, latents in other[name + " snaps"].items():
            assert torch.equal(latents, ranks[0][name + " snaps"][step])


@pytest.mark.parametrize("command", [["serve", "--port", "0", "--device", "cpu"], ["profile", "--out", "x.json"]])
def test_xformers_on_cpu_is_refused_before_any_worker_starts(command):
    from genserve.cli import main

    with pytest.raises(SystemExit) as err:
        main([*command, "--attention", "xformers"])
    assert "the xformers attention backend needs --device cuda" in str(err.value.code)


def test_a_worker_checks_its_attention_backend_before_loading_models():
    from genserve.workers.startup import load
    from genserve.workers.worker import WorkerSpec

    with pytest.raises(ValueError, match="needs a CUDA device"):
        load(WorkerSpec(0, "cpu", ("no-such-model",), attention="xformers"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["profile", "--out", "x.json"]])
def test_cuda_without_a_gpu_is_a_clear_error(command):
    from genserve.cli import main

    with pytest.raises(SystemExit) as err:
        main([*command, "--device", "cuda"])
    assert str(err.value.code) == "error: --device cuda: no CUDA device is visible"
