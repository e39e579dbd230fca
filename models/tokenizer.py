"""A file-free byte-level tokenizer (ByT5 conventions).

Text conditioning of the tiny presets must be real (different prompts give
different embeddings) yet need no vocabulary files, so tokens are the prompt's
UTF-8 bytes shifted by 3: id 0 is padding, 1 end-of-sequence, 2 unknown (never
produced), byte ``b`` is ``b + 3``. The ids equal those of transformers'
``ByT5Tokenizer`` with ``padding="max_length", truncation=True``, which is what
a saved tiny checkpoint names as its tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET


@dataclass(frozen=True, slots=True)
class TokenBatch:
    """Token ids and mask, both int64 of shape (batch, max_length)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass(frozen=True, slots=True)
class ByteTokenizer:
    """UTF-8 bytes + 3, an EOS, zero padding to exactly ``max_length`` tokens.

    Longer texts are truncated to ``max_length - 1`` bytes before the EOS (a
    multi-byte character may be cut; the model sees bytes, not characters).
    """

    max_length: int = 64

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError("max_length must be at least 2 (one byte and the EOS)")

    def ids(self, text: str) -> list[int]:
        """Unpadded ids of one text, EOS included."""
        body = text.encode("utf-8")[: self.max_length - 1]
        return [b + BYTE_OFFSET for b in body] + [EOS_ID]

    def __call__(self, texts: list[str] | str) -> TokenBatch:
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), self.max_length), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(texts), self.max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            toks = self.ids(text)
            ids[row, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[row, : len(toks)] = 1
        return TokenBatch(ids, mask)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Inverse of ``ids`` (stops at the first EOS or padding)."""
        out = bytearray()
        for tok in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if tok in (PAD_ID, EOS_ID):
                break
            if tok >= BYTE_OFFSET:
                out.append(tok - BYTE_OFFSET)
        return out.decode("utf-8", errors="replace")
