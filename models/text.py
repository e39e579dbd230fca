"""Prompt encoders: text -> embeddings, one prompt at a time.

Two kinds per family. The *byte* encoders are the tiny presets' text stacks:
the byte tokenizer feeds small transformers text encoders, combined exactly
as the family's diffusers pipeline combines its own (so a tiny preset saved
as a diffusers directory, with ``ByT5Tokenizer`` in the tokenizer slots,
encodes the same through the pipeline). The *pipeline* encoders wrap a loaded
checkpoint's pipeline and call its own ``encode_prompt``.

Every encoder has ``encode(text) -> (embeds (1, L, D), pooled (1, P) or None)``.
"""
from __future__ import annotations

import html
import re

import torch

from genserve.models.tokenizer import ByteTokenizer


class SD3ByteTextEncoder:
    """SD3's three-encoder text stack on byte tokens.

    Two CLIP text encoders with projection (the CLIP-L / CLIP-G slots) and a
    T5 encoder. ``embeds`` = [CLIP-L penultimate ‖ CLIP-G penultimate, zero
    padded to the T5 width] followed along the sequence by the T5 output;
    ``pooled`` = [CLIP-L projection ‖ CLIP-G projection]. No attention masks
    are passed, as in the SD3 pipeline.
    """

    def __init__(self, clip_l, clip_g, t5, clip_max_length: int, t5_max_length: int):
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.clip_tokenizer = ByteTokenizer(clip_max_length)
        self.t5_tokenizer = ByteTokenizer(t5_max_length)

    @property
    def device(self) -> torch.device:
        return self.t5.device

    @torch.no_grad()
    def encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        clip_ids = self.clip_tokenizer([text]).input_ids.to(self.device)
        hidden, pooled = [], []
        for clip in (self.clip_l, self.clip_g):
            out = clip(clip_ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(self.clip_l.dtype))
            pooled.append(out.text_embeds)
        t5_ids = self.t5_tokenizer([text]).input_ids.to(self.device)
        t5_out = self.t5(t5_ids).last_hidden_state.to(self.t5.dtype)
        clip_embeds = torch.cat(hidden, dim=-1)
        clip_embeds = torch.nn.functional.pad(clip_embeds, (0, t5_out.shape[-1] - clip_embeds.shape[-1]))
        return torch.cat([clip_embeds, t5_out], dim=-2), torch.cat(pooled, dim=-1)


class SD3PipelineTextEncoder:
    """A loaded ``StableDiffusion3Pipeline``'s own ``encode_prompt``."""

    def __init__(self, pipe, max_sequence_length: int):
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length

    @torch.no_grad()
    def encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=text, prompt_2=None, prompt_3=None, device=self.pipe.text_encoder.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning without ftfy: unescape HTML twice, collapse
    whitespace, strip."""
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class WanByteTextEncoder:
    """Wan's text stack on byte tokens: a (U)MT5 encoder run with the padding
    mask; positions past the prompt's tokens are zeroed, as WanPipeline does."""

    def __init__(self, t5, max_length: int):
        self.t5 = t5
        self.tokenizer = ByteTokenizer(max_length)

    @torch.no_grad()
    def encode(self, text: str) -> tuple[torch.Tensor, None]:
        toks = self.tokenizer([clean_prompt(text)])
        ids, mask = toks.input_ids.to(self.t5.device), toks.attention_mask.to(self.t5.device)
        out = self.t5(ids, mask).last_hidden_state.to(self.t5.dtype)
        return out.masked_fill(mask[..., None] == 0, 0.0), None


class WanPipelineTextEncoder:
    """A loaded ``WanPipeline``'s own ``encode_prompt``."""

    def __init__(self, pipe, max_sequence_length: int):
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length

    @torch.no_grad()
    def encode(self, text: str) -> tuple[torch.Tensor, None]:
        embeds, _ = self.pipe.encode_prompt(
            prompt=text, negative_prompt=None, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length, device=self.pipe.text_encoder.device,
        )
        return embeds, None
