"""Process groups for sequence parallelism.

Every worker joins one torch.distributed world at start (gloo on CPU; on CUDA
NCCL for CUDA tensors and gloo for CPU ones; rendezvous through a private
file) and creates a group for every
aligned power-of-two block of devices (buddy blocks: [0,1], [2,3], [0..3],
...), in the same order on every rank, as torch.distributed requires. A
dispatch then names its block and every member finds the group here. Blocks
are few (n-1 for n devices), so they are made once, never per step.

The SP step's own data (attention's all-to-all, the token gather) is on the
device, but a dispatch's control is not: the members' agreement on each step
and a moved request's state are CPU objects. NCCL takes CUDA tensors only, so a
CUDA world is ``cpu:gloo,cuda:nccl``: torch routes each collective by its
tensor's device.
"""
from __future__ import annotations

import datetime
import io
import logging
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass

from genserve.models.base import collective

log = logging.getLogger("genserve.parallel")


@dataclass(frozen=True, slots=True)
class DistSpec:
    """How a worker joins the world. Plain data, pickled into the worker."""

    init_method: str  # file://PRIVATE_DIR/rendezvous (single host)
    world_size: int
    backend: str  # gloo, or cpu:gloo,cuda:nccl (CUDA_BACKEND)
    max_block: int  # largest SP degree (power of two, <= world_size)
    # the world group's timeout (its set-up and barriers); SP groups keep
    # torch's default, and the engine kills the workers of a dispatch stuck
    # far past its prediction (EngineConfig.hung_worker_s) long before it
    timeout_s: float = 120.0


RENDEZVOUS_PREFIX = "genserve-dist-"
CUDA_BACKEND = "cpu:gloo,cuda:nccl"


def dist_spec(num_devices: int, device: str, max_sp_degree: int) -> DistSpec | None:
    """The world for ``num_devices`` workers, or None when SP is off (one
    device, or max_sp_degree 1). Rendezvous goes through a file in a private
    directory: unlike a TCP store, it listens on no network interface."""
    max_block = 1
    while max_block * 2 <= min(num_devices, max_sp_degree):
        max_block *= 2
    if max_block < 2:
        return None
    backend = CUDA_BACKEND if device.startswith("cuda") else "gloo"
    rendezvous = os.path.join(tempfile.mkdtemp(prefix=RENDEZVOUS_PREFIX), "rendezvous")
    return DistSpec(f"file://{rendezvous}", num_devices, backend, max_block)


def remove_world(spec: DistSpec | None) -> None:
    """Delete the private directory of ``spec``'s rendezvous file (the
    caller knows no worker will join that world any more)."""
    if spec is None or not spec.init_method.startswith("file://"):
        return
    folder = os.path.dirname(spec.init_method[len("file://"):])
    if os.path.basename(folder).startswith(RENDEZVOUS_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)


def aligned_blocks(num_devices: int, max_block: int) -> list[tuple[int, ...]]:
    """Every aligned block of 2..max_block devices, smallest first."""
    blocks, size = [], 2
    while size <= min(max_block, num_devices):
        blocks += [tuple(range(start, start + size)) for start in range(0, num_devices - size + 1, size)]
        size *= 2
    return blocks


class Groups:
    """This rank's view of the world: its rank and the group of each block."""

    def __init__(self, rank: int, groups: dict[tuple[int, ...], object]):
        self.rank, self.groups = rank, groups

    @classmethod
    def join(cls, spec: DistSpec, rank: int, device: str = "cpu") -> "Groups":
        """Join ``spec``'s world as ``rank`` and make every block's group;
        then one small all-reduce on ``device`` in each of this rank's groups
        (smallest block first, the same order on every rank). NCCL makes a
        group's communicator at its first collective on CUDA tensors, which
        would otherwise land on the first SP step after a join: the first
        user's video at start, and after a rejoin a video the engine has
        just put back on SP."""
        import torch
        import torch.distributed as dist

        # One host: keep the transport on loopback (state is pickled across it).
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        os.environ["NCCL_SOCKET_IFNAME"] = "lo"
        dist.init_process_group(spec.backend, init_method=spec.init_method, rank=rank,
                                world_size=spec.world_size,
                                timeout=datetime.timedelta(seconds=spec.timeout_s))
        groups = {}
        for block in aligned_blocks(spec.world_size, spec.max_block):
            group = dist.new_group(list(block), backend=spec.backend)
            if rank in block:
                groups[block] = group
        for block, group in groups.items():
            dist.all_reduce(torch.zeros(1, device=device), group=group)
        log.info("rank %d joined %d-rank %s world; blocks %s", rank, spec.world_size, spec.backend,
                 sorted(groups))
        return cls(rank, groups)

    def group(self, block: tuple[int, ...]):
        if len(block) == 1:
            return None
        if block not in self.groups:
            raise ValueError(f"rank {self.rank}: {block} is not an aligned block of this world")
        return self.groups[block]

    def broadcast_object(self, obj, src: int, block: tuple[int, ...]):
        """Send ``obj`` from rank ``src`` to every member of ``block``;
        CollectiveError when that fails (a member died)."""
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        with collective("broadcast of a request's state"):
            dist.broadcast_object_list(box, src=src, group=self.group(block))
        return box[0]

    def agree(self, votes: list[int], block: tuple[int, ...]) -> list[int]:
        """The element-wise minimum of every member's ``votes`` (integers)
        over ``block``: what all of them say yes to. CollectiveError when that
        fails (a member died)."""
        import torch
        import torch.distributed as dist

        agreed = torch.tensor(votes, dtype=torch.int64)
        with collective("the SP group's agreement on the next step"):
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.group(block))
        return agreed.tolist()

    def close(self) -> None:
        """Leave the world. A group's connections close only with the last
        reference to it, so this view lets go of its groups too: a peer blocked
        in a collective with this rank then fails at once (gloo, measured
        within 30 ms) instead of waiting until this process exits."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self.groups = {}


def state_to_bytes(state) -> bytes:
    """A request's state on host memory, as bytes (for a move through the engine)."""
    buf = io.BytesIO()
    pickle.dump(state.to("cpu"), buf, protocol=pickle.HIGHEST_PROTOCOL)
    return buf.getvalue()


def state_from_bytes(data: bytes, device):
    return pickle.loads(data).to(device)
