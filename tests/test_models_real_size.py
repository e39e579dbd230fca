"""Real-size presets (SD3 medium, Wan 2.1 1.3B, seeded random weights): sized
and wired on the meta device, so nothing is allocated. They are meant for a
GPU; this machine only checks their configs, parameter counts and plumbing."""
from __future__ import annotations

import pytest
import torch

from genserve.models.presets import PRESETS, _seeded_on, sd3_medium_modules, wan_1_3b_modules
from genserve.models.registry import build_model


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def sd3():
    with torch.device("meta"):
        return dict(zip(("transformer", "vae", "clip_l", "clip_g", "t5"), sd3_medium_modules()))


@pytest.fixture(scope="module")
def wan():
    with torch.device("meta"):
        return dict(zip(("transformer", "vae", "t5"), wan_1_3b_modules()))


def test_names_are_presets():
    assert {"sd3-medium-random", "wan-1.3b-random"} <= set(PRESETS)


def test_sd3_medium_sizes(sd3):
    assert all(p.is_meta for m in sd3.values() for p in m.parameters())
    assert 2.0e9 <= n_params(sd3["transformer"]) <= 2.1e9  # "2B" MMDiT: 2,028,328,000
    # measured with diffusers 0.42 / transformers 5.24; the text encoders on
    # the 259-token byte vocabulary (the real tables are 49408 / 32128 rows)
    expected = {"vae": 83_819_683, "clip_l": 85_903_872, "clip_g": 631_749_120, "t5": 4_631_775_232}
    for key, count in expected.items():
        assert n_params(sd3[key]) == pytest.approx(count, rel=0.01), key
    assert 7.4e9 <= sum(map(n_params, sd3.values())) <= 7.5e9


def test_sd3_medium_text_stack_fits_the_mmdit(sd3):
    cfg = sd3["transformer"].config
    clip_l, clip_g, t5 = sd3["clip_l"].config, sd3["clip_g"].config, sd3["t5"].config
    assert cfg.joint_attention_dim == t5.d_model == 4096
    assert cfg.pooled_projection_dim == clip_l.projection_dim + clip_g.projection_dim == 2048
    # CLIP-L ‖ CLIP-G penultimate states are zero-padded up to the T5 width
    assert clip_l.hidden_size + clip_g.hidden_size <= t5.d_model
    assert (cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim) == (24, 1536)
    assert (t5.num_layers, t5.num_heads, t5.d_kv, t5.d_ff) == (24, 64, 64, 10240)
    assert (clip_l.num_hidden_layers, clip_g.num_hidden_layers) == (12, 32)


def test_wan_1_3b_sizes(wan):
    assert all(p.is_meta for m in wan.values() for p in m.parameters())
    assert 1.3e9 <= n_params(wan["transformer"]) <= 1.5e9  # "1.3B": 1,418,996,800
    expected = {"vae": 126_892_531, "t5": 4_631_822_336}  # UMT5-XXL on the byte vocabulary
    for key, count in expected.items():
        assert n_params(wan[key]) == pytest.approx(count, rel=0.01), key
    cfg = wan["transformer"].config
    assert cfg.text_dim == wan["t5"].config.d_model == 4096
    assert (cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim, cfg.ffn_dim) == (30, 1536, 8960)


def test_sd3_medium_builds_and_runs_on_meta():
    rng = torch.get_rng_state()
    model = build_model("sd3-medium-random", device="meta", dtype=torch.bfloat16)
    assert torch.equal(rng, torch.get_rng_state())  # seeded in a forked RNG
    assert model.name == "sd3-medium-random" and model.dtype == torch.bfloat16 and model.device.type == "meta"
    lim = model.limits
    assert (lim.default_width, lim.default_height, lim.max_width, lim.default_steps) == (1024, 1024, 1536, 28)
    assert lim.default_guidance_scale == 7.0 and model.scheduler_config["shift"] == 3.0
    embeds, pooled = model.text.encode("a lighthouse at dusk")
    assert embeds.shape == (1, 77 + 256, 4096) and pooled.shape == (1, 2048)
    latents = torch.empty(1, 16, 128, 128, device="meta", dtype=torch.bfloat16)
    out = model.transformer(hidden_states=latents, encoder_hidden_states=embeds, pooled_projections=pooled,
                            timestep=torch.zeros(1, device="meta")).sample
    assert out.shape == latents.shape


def test_wan_1_3b_builds_and_runs_on_meta():
    rng = torch.get_rng_state()
    model = build_model("wan-1.3b-random", device="meta", dtype=torch.bfloat16)
    assert torch.equal(rng, torch.get_rng_state())
    assert model.name == "wan-1.3b-random" and model.dtype == torch.bfloat16
    assert model.vae.dtype == torch.float32  # the video VAE stays in float32
    assert model.transformer.scale_shift_table.dtype == torch.float32  # _keep_in_fp32_modules
    assert model.text.tokenizer.max_length == 512
    lim = model.limits
    assert (lim.default_width, lim.default_height, lim.default_frames, lim.max_frames) == (832, 480, 81, 81)
    assert (model.scale_spatial, model.scale_temporal) == (8, 4)
    assert model.scheduler_template.config.flow_shift == 3.0
    # 81 frames at 480p: 21 x 60 x 104 latents (UMT5's mask check cannot run on meta)
    latents = torch.empty(1, 16, 21, 60, 104, device="meta", dtype=torch.bfloat16)
    embeds = torch.empty(1, 512, 4096, device="meta", dtype=torch.bfloat16)
    out = model.transformer(hidden_states=latents, encoder_hidden_states=embeds,
                            timestep=torch.zeros(1, device="meta")).sample
    assert out.shape == latents.shape


def test_seeded_construction_is_reproducible_and_leaves_the_rng():
    rng = torch.get_rng_state()
    weights = []
    for _ in range(2):
        with _seeded_on("cpu"):
            layer = torch.nn.Linear(8, 8)
        assert layer.weight.device.type == "cpu"
        weights.append(layer.weight)
    assert torch.equal(*weights)
    assert torch.equal(rng, torch.get_rng_state())
