"""Built-in models with seeded random weights: real architectures, no
downloads.

The *tiny* presets (``sd3-tiny``, ``wan-tiny``) are for CPU serving and tests.
Sizes follow the spirit of diffusers' test dummy components, but keep the
real downsampling (VAE x8, patch 2) so cost grows with resolution as in the
full models. Weights come from ``torch.manual_seed(0)`` inside a forked RNG,
built in a fixed order on CPU in float32, then moved: every worker process
builds identical weights and the caller's global RNG is left untouched.

The *real-size* presets (``sd3-medium-random``, ``wan-1.3b-random``) are for
GPU profiling: the published configs of SD3 medium and Wan 2.1 T2V 1.3B (text
encoders at full size too, on the byte vocabulary), so compute and memory are
the real models' while the outputs are noise. They are too large to build on
CPU and then move, so each module is created directly on the target device
under the same seed, in a fixed order, and cast before the next is built. The
weights are identical for every worker on the same kind of device (CPU and
GPU random streams differ). The ``*_modules`` generators hold the
construction alone, so ``with torch.device("meta"):`` sizes them for free.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from genserve.models.preset_limits import (SD3_MEDIUM_LIMITS, SD3_TINY_LIMITS,
                                           WAN_1_3B_LIMITS, WAN_TINY_LIMITS)
from genserve.models.tokenizer import VOCAB_SIZE
from genserve.models.weights import place

TEXT_LEN = 32  # byte tokens per text encoder (longer prompts are truncated)
WAN_TEXT_LEN = 64
# the real pipelines' token lengths: StableDiffusion3Pipeline (CLIP 77,
# T5 256 by default) and WanPipeline (UMT5 512)
CLIP_LEN, SD3_T5_LEN, WAN_UMT5_LEN = 77, 256, 512


def _clip(hidden: int, layers: int = 2, heads: int = 2, intermediate: int | None = None,
          projection: int = 32, max_length: int = TEXT_LEN, act: str = "gelu"):
    """A CLIP text encoder with projection on the byte vocabulary (EOS id 1
    pools, as the byte tokenizer ends every text with it). The defaults are
    the tiny presets'."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                         projection_dim=projection, num_hidden_layers=layers, num_attention_heads=heads,
                         max_position_embeddings=max_length, hidden_act=act,
                         pad_token_id=0, bos_token_id=0, eos_token_id=1)
    return CLIPTextModelWithProjection(cfg)


def _t5(d_model: int, umt5: bool = False, d_kv: int | None = None, d_ff: int | None = None,
        layers: int = 2, heads: int = 4, buckets: int = 8, max_distance: int = 32):
    """A gated-GELU T5 (or UMT5) encoder on the byte vocabulary, no dropout.
    The defaults are the tiny presets' (``d_kv`` d_model/4, ``d_ff`` 2x)."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kwargs = dict(vocab_size=VOCAB_SIZE, d_model=d_model, d_kv=d_kv or d_model // 4, d_ff=d_ff or 2 * d_model,
                  num_layers=layers, num_heads=heads, relative_attention_num_buckets=buckets,
                  relative_attention_max_distance=max_distance, dropout_rate=0.0, feed_forward_proj="gated-gelu")
    return UMT5EncoderModel(UMT5Config(**kwargs)) if umt5 else T5EncoderModel(T5Config(**kwargs))


def _t5_xxl(umt5: bool = False):
    """The T5 v1.1 XXL encoder (SD3's third encoder; UMT5-XXL, Wan's, has the
    same shape): 24 layers, 4096 wide, 64 heads of 64, FFN 10240, 32 relative
    position buckets up to distance 128."""
    return _t5(4096, umt5=umt5, d_kv=64, d_ff=10240, layers=24, heads=64, buckets=32, max_distance=128)


@contextlib.contextmanager
def _seeded_on(device):
    """Seed 0 in a forked RNG (CPU and the target accelerator), with new
    tensors created on ``device``."""
    device = torch.device(device)
    devices, device_type = [], None
    if device.type not in ("cpu", "meta"):
        device_type = device.type
        index = device.index
        if index is None:
            index = torch.get_device_module(device.type).current_device()
        devices = [index]
    with torch.random.fork_rng(devices=devices, device_type=device_type), device:
        torch.manual_seed(0)
        yield


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


def build_wan_tiny(device="cpu", dtype=torch.float32, name: str = "wan-tiny", heads: int = 8):
    """Wan 2.1 with a 2-block 3D DiT (8 heads of 16, 128 wide: the heads
    split over SP groups of up to 8; ``heads`` changes their number, e.g.
    for a model whose heads split over fewer), a small causal video VAE (x8 space,
    x4 time), a byte-level UMT5 encoder, and UniPC with flow sigmas, shift 3
    (Wan 2.1's own noise-scheduler config)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    from genserve.models.text import WanByteTextEncoder
    from genserve.models.wan import WanAdapter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=16, in_channels=16,
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


def sd3_medium_modules() -> Iterator:
    """SD3 medium's modules, built one at a time in this order: MMDiT,
    VAE, CLIP-L, CLIP-G, T5-XXL. Numbers from the published SD3 medium
    (diffusers) configs: a 24-block MMDiT, 24 heads of 64 (1536 wide), joint
    attention over the 4096-wide T5 width, pooled 2048 = 768 + 1280 (the two
    CLIP projections); the 16-channel KL VAE (x8) with SD3's shift/scale;
    CLIP ViT-L/14 (quick GELU) and OpenCLIP bigG/14 (GELU) text towers. The
    text encoders take the byte vocabulary (259 tokens), so their embedding
    tables are smaller than the real ones; the rest is full size."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    yield SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
    yield AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
    yield _clip(768, layers=12, heads=12, intermediate=3072, projection=768, max_length=CLIP_LEN, act="quick_gelu")
    yield _clip(1280, layers=32, heads=20, intermediate=5120, projection=1280, max_length=CLIP_LEN, act="gelu")
    yield _t5_xxl()


def build_sd3_medium_random(device="cpu", dtype=torch.float32, name: str = "sd3-medium-random"):
    """SD3 medium at full size with seeded random weights (about 7.5e9
    parameters with T5-XXL: some 15 GB in bfloat16), for GPU profiling. Text
    as the pipeline: CLIP 77 tokens, T5 256; Euler flow matching, shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from genserve.models.sd3 import SD3Adapter
    from genserve.models.text import SD3ByteTextEncoder

    with _seeded_on(device):
        transformer, vae, clip_l, clip_g, t5 = (place(m, device, dtype) for m in sd3_medium_modules())
    text = SD3ByteTextEncoder(clip_l, clip_g, t5, clip_max_length=CLIP_LEN, t5_max_length=SD3_T5_LEN)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return SD3Adapter(name, transformer, vae, sched.config, text, SD3_MEDIUM_LIMITS)


def wan_1_3b_modules() -> Iterator:
    """Wan 2.1 T2V 1.3B's modules, built one at a time in this order: DiT,
    VAE, UMT5-XXL. Numbers from the published Wan2.1-T2V-1.3B (diffusers)
    config: 30 blocks, 12 heads of 128 (1536 wide), FFN 8960, text width
    4096; the video VAE at diffusers' defaults, which are Wan 2.1's (base 96,
    z 16, x8 space, x4 time); the UMT5-XXL encoder on the byte vocabulary."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    yield WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    yield AutoencoderKLWan(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                           temperal_downsample=[False, True, True])
    yield _t5_xxl(umt5=True)


def build_wan_1_3b_random(device="cpu", dtype=torch.float32, name: str = "wan-1.3b-random"):
    """Wan 2.1 T2V 1.3B at full size with seeded random weights (about
    6.2e9 parameters with UMT5-XXL: some 13 GB in bfloat16 with the float32
    VAE), for GPU profiling; 480p, 81 frames,
    UMT5 512 tokens as WanPipeline, UniPC with flow sigmas as the tiny
    preset. The video VAE stays in float32 (as load_wan)."""
    from diffusers import UniPCMultistepScheduler

    from genserve.models.text import WanByteTextEncoder
    from genserve.models.wan import WanAdapter

    with _seeded_on(device):
        transformer, vae, t5 = (place(m, device, d) for m, d in zip(wan_1_3b_modules(),
                                                                     (dtype, torch.float32, dtype)))
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                    flow_shift=3.0, num_train_timesteps=1000)
    return WanAdapter(name, transformer, vae, sched, WanByteTextEncoder(t5, WAN_UMT5_LEN), WAN_1_3B_LIMITS)


PRESETS: dict[str, Callable] = {
    "sd3-tiny": build_sd3_tiny, "wan-tiny": build_wan_tiny,
    "sd3-medium-random": build_sd3_medium_random, "wan-1.3b-random": build_wan_1_3b_random,
}
