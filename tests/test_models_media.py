"""Byte tokenizer and media encoding: ids as ByT5's, every format round-trips
with the right size and frame count."""
from __future__ import annotations

import numpy as np
import pytest

from genserve.models.media import decode_media, encode_media
from genserve.models.tokenizer import EOS_ID, ByteTokenizer


@pytest.mark.parametrize("text", ["a cat", "", "héllo wörld 猫", "x" * 100])
def test_tokenizer_matches_byt5(text):
    from transformers import ByT5Tokenizer

    mine = ByteTokenizer(16)([text, "pad me"])
    theirs = ByT5Tokenizer(model_max_length=16)([text, "pad me"], padding="max_length", max_length=16,
                                                truncation=True, return_tensors="pt")
    assert mine.input_ids.tolist() == theirs.input_ids.tolist()
    assert mine.attention_mask.tolist() == theirs.attention_mask.tolist()


def test_tokenizer_shapes_and_decode():
    tok = ByteTokenizer(8)
    batch = tok(["ab", "abcdefghij"])
    assert batch.input_ids.shape == batch.attention_mask.shape == (2, 8)
    assert batch.input_ids[1, -1] == EOS_ID and batch.attention_mask[1].sum() == 8
    assert tok.decode(batch.input_ids[0]) == "ab"
    assert tok.decode(batch.input_ids[1]) == "abcdefg"
    with pytest.raises(ValueError):
        ByteTokenizer(1)


def frames(n: int, h: int, w: int) -> np.ndarray:
    """Smooth, distinct frames (lossy codecs stay close; no two frames equal)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = [np.stack([x / w * 200 + 10 * i, y / h * 200, (x + y) / (h + w) * 100 + 20 * i], -1) for i in range(n)]
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


CASES = [  # fmt, frames, height, width, tolerated mean abs error
    ("png", 1, 64, 48, 0.0), ("jpeg", 1, 64, 48, 3.0), ("webp", 1, 64, 48, 4.0), ("raw", 1, 64, 48, 0.0),
    ("mp4", 9, 64, 48, 4.0), ("gif", 9, 64, 48, 6.0), ("webp", 9, 64, 48, 4.0), ("raw", 9, 64, 48, 0.0),
]


@pytest.mark.parametrize("fmt,n,h,w,tol", CASES)
def test_round_trip(fmt, n, h, w, tol):
    src = frames(n, h, w)
    data, mime = encode_media(src, fmt, fps=8)
    out = decode_media(data, mime, shape=src.shape)
    assert out.shape == src.shape and out.dtype == np.uint8
    assert np.abs(out.astype(float) - src).mean() <= tol
    expected = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "gif": "image/gif",
                "mp4": "video/mp4", "raw": "application/octet-stream"}[fmt]
    assert mime == expected


def test_raw_is_the_array_bytes():
    src = frames(2, 16, 16)
    assert encode_media(src, "raw", 8)[0] == src.tobytes()


def test_mp4_pads_odd_sizes_to_even():
    out = decode_media(*encode_media(frames(5, 33, 31), "mp4", fps=4))
    assert out.shape == (5, 34, 32, 3)


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        encode_media(frames(2, 16, 16), "png", 8)
    with pytest.raises(ValueError):
        encode_media(frames(1, 16, 16), "bmp", 8)
    with pytest.raises(ValueError):
        encode_media(frames(1, 16, 16).astype(np.float32), "png", 8)
