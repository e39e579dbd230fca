"""Text-to-image on Stable Diffusion 3: MMDiT transformer, KL VAE, flow matching.

The adapter holds only weights and the noise scheduler's *config*. Each
request's sigma schedule is computed once in ``prepare`` (a fresh
``FlowMatchEulerDiscreteScheduler`` per request, so shift, dynamic shifting
and the rest of the config apply as in the pipeline) and kept in its
``RequestState``; the Euler update ``x + (sigma_next - sigma) * v`` is done
here, never through a shared scheduler's ``_step_index``.
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from genserve.models.base import IMAGE, GenParams, ModelLimits, RequestState, TextCond
from genserve.models.batching import assemble, group_states, guide
from genserve.models.checkpoint import read_limits, write_limits
from genserve.models.latents import initial_noise, to_uint8
from genserve.models.text import SD3PipelineTextEncoder


def resolution_shift(image_seq_len: int, config) -> float:
    """``mu`` for dynamic shifting: linear in the number of image tokens
    between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift);
    the defaults are the SD3 pipeline's."""
    lo_len, hi_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    lo, hi = config.get("base_shift", 0.5), config.get("max_shift", 1.16)
    slope = (hi - lo) / (hi_len - lo_len)
    return lo + slope * (image_seq_len - lo_len)


class SD3Adapter:
    """SD3 family adapter. ``text`` is any prompt encoder of ``text.py``."""

    task = IMAGE

    def __init__(self, name: str, transformer, vae, scheduler_config: dict, text, limits: ModelLimits):
        if scheduler_config.get("stochastic_sampling"):
            raise ValueError("stochastic flow-matching sampling is not supported")
        self.name, self.limits = name, limits
        self.transformer, self.vae, self.text = transformer.eval(), vae.eval(), text
        self.scheduler_config = dict(scheduler_config)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def set_attention(self, backend: str) -> None:
        """``xformers``: xformers' kernels in the joint attention (SD3's
        processors call PyTorch's SDPA directly, so diffusers' backend switch
        does not reach them); ``sdpa`` is the default."""
        if backend == "xformers":
            self.transformer.enable_xformers_memory_efficient_attention()

    # ---- per request ------------------------------------------------------
    def encode_prompt(self, params: GenParams) -> TextCond:
        embeds, pooled = self.text.encode(params.prompt)
        if params.guidance_scale <= 1.0:
            return TextCond(embeds, pooled)
        neg_embeds, neg_pooled = self.text.encode(params.negative_prompt or "")
        return TextCond(embeds, pooled, neg_embeds, neg_pooled)

    def schedule(self, params: GenParams) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps (N,), sigmas (N+1,)) of one request, as the pipeline's."""
        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        kwargs = {}
        if sched.config.get("use_dynamic_shifting"):
            patch = self.transformer.config.patch_size
            seq_len = (params.height // self.vae_scale // patch) * (params.width // self.vae_scale // patch)
            kwargs["mu"] = resolution_shift(seq_len, sched.config)
        sched.set_timesteps(params.num_steps, device=self.device, **kwargs)
        return sched.timesteps, sched.sigmas

    def prepare(self, params: GenParams, cond: TextCond) -> RequestState:
        multiple = self.vae_scale * self.transformer.config.patch_size
        if params.width % multiple or params.height % multiple:
            raise ValueError(f"width and height must be multiples of {multiple}")
        if params.num_steps < 1:
            raise ValueError("num_steps must be at least 1")
        shape = (1, self.transformer.config.in_channels,
                 params.height // self.vae_scale, params.width // self.vae_scale)
        # the pipeline draws latents in the prompt embeddings' dtype
        latents = initial_noise(shape, params.seed, self.device, cond.embeds.dtype)
        timesteps, sigmas = self.schedule(params)
        return RequestState(params, cond, latents, timesteps, sigmas)

    # ---- one step for many requests ----------------------------------------
    def forward(self, latents, timesteps, embeds, pooled) -> torch.Tensor:
        """One transformer pass over rows; the velocity prediction."""
        return self.transformer(hidden_states=latents, timestep=timesteps, encoder_hidden_states=embeds,
                                pooled_projections=pooled, return_dict=False)[0]

    @torch.no_grad()
    def predict_noise(self, states: list[RequestState]) -> list[torch.Tensor]:
        """Guided velocity of every state, one forward pass per shape group."""
        preds: list[torch.Tensor | None] = [None] * len(states)
        for idx in group_states(states):
            group = [states[i] for i in idx]
            batch = assemble(group, self.dtype)
            noise = self.forward(batch.latents, batch.timesteps, batch.embeds, batch.pooled)
            for i, pred in zip(idx, guide(noise, batch, group)):
                preds[i] = pred
        return preds

    def denoise_step(self, states: list[RequestState]) -> None:
        """Advance every state by one flow-matching Euler step. All forward
        passes run before any state changes: on an error none has moved."""
        for st, pred in zip(states, self.predict_noise(states)):
            sigma, sigma_next = st.sigmas[st.step_index], st.sigmas[st.step_index + 1]
            # as the scheduler: upcast the sample, cast back to the model's dtype
            st.latents = (st.latents.float() + (sigma_next - sigma) * pred).to(pred.dtype)
            st.step_index += 1

    @torch.no_grad()
    def decode(self, state: RequestState) -> np.ndarray:
        cfg = self.vae.config
        latents = state.latents / cfg.scaling_factor + cfg.shift_factor
        pixels = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return to_uint8(pixels)


def default_sd3_limits(transformer, vae) -> ModelLimits:
    """Limits of a loaded SD3 checkpoint, from its configs: the native size
    by default, the position-embedding grid as the maximum."""
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    patch = transformer.config.patch_size
    native = transformer.config.sample_size * vae_scale
    max_side = (transformer.config.pos_embed_max_size or transformer.config.sample_size) * patch * vae_scale
    return ModelLimits(default_width=native, default_height=native, max_width=max_side, max_height=max_side,
                       default_steps=28, max_steps=100, size_multiple=vae_scale * patch,
                       default_guidance_scale=7.0)


def load_sd3(path: str, name: str = "sd3", device="cpu", dtype=torch.float32,
             limits: ModelLimits | None = None, max_sequence_length: int | None = None) -> SD3Adapter:
    """Load a diffusers SD3 checkpoint directory (no network access).

    Text goes through the pipeline's own three encoders and ``encode_prompt``;
    the T5 length is ``max_sequence_length`` or min(256, tokenizer_3's maximum).
    A checkpoint saved without T5 (``text_encoder_3: [null, null]``)
    conditions on the two CLIP encoders alone, T5's part of the prompt
    embeddings zeros, as the pipeline does.
    Limits: ``limits``, else the directory's saved limits, else from configs.
    """
    from diffusers import StableDiffusion3Pipeline

    with warnings.catch_warnings():  # torch_dtype: deprecated in new diffusers, all that old ones know
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True, torch_dtype=dtype,
                                                        **_dropped(path, ("text_encoder_3", "tokenizer_3")))
        pipe = pipe.to(device)
    if max_sequence_length is None:
        tok3 = pipe.tokenizer_3
        max_sequence_length = min(256, tok3.model_max_length) if tok3 is not None else 256
    text = SD3PipelineTextEncoder(pipe, max_sequence_length)
    limits = limits or read_limits(path) or default_sd3_limits(pipe.transformer, pipe.vae)
    return SD3Adapter(name, pipe.transformer, pipe.vae, pipe.scheduler.config, text, limits)


def _dropped(path: str, names: tuple[str, ...]) -> dict:
    """Those of ``names`` that the checkpoint's model_index.json leaves out
    (``[null, null]``: diffusers' layout for a pipeline saved without them),
    as ``from_pretrained`` keywords: diffusers will not load such a pipeline
    unless they are passed as None."""
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    return {name: None for name in names if not any(index.get(name) or ())}


def save_sd3(adapter: SD3Adapter, path: str) -> None:
    """Write a byte-text SD3 adapter (a tiny preset) as a diffusers
    ``StableDiffusion3Pipeline`` directory, ``ByT5Tokenizer`` in all three
    tokenizer slots, so ``load_sd3`` and diffusers itself can load it."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import ByT5Tokenizer

    text = adapter.text
    clip_tok = ByT5Tokenizer(model_max_length=text.clip_tokenizer.max_length)
    t5_tok = ByT5Tokenizer(model_max_length=text.t5_tokenizer.max_length)
    pipe = StableDiffusion3Pipeline(
        transformer=adapter.transformer, vae=adapter.vae,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(adapter.scheduler_config),
        text_encoder=text.clip_l, tokenizer=clip_tok, text_encoder_2=text.clip_g, tokenizer_2=clip_tok,
        text_encoder_3=text.t5, tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(path)
    write_limits(path, adapter.limits)
