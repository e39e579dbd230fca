"""Tiny built-in models for CPU serving and tests: real architectures, small
configs, seeded random weights.

Sizes follow the spirit of diffusers' test dummy components, but keep the
real downsampling (VAE x8, patch 2) so cost grows with resolution as in the
full models. Weights come from ``torch.manual_seed(0)`` inside a forked RNG,
built in a fixed order on CPU in float32, then moved: every worker process
builds identical weights and the caller's global RNG is left untouched.
"""
from __future__ import annotations

from typing import Callable

import torch

from genserve.models.base import ModelLimits
from genserve.models.tokenizer import VOCAB_SIZE
from genserve.models.weights import place

SD3_TINY_LIMITS = ModelLimits(
    default_width=64, default_height=64, max_width=256, max_height=256,
    default_steps=10, max_steps=50, size_multiple=16, default_guidance_scale=5.0,
)
WAN_TINY_LIMITS = ModelLimits(
    default_width=64, default_height=64, max_width=256, max_height=256,
    default_steps=20, max_steps=50, default_frames=9, max_frames=33,
    size_multiple=16, frame_multiple=4, default_guidance_scale=5.0,
)
TEXT_LEN = 32  # byte tokens per text encoder (longer prompts are truncated)
WAN_TEXT_LEN = 64


def _clip(hidden: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
                         projection_dim=32, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=TEXT_LEN, hidden_act="gelu",
                         pad_token_id=0, bos_token_id=0, eos_token_id=1)
    return CLIPTextModelWithProjection(cfg)


def _t5(d_model: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kwargs = dict(vocab_size=VOCAB_SIZE, d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=2,
                  num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                  dropout_rate=0.0, feed_forward_proj="gated-gelu")
    return UMT5EncoderModel(UMT5Config(**kwargs)) if umt5 else T5EncoderModel(T5Config(**kwargs))


def build_sd3_tiny(device="cpu", dtype=torch.float32, name: str = "sd3-tiny"):
    """SD3 with a 2-block MMDiT (64 wide), a 4-level KL VAE (x8), and two
    CLIP + one T5 byte-level text encoders; Euler flow matching, shift 3."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from genserve.models.sd3 import SD3Adapter
    from genserve.models.text import SD3ByteTextEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=16, num_attention_heads=4, joint_attention_dim=48,
            caption_projection_dim=64, pooled_projection_dim=64, pos_embed_max_size=16)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(8, 16, 16, 16),
            layers_per_block=1, latent_channels=16, norm_num_groups=4, use_quant_conv=False,
            use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
        clip_l, clip_g, t5 = _clip(16), _clip(24), _t5(48)
    modules = [place(m, device, dtype) for m in (transformer, vae, clip_l, clip_g, t5)]
    text = SD3ByteTextEncoder(*modules[2:], clip_max_length=TEXT_LEN, t5_max_length=TEXT_LEN)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return SD3Adapter(name, modules[0], modules[1], sched.config, text, SD3_TINY_LIMITS)


def build_wan_tiny(device="cpu", dtype=torch.float32, name: str = "wan-tiny"):
    """Wan 2.1 with a 2-block 3D DiT (8 heads of 16, 128 wide: the heads
    split over SP groups of up to 8), a small causal video VAE (x8 space,
    x4 time), a byte-level UMT5 encoder, and UniPC with flow sigmas, shift 3
    (Wan 2.1's own noise-scheduler config)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    from genserve.models.text import WanByteTextEncoder
    from genserve.models.wan import WanAdapter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=16, in_channels=16,
            out_channels=16, text_dim=32, freq_dim=256, ffn_dim=256, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
        t5 = _t5(32, umt5=True)
    # as load_wan: the video VAE stays in float32
    transformer, t5 = place(transformer, device, dtype), place(t5, device, dtype)
    vae = place(vae, device, torch.float32)
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                    flow_shift=3.0, num_train_timesteps=1000)
    return WanAdapter(name, transformer, vae, sched, WanByteTextEncoder(t5, WAN_TEXT_LEN), WAN_TINY_LIMITS)


PRESETS: dict[str, Callable] = {"sd3-tiny": build_sd3_tiny, "wan-tiny": build_wan_tiny}
