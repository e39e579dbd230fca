"""Aligned power-of-two device blocks (buddy blocks), as bit masks.

Device ``d`` is bit ``d``. A block of size ``s`` (a power of two) starts at a
multiple of ``s`` and lies inside ``[0, num_devices)``, so blocks of a node
with a non-power-of-two device count never overlap and never run off the end.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Sequence


def mask_of(device_ids: Iterable[int]) -> int:
    m = 0
    for d in device_ids:
        m |= 1 << d
    return m


def ids_of(mask: int) -> tuple[int, ...]:
    out = []
    d = 0
    while mask:
        if mask & 1:
            out.append(d)
        mask >>= 1
        d += 1
    return tuple(out)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def is_aligned_block(device_ids: Sequence[int], num_devices: int) -> bool:
    """True when ``device_ids`` is a whole aligned power-of-two block."""
    n = len(device_ids)
    if not is_power_of_two(n) or len(set(device_ids)) != n:
        return False
    lo = min(device_ids)
    return lo % n == 0 and max(device_ids) == lo + n - 1 and lo + n <= num_devices


def block_mask(start: int, size: int) -> int:
    return ((1 << size) - 1) << start


@lru_cache(maxsize=None)
def degrees_upto(limit: int) -> tuple[int, ...]:
    """Powers of two not above ``limit`` (at least (1,))."""
    out = [1]
    while out[-1] * 2 <= limit:
        out.append(out[-1] * 2)
    return tuple(out)


_LAYOUTS: dict[tuple[int, int], tuple] = {}


def _layout(num_devices: int, size: int) -> tuple:
    """(block mask, enclosing buddy masks smallest first) of every aligned
    block of ``size``; memoised per device count."""
    key = (num_devices, size)
    out = _LAYOUTS.get(key)
    if out is None:
        levels = degrees_upto(1 << max(num_devices - 1, 0).bit_length())
        out = tuple(
            (block_mask(start, size),
             tuple(block_mask(start - start % lv, min(lv, num_devices - start + start % lv))
                   for lv in levels if lv > size))
            for start in range(0, num_devices - size + 1, size))
        _LAYOUTS[key] = out
    return out


class BlockPool:
    """Free devices during the making of one plan; hands out aligned blocks.

    ``take`` picks, among free aligned blocks of the size asked, the one whose
    enclosing buddy blocks are the least free (best fit), so large blocks stay
    whole for later and larger requests.
    """

    __slots__ = ("num_devices", "free")

    def __init__(self, num_devices: int, free_mask: int):
        self.num_devices = num_devices
        self.free = free_mask

    def count(self, within: int = -1) -> int:
        return (self.free & within).bit_count()

    def can_take(self, size: int, within: int = -1) -> bool:
        free = self.free & within
        return any(free & bm == bm for bm, _ in _layout(self.num_devices, size))

    def take(self, size: int, prefer: int = 0, within: int = -1) -> int:
        """Take a free aligned block of ``size`` inside ``within``; returns its
        mask (0 if none). Blocks overlapping ``prefer`` most win first."""
        best = _best_block(self.num_devices, size, self.free, self.free & within, prefer)
        self.free &= ~best
        return best

    def take_exact(self, mask: int) -> bool:
        if self.free & mask != mask:
            return False
        self.free &= ~mask
        return True

    def give(self, mask: int) -> None:
        self.free |= mask


@lru_cache(maxsize=1 << 16)
def _best_block(num_devices: int, size: int, free: int, usable: int, prefer: int) -> int:
    """``BlockPool.take``'s choice among the blocks in ``usable`` (0: none); a
    pure function of the masks, so memoised (plans ask the same few questions)."""
    if usable.bit_count() < size:
        return 0
    best, best_key = 0, None
    for bm, parents in _layout(num_devices, size):
        if usable & bm != bm:
            continue
        key = (-(bm & prefer).bit_count(), tuple((free & pm).bit_count() for pm in parents))
        if best_key is None or key < best_key:
            best, best_key = bm, key
    return best


def tile_blocks(num_devices: int, max_size: int, first: int = 0,
                end: int | None = None) -> tuple[int, ...]:
    """Cover devices ``[first, end)`` with the largest aligned blocks of at most
    ``max_size`` devices, left to right; returns their masks."""
    end = num_devices if end is None else end
    out = []
    d = first
    while d < end:
        size = 1
        while (size * 2 <= max_size and d % (size * 2) == 0 and d + size * 2 <= end):
            size *= 2
        out.append(block_mask(d, size))
        d += size
    return tuple(out)
