"""The simulator's fast view constructors make exactly what the frozen
dataclasses' own __init__ makes (they bypass it for speed)."""
import dataclasses
import math

import pytest

from genserve.scheduler import simulator
from genserve.scheduler.simulator import Outcome
from genserve.scheduler.types import DeviceView, RequestView
from genserve.scheduler.workload import Request

REQUEST_FIELDS = ("r1", "video", "wan", 832, 480, 81, 50, 7, 1.5, 9.25, 2, (4, 5), True, False)
OUTCOME_FIELDS = ("r1", "image", "flux", 1.0, 3.0, "done", 2.5, 1.25, 1, 4, 2.0)


def _same(fast, slow):
    assert type(fast) is type(slow)
    assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
    for f in dataclasses.fields(slow):
        assert getattr(fast, f.name) is getattr(slow, f.name)


def test_views_equal_those_of_init():
    _same(simulator._device_view(3, False, 2.5), DeviceView(3, False, 2.5))
    _same(simulator._request_view(*REQUEST_FIELDS), RequestView(*REQUEST_FIELDS))
    _same(simulator._outcome(*OUTCOME_FIELDS), Outcome(*OUTCOME_FIELDS))


def test_views_stay_frozen():
    v = simulator._request_view(*REQUEST_FIELDS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.steps_done = 8


def test_changed_view_keeps_the_rest():
    v = RequestView(*REQUEST_FIELDS)
    w = simulator._view(v, 9, 3, (0,), False, True)
    assert w == dataclasses.replace(v, steps_done=9, num_preemptions=3, device_ids=(0,),
                                    running=False, paused=True)


def test_arrival_view_is_the_defaults():
    r = Request("r1", 1.5, "image", "flux", 1024, 1024, 1, 28, 7750.0)
    assert simulator._arrived(r) == RequestView("r1", "image", "flux", 1024, 1024, 1, 28, 0,
                                                1.5, r.deadline_s)


def test_a_class_with_other_slots_is_refused():
    """A field added to a view class must fail loudly, not make half a view."""

    @dataclasses.dataclass(frozen=True, slots=True)
    class Wider:
        device_id: int
        idle: bool
        busy_until_s: float
        extra: int = 0

    v = simulator._DeviceViewParts()
    v.device_id, v.idle, v.busy_until_s = 1, True, math.inf
    with pytest.raises(TypeError):
        v.__class__ = Wider
