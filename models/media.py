"""Encoding decoded frames into the bytes a client receives, and back (tests).

Frames are uint8 arrays of shape (frames, height, width, 3), RGB.

- Images (one frame): ``png`` (lossless), ``jpeg`` (quality 95), ``webp``
  (quality 90) via Pillow.
- Videos: ``mp4`` (H.264 via PyAV's libx264, yuv420p, CRF 18; odd widths or
  heights are padded to even by repeating the last row / column, since 4:2:0
  chroma needs even sizes; our models only make multiples of 16), ``gif``
  (Pillow, 256-colour palette, looping; Pillow merges consecutive identical
  frames into one longer frame), ``webp`` (animated, Pillow, looping).
- ``raw``: the array's bytes, row-major; the shape travels separately.
"""
from __future__ import annotations

import io

import numpy as np

MIME = {
    "png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp",
    "gif": "image/gif", "mp4": "video/mp4", "raw": "application/octet-stream",
}
IMAGE_ONLY = ("png", "jpeg")
MP4_CRF = "18"


def encode_media(frames: np.ndarray, fmt: str, fps: int) -> tuple[bytes, str]:
    """(bytes, mime type) of ``frames`` in format ``fmt``; ``fps`` is used by
    the video formats only."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 (frames, H, W, 3), got {frames.dtype} {frames.shape}")
    if fmt not in MIME:
        raise ValueError(f"unknown media format {fmt!r}; known: {sorted(MIME)}")
    if fmt == "raw":
        return np.ascontiguousarray(frames).tobytes(), MIME[fmt]
    if fmt in IMAGE_ONLY and len(frames) != 1:
        raise ValueError(f"{fmt} holds one image, got {len(frames)} frames")
    if fmt == "mp4":
        return _encode_mp4(frames, fps), MIME[fmt]
    return _encode_pillow(frames, fmt, fps), MIME[fmt]


def _encode_pillow(frames: np.ndarray, fmt: str, fps: int) -> bytes:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    if fmt == "png":
        images[0].save(buf, format="PNG")
    elif fmt == "jpeg":
        images[0].save(buf, format="JPEG", quality=95)
    elif fmt == "webp" and len(images) == 1:
        images[0].save(buf, format="WEBP", quality=90)
    else:  # animated gif / webp
        duration_ms = round(1000 / max(fps, 1))
        kwargs = {"quality": 90} if fmt == "webp" else {}
        images[0].save(buf, format=fmt.upper(), save_all=True, append_images=images[1:],
                       duration=duration_ms, loop=0, **kwargs)
    return buf.getvalue()


def _pad_even(frames: np.ndarray) -> np.ndarray:
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def _encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    import av

    frames = _pad_even(frames)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=max(fps, 1))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": MP4_CRF}
        for arr in frames:
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def decode_media(data: bytes, mime: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """uint8 (frames, H, W, 3) from ``encode_media`` output. ``shape`` is
    needed for raw bytes only."""
    if mime == MIME["raw"]:
        if shape is None:
            raise ValueError("raw media needs its shape")
        return np.frombuffer(data, dtype=np.uint8).reshape(shape)
    if mime == MIME["mp4"]:
        import av

        with av.open(io.BytesIO(data)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    from PIL import Image, ImageSequence

    with Image.open(io.BytesIO(data)) as img:
        return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(img)])
