"""The built-in presets' limits, without torch: the server checks its
operator caps against them before any worker starts (see
``genserve.config.ServerConfig.validate``)."""
from __future__ import annotations

from genserve.models.base import ModelLimits

SD3_TINY_LIMITS = ModelLimits(
    default_width=64, default_height=64, max_width=256, max_height=256,
    default_steps=10, max_steps=50, size_multiple=16, default_guidance_scale=5.0,
)
WAN_TINY_LIMITS = ModelLimits(
    default_width=64, default_height=64, max_width=256, max_height=256,
    default_steps=20, max_steps=50, default_frames=9, max_frames=33,
    size_multiple=16, frame_multiple=4, default_guidance_scale=5.0,
)
# SD3 medium at its pipeline's defaults (1024 px, 28 steps, CFG 7); 1536 px
# is 96 latent patches a side, well inside pos_embed_max_size=192.
SD3_MEDIUM_LIMITS = ModelLimits(
    default_width=1024, default_height=1024, max_width=1536, max_height=1536,
    default_steps=28, max_steps=100, size_multiple=16, default_guidance_scale=7.0,
)
# Wan 2.1 T2V 1.3B: 480p (832x480) and 81 frames as its model card runs it;
# 720p allowed for profiling, 81 frames at most (the trained length).
WAN_1_3B_LIMITS = ModelLimits(
    default_width=832, default_height=480, max_width=1280, max_height=720,
    default_steps=50, max_steps=100, default_frames=81, max_frames=81,
    size_multiple=16, frame_multiple=4, default_guidance_scale=5.0,
)

PRESET_LIMITS: dict[str, ModelLimits] = {
    "sd3-tiny": SD3_TINY_LIMITS, "wan-tiny": WAN_TINY_LIMITS,
    "sd3-medium-random": SD3_MEDIUM_LIMITS, "wan-1.3b-random": WAN_1_3B_LIMITS,
}
