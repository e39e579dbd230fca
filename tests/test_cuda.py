"""The CUDA path (skipped without a GPU; experiments/gpu_check.sh runs it on one).

The tiny models on a GPU give what they give on the CPU, and the attention
backends agree with each other.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from genserve.models.base import GenParams
from genserve.models.registry import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def generate(model, params: GenParams) -> np.ndarray:
    state = model.prepare(params, model.encode_prompt(params))
    while not state.done:
        model.denoise_step([state])
    return model.decode(state)


@pytest.fixture(autouse=True)
def exact_matmuls():
    """TF32 would make the GPU's float32 differ from the CPU's by more than rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("name,frames", [("sd3-tiny", 1), ("wan-tiny", 9)])
def test_tiny_model_on_cuda_matches_cpu(name, frames):
    params = GenParams("a lighthouse at dusk", "", 64, 64, frames, 4, 5.0, 3)
    on_cpu = generate(build_model(name, device="cpu"), params)
    on_gpu = generate(build_model(name, device="cuda"), params)
    assert on_gpu.shape == on_cpu.shape == (frames, 64, 64, 3)
    assert int(np.abs(on_gpu.astype(int) - on_cpu.astype(int)).max()) <= 2


@pytest.mark.parametrize("name,frames", [("sd3-tiny", 1), ("wan-tiny", 9)])
def test_xformers_matches_sdpa(name, frames):
    pytest.importorskip("xformers.ops", reason="xformers is not installed (pip install 'genserve[cuda]')")
    params = GenParams("a lighthouse at dusk", "", 64, 64, frames, 4, 5.0, 3)
    sdpa = generate(build_model(name, device="cuda"), params)
    model = build_model(name, device="cuda")
    model.set_attention("xformers")
    xformers = generate(model, params)
    assert int(np.abs(xformers.astype(int) - sdpa.astype(int)).max()) <= 2


def test_bfloat16_runs_and_gives_an_image():
    model = build_model("sd3-tiny", device="cuda", dtype=torch.bfloat16)
    frames = generate(model, GenParams("a red cube", "", 128, 128, 1, 4, 5.0, 1))
    assert frames.shape == (1, 128, 128, 3) and frames.std() > 0


def test_a_cuda_world_carries_an_sp_dispatchs_control_and_data(tmp_path):
    """The world a CUDA worker joins (one rank: one GPU cannot hold two NCCL
    ranks) takes the CPU step flag and a pickled state as well as a CUDA
    all-reduce, the three kinds of collective an SP dispatch runs."""
    import datetime

    import torch.distributed as dist

    from genserve.workers.parallel import CUDA_BACKEND

    torch.cuda.set_device(0)
    dist.init_process_group(CUDA_BACKEND, init_method=f"file://{tmp_path}/rendezvous", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        flag = torch.tensor([1], dtype=torch.int32)
        dist.broadcast(flag, src=0)
        box = [{"state": torch.ones(3)}]
        dist.broadcast_object_list(box, src=0)
        data = torch.full((4,), 2.0, device="cuda")
        dist.all_reduce(data)
        assert flag.item() == 1 and box[0]["state"].sum().item() == 3.0
        assert data.device.type == "cuda" and data.sum().item() == 8.0
    finally:
        dist.destroy_process_group()
