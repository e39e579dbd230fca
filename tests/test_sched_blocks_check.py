"""Aligned blocks, the knapsack, and the plan checker's own rules."""
from genserve.scheduler import ClusterSpec, DeviceView, Dispatch, Rejection, RequestView, StepPlan
from genserve.scheduler.blocks import BlockPool, ids_of, is_aligned_block, mask_of, tile_blocks
from genserve.scheduler.check import check_plan
from genserve.scheduler.dp import solve_mckp


def test_aligned_blocks_never_cross_or_run_off_the_end():
    assert is_aligned_block((4, 5, 6, 7), 8) and is_aligned_block((2,), 3)
    assert not is_aligned_block((2, 3, 4, 5), 8)  # not aligned
    assert not is_aligned_block((0, 1, 2), 8)  # not a power of two
    assert not is_aligned_block((4, 5, 6, 7), 6)  # past the last device
    assert [ids_of(m) for m in tile_blocks(6, 4)] == [(0, 1, 2, 3), (4, 5)]
    assert [ids_of(m) for m in tile_blocks(8, 4, first=3)] == [(3,), (4, 5, 6, 7)]


def test_block_pool_best_fit_keeps_large_blocks_whole():
    pool = BlockPool(8, mask_of([0, 1, 2, 4, 5, 6, 7]))
    assert ids_of(pool.take(1)) == (2,)  # the fragment, not a whole 4-block
    assert ids_of(pool.take(4)) == (4, 5, 6, 7)
    assert pool.take(2) == mask_of([0, 1]) and pool.take(1) == 0
    pool = BlockPool(6, mask_of(range(6)))
    assert pool.take(8) == 0 and ids_of(pool.take(4)) == (0, 1, 2, 3)


def test_knapsack_finds_the_joint_optimum_a_greedy_pass_misses():
    # taking the most valuable option first (item 0 on all 4 devices: 2.5) leaves
    # no room for item 1; the joint optimum shrinks item 0 to make room (1 + 2)
    items = [[(0, 0.0), (1, 1.0), (4, 2.5)], [(0, 0.0), (3, 2.0)]]
    assert solve_mckp(items, 4) == [1, 1]
    assert solve_mckp(items, 3) == [0, 1]
    assert solve_mckp([[(0, -1.0), (2, 0.5)]], 1) == [0]  # too big: the weight-0 option


def _state():
    reqs = [RequestView("a", "image", "m", 64, 64, 1, 4, 0, 0.0, 9.0),
            RequestView("b", "image", "m", 64, 64, 1, 4, 2, 0.0, 9.0, 1, (1,), False),
            RequestView("c", "video", "v", 64, 64, 9, 4, 1, 0.0, 9.0, 0, (2, 3), True),
            RequestView("d", "image", "m", 32, 32, 1, 4, 0, 0.0, 9.0)]
    devs = [DeviceView(0, True, 1.0), DeviceView(1, True, 1.0), DeviceView(2, False, 2.0),
            DeviceView(3, False, 2.0)]
    return reqs, devs


def test_checker_accepts_a_valid_plan_and_names_each_violation():
    reqs, devs = _state()
    cluster = ClusterSpec(4, max_image_batch=2)
    ok = StepPlan((Dispatch(("a", "b"), (0, 1)),), ())
    assert check_plan(ok, reqs, devs, cluster) == []
    cases = {
        "not idle": StepPlan((Dispatch(("a",), (2,)),), ("b",)),
        "aligned": StepPlan((Dispatch(("a",), (1, 2)),), ("b",)),
        "two dispatches": StepPlan((Dispatch(("a",), (0,)), Dispatch(("a",), (1,))), ("b",)),
        "already running": StepPlan((Dispatch(("c",), (0, 1)),), ("b",)),
        "mixes": StepPlan((Dispatch(("a", "d"), (0,)),), ("b",)),
        "num_steps": StepPlan((Dispatch(("b",), (1,), 3),), ()),
        "rule gives": StepPlan((Dispatch(("a",), (0,)),), ()),  # b paused but not listed
        "has started": StepPlan((), ("b",), (Rejection("b", "x", 1.0),)),
    }
    for needle, plan in cases.items():
        errors = check_plan(plan, reqs, devs, cluster)
        assert any(needle in e for e in errors), (needle, errors)
    pinned = ClusterSpec(4, migratable=False)
    assert any("must resume" in e for e in check_plan(
        StepPlan((Dispatch(("b",), (0,)),), ()), reqs, devs, pinned))
