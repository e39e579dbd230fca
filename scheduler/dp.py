"""Multiple-choice knapsack over devices: the joint search of GenServe.

Each item (a video, or the image pool) picks exactly one option (a device
count and a value); the DP maximises the total value with at most
``capacity`` devices in O(items × options × capacity).
"""
from __future__ import annotations

from typing import Sequence

NEG = float("-inf")


def solve_mckp(items: Sequence[Sequence[tuple[int, float]]], capacity: int) -> list[int]:
    """Index of the chosen option of every item.

    ``items[i]`` lists ``(weight, value)`` options; every item must have an
    option of weight 0 (doing nothing), so a solution always exists. Ties go
    to the earlier option, and to less capacity used.
    """
    # best[c]: best total with at most c devices. It stays non-decreasing in c
    # because every item has a weight-0 option, so no carry step is needed.
    best = [0.0] * (capacity + 1)
    choices: list[list[int]] = []
    for options in items:
        new = [NEG] * (capacity + 1)
        arg = [0] * (capacity + 1)
        for j, (w, v) in enumerate(options):
            for c in range(w, capacity + 1):
                val = best[c - w] + v
                if val > new[c] + 1e-12:
                    new[c] = val
                    arg[c] = j
        best = new
        choices.append(arg)
    picked = [0] * len(items)
    c = capacity
    for i in range(len(items) - 1, -1, -1):
        picked[i] = choices[i][c]
        c -= items[i][picked[i]][0]
    return picked
