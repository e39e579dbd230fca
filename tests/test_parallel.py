"""The torch.distributed world the workers join (workers/parallel.py).

The multi-process SP tests run gloo worlds on the CPU; these check what a
CUDA world would be, which no test here can start."""
from __future__ import annotations

import os

from torch.distributed.distributed_c10d import Backend, BackendConfig

from genserve.workers.parallel import aligned_blocks, dist_spec, remove_world


def backends(spec) -> dict[str, str]:
    return BackendConfig(Backend(spec.backend)).get_device_backend_map()


def test_a_cuda_world_sends_cpu_tensors_over_gloo_and_cuda_ones_over_nccl():
    """An SP dispatch's control is on the CPU (the leader's step flag, a moved
    request's pickled state) and NCCL refuses CPU tensors: a world of NCCL
    alone failed every SP dispatch's first collective."""
    spec = dist_spec(4, "cuda:0", 8)
    try:
        assert backends(spec) == {"cpu": "gloo", "cuda": "nccl"}
        assert spec.max_block == 4 and spec.world_size == 4
    finally:
        remove_world(spec)


def test_a_cpu_world_is_gloo_and_sp_off_needs_no_world():
    spec = dist_spec(8, "cpu", 2)
    try:
        assert backends(spec)["cpu"] == "gloo" and spec.max_block == 2
        folder = os.path.dirname(spec.init_method[len("file://"):])
        assert os.path.isdir(folder)
    finally:
        remove_world(spec)
    assert not os.path.exists(folder)
    assert dist_spec(1, "cpu", 8) is None and dist_spec(8, "cuda:0", 1) is None
    assert aligned_blocks(8, 4) == [(0, 1), (2, 3), (4, 5), (6, 7), (0, 1, 2, 3), (4, 5, 6, 7)]
