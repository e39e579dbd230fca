"""Where a worker keeps a request's state when it moves it: to the host for a
broadcast to its SP peers or an export, back to its device for the next step;
and how much device memory a paused state counts for its budget."""
from __future__ import annotations

import pickle

import pytest
import torch

from genserve.models.base import GenParams
from genserve.models.registry import build_model
from genserve.workers import protocol as P
from genserve.workers.worker import Worker, WorkerSpec, _Live, _state_bytes

PARAMS = GenParams("a boat", "", 64, 64, 9, 4, 5.0, 1)


class Tracked:
    """A state that records the devices it is moved to (a GPU worker's moves,
    without a GPU)."""

    def __init__(self):
        self.moves: list[str] = []

    def to(self, device):
        self.moves.append(str(device))
        return self


class Peers:
    """An SP block's broadcast: hands back what the source sent."""

    def __init__(self):
        self.sent = []

    def broadcast_object(self, obj, src, block):
        self.sent.append(obj)
        return obj


def worker_holding(device_id: int, state) -> Worker:
    worker = Worker(WorkerSpec(device_id, "cuda:%d" % device_id, ()), {}, Peers())
    worker.live["v"] = _Live(P.NewRequest("v", "wan-tiny", PARAMS, "raw", 8), state)
    return worker


def test_the_sender_of_a_state_to_its_sp_peers_gets_it_back_on_its_device():
    """The state is pickled from host memory (a CUDA tensor would unpickle on
    the sender's GPU); before, it stayed on the host and the next step mixed
    host and device tensors."""
    state = Tracked()
    worker = worker_holding(0, state)
    msg = P.RunSteps(3, "wan-tiny", ("v",), 1, (), (0, 1), state_src=0)
    assert worker._admit_all(msg, (0, 1)) == []
    assert worker.groups.sent == [state]
    assert state.moves == ["cpu", "cuda:0"] and not worker.live["v"].on_host


def test_a_member_that_is_not_the_source_leaves_its_copy_alone():
    state = Tracked()
    worker = worker_holding(1, state)
    msg = P.RunSteps(3, "wan-tiny", ("v",), 1, (), (0, 1), state_src=0)
    worker._admit_all(msg, (0, 1))
    assert worker.groups.sent == [None] and state.moves == []


class Pipe:
    def __init__(self):
        self.out = []

    def send(self, msg):
        self.out.append(msg)


def test_an_exported_state_is_on_the_host_until_its_next_step():
    state = Tracked()
    worker = worker_holding(0, state)
    conn = Pipe()
    worker.handle(P.Export(("v",)), conn)
    assert [m.req_id for m in conn.out] == ["v"] and isinstance(pickle.loads(conn.out[0].state), Tracked)
    assert state.moves == ["cpu"] and worker.live["v"].on_host
    worker._admit_all(P.RunSteps(4, "wan-tiny", ("v",), 1), (0,))
    assert state.moves == ["cpu", "cuda:0"] and not worker.live["v"].on_host


@pytest.fixture(scope="module")
def wan():
    return build_model("wan-tiny")


def test_a_paused_video_counts_its_noise_schedulers_history_against_the_budget(wan):
    """UniPC keeps the last model outputs and sample in a plain object: two
    latents' worth more than the latents themselves, and the budget missed
    them. A state on the host counts nothing (the budget is device memory)."""
    state = wan.prepare(PARAMS, wan.encode_prompt(PARAMS))
    wan.denoise_step([state])
    wan.denoise_step([state])
    assert _state_bytes(state) == 0
    state.to("meta")  # a device any torch build has
    sched = state.extra["scheduler"]

    def size(t):
        return t.numel() * t.element_size()

    history = [t for t in sched.model_outputs if t is not None] + [sched.last_sample]
    assert len(history) >= 3 and all(t.device.type == "meta" for t in history)
    least = size(state.latents) + size(state.cond.embeds) + sum(size(t) for t in history)
    assert least <= _state_bytes(state) <= least + 2**20
