"""Text-to-video on Wan 2.1: 3D DiT transformer, causal video VAE.

The noise scheduler is whatever the checkpoint names (Wan 2.1 ships
``UniPCMultistepScheduler`` with flow sigmas; the tiny preset uses the same).
UniPC is multistep: it keeps previous model outputs. So every request gets its
own scheduler object, a deep copy of the adapter's never-stepped template,
kept in ``RequestState.extra["scheduler"]`` — per-request state by design; the
shared template is never stepped.

The transformer call is the one ``forward`` method. Sequence parallelism
plugs in per call: ``denoise_step(states, sp=group)`` with an ``SPGroup`` of
size > 1 runs ``sp.wan_forward_sp`` (Ulysses attention over the group); every
member of the group makes the same call on its own full copy of the states and
ends bit-identical. ``sp`` None or of size 1 is the plain diffusers forward.
"""
from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import torch

from genserve.models.base import VIDEO, GenParams, ModelLimits, RequestState, TextCond
from genserve.models.batching import assemble, group_states, guide
from genserve.models.checkpoint import read_limits, write_limits
from genserve.models.latents import initial_noise, to_uint8
from genserve.models.sp import SPGroup, wan_forward_sp
from genserve.models.text import WanPipelineTextEncoder
from genserve.models.weights import load_model_dir


class WanAdapter:
    """Wan family adapter. ``text`` is any prompt encoder of ``text.py``."""

    task = VIDEO

    def __init__(self, name: str, transformer, vae, scheduler, text, limits: ModelLimits):
        self.name, self.limits = name, limits
        self.transformer, self.vae, self.text = transformer.eval(), vae.eval(), text
        self.scheduler_template = copy.deepcopy(scheduler)  # never stepped
        self.scale_spatial = vae.config.scale_factor_spatial
        self.scale_temporal = vae.config.scale_factor_temporal

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def set_attention(self, backend: str) -> None:
        """The kernel of single-device steps (diffusers' attention dispatch);
        SP steps take theirs from their ``SPGroup``."""
        if backend == "xformers":
            self.transformer.set_attention_backend("xformers")

    # ---- per request ------------------------------------------------------
    def encode_prompt(self, params: GenParams) -> TextCond:
        embeds, _ = self.text.encode(params.prompt)
        if params.guidance_scale <= 1.0:
            return TextCond(embeds)
        neg_embeds, _ = self.text.encode(params.negative_prompt or "")
        return TextCond(embeds, neg_embeds=neg_embeds)

    def latent_shape(self, params: GenParams) -> tuple[int, ...]:
        """(1, C, latent frames, latent H, latent W) of a request."""
        _, ph, pw = self.transformer.config.patch_size
        if (params.num_frames - 1) % self.scale_temporal:
            raise ValueError(f"num_frames must be {self.scale_temporal}k+1, not {params.num_frames}")
        if params.height % (self.scale_spatial * ph) or params.width % (self.scale_spatial * pw):
            raise ValueError(f"width and height must be multiples of {self.scale_spatial * pw}")
        return (1, self.transformer.config.in_channels, (params.num_frames - 1) // self.scale_temporal + 1,
                params.height // self.scale_spatial, params.width // self.scale_spatial)

    def prepare(self, params: GenParams, cond: TextCond) -> RequestState:
        if params.num_steps < 1:
            raise ValueError("num_steps must be at least 1")
        # WanPipeline keeps its latents in float32 whatever the model dtype
        latents = initial_noise(self.latent_shape(params), params.seed, self.device, torch.float32)
        sched = copy.deepcopy(self.scheduler_template)
        sched.set_timesteps(params.num_steps, device=self.device)
        sched.set_begin_index(0)
        return RequestState(params, cond, latents, sched.timesteps, sched.sigmas, extra={"scheduler": sched})

    # ---- one step for many requests ----------------------------------------
    def supports_sp(self, size: int) -> bool:
        """Whether a step can run on an SP group of ``size`` (heads must
        split evenly; any sequence length works, it is padded)."""
        return size >= 1 and self.transformer.config.num_attention_heads % size == 0

    def forward(self, latents, timesteps, embeds, attention_kwargs: dict | None = None,
                sp: SPGroup | None = None) -> torch.Tensor:
        """One transformer pass over rows; the flow prediction. With ``sp`` of
        size > 1 it is collective over ``sp.group`` (see ``models/sp.py``)."""
        if sp is not None and sp.parallel:
            if attention_kwargs:
                raise ValueError("attention_kwargs are not supported under sequence parallelism")
            return wan_forward_sp(self.transformer, latents, timesteps, embeds, sp)
        return self.transformer(hidden_states=latents, timestep=timesteps, encoder_hidden_states=embeds,
                                attention_kwargs=attention_kwargs, return_dict=False)[0]

    @torch.no_grad()
    def predict_noise(self, states: list[RequestState], attention_kwargs: dict | None = None,
                      sp: SPGroup | None = None) -> list[torch.Tensor]:
        """Guided prediction of every state, one forward pass per shape group.
        With ``sp`` every group member must pass equal ``states``, same order."""
        preds: list[torch.Tensor | None] = [None] * len(states)
        for idx in group_states(states):
            group = [states[i] for i in idx]
            batch = assemble(group, self.dtype)
            noise = self.forward(batch.latents, batch.timesteps, batch.embeds, attention_kwargs, sp)
            for i, pred in zip(idx, guide(noise, batch, group)):
                preds[i] = pred
        return preds

    @torch.no_grad()
    def denoise_step(self, states: list[RequestState], attention_kwargs: dict | None = None,
                     sp: SPGroup | None = None) -> None:
        """Advance every state by one step of its own noise scheduler. All
        forward passes run before any state changes.

        ``sp`` (size > 1): a collective step. Every member of ``sp.group``
        calls it at the same time with its own copy of the same states (equal
        latents, step and noise-scheduler history, same order); each computes
        1/size of the tokens, all receive the whole prediction, and all copies
        stay bit-identical, so any member can later go on alone.
        """
        for st, pred in zip(states, self.predict_noise(states, attention_kwargs, sp)):
            sched = st.extra["scheduler"]
            if sched.step_index not in (None, st.step_index):
                raise RuntimeError("request state and its noise scheduler disagree on the step")
            t = st.timesteps[st.step_index]
            st.latents = sched.step(pred, t, st.latents, return_dict=False)[0]
            st.step_index += 1

    @torch.no_grad()
    def decode(self, state: RequestState) -> np.ndarray:
        cfg = self.vae.config
        latents = state.latents.to(self.vae.dtype)
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(latents)
        video = self.vae.decode(latents / inv_std + mean, return_dict=False)[0]  # (1, 3, F, H, W)
        return to_uint8(video[0].permute(1, 0, 2, 3))


WAN21_LIMITS = ModelLimits(default_width=832, default_height=480, max_width=1280, max_height=1280,
                           default_steps=50, max_steps=100, default_frames=81, max_frames=81,
                           size_multiple=16, frame_multiple=4, default_guidance_scale=5.0)


def load_wan(path: str, name: str = "wan", device="cpu", dtype=torch.float32,
             limits: ModelLimits | None = None, max_sequence_length: int | None = None) -> WanAdapter:
    """Load a diffusers Wan 2.1 text-to-video checkpoint directory (no network).

    The VAE runs in float32 (as Wan's model card recommends). Wan 2.2's
    two-transformer and expanded-timestep variants are not supported.
    Limits: ``limits``, else the directory's saved limits, else Wan 2.1 480p.
    """
    from diffusers import WanPipeline

    from diffusers.utils import is_accelerate_available

    extra = {}
    if not is_accelerate_available():
        from diffusers import WanTransformer3DModel

        if os.path.isdir(os.path.join(path, "transformer_2")):
            raise NotImplementedError("Wan 2.2 two-stage checkpoints are not supported")
        folder = os.path.join(path, "transformer")
        extra["transformer"] = load_model_dir(WanTransformer3DModel, folder, device, dtype)
    with warnings.catch_warnings():  # torch_dtype: deprecated in new diffusers, all that old ones know
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = WanPipeline.from_pretrained(path, local_files_only=True, torch_dtype=dtype, **extra).to(device)
    if pipe.transformer_2 is not None or pipe.config.expand_timesteps:
        raise NotImplementedError("Wan 2.2 two-stage / expand_timesteps checkpoints are not supported")
    if pipe.vae.dtype != torch.float32:
        torch.nn.Module.to(pipe.vae, dtype=torch.float32)  # diffusers' .to() warns on any dtype
    if max_sequence_length is None:
        max_sequence_length = min(512, pipe.tokenizer.model_max_length)
    text = WanPipelineTextEncoder(pipe, max_sequence_length)
    limits = limits or read_limits(path) or WAN21_LIMITS
    return WanAdapter(name, pipe.transformer, pipe.vae, pipe.scheduler, text, limits)


def save_wan(adapter: WanAdapter, path: str) -> None:
    """Write a byte-text Wan adapter (a tiny preset) as a diffusers
    ``WanPipeline`` directory with ``ByT5Tokenizer`` as its tokenizer."""
    from diffusers import WanPipeline
    from transformers import ByT5Tokenizer

    pipe = WanPipeline(
        tokenizer=ByT5Tokenizer(model_max_length=adapter.text.tokenizer.max_length),
        text_encoder=adapter.text.t5, vae=adapter.vae, transformer=adapter.transformer,
        scheduler=copy.deepcopy(adapter.scheduler_template),
    )
    pipe.save_pretrained(path)
    write_limits(path, adapter.limits)
