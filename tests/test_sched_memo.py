"""Predictions kept across decisions (PredictionMemo, LatencyModel.version):
they must never make a plan differ from one made from scratch."""
import pytest

from genserve.scheduler import BASELINES, ClusterSpec, LatencyModel, make_policy
from genserve.scheduler.runner import scaled_profile
from genserve.scheduler.simulator import simulate
from genserve.scheduler.snapshot import PredictionMemo
from genserve.scheduler.workload import WorkloadSpec, generate, resolve

COST = LatencyModel.load("reference-h100")
FLUX = "flux.1-dev"
REQUEST_LEVEL = [p for p in BASELINES if p != "tetris"]


def test_version_changes_with_every_calibration_that_changes_a_prediction():
    cost = COST.fresh()
    v = cost.version
    cost.step_ms(FLUX, 512, 512, 1, 1, 1)
    cost.encode_ms(FLUX)
    cost.decode_ms(FLUX, 512, 512, 1, 1)
    assert cost.version == v  # predictions change nothing
    cost.observe_step(FLUX, 512, 512, 1, 1, 1, 100.0)
    assert cost.version > v
    for observe in (lambda: cost.observe_encode(FLUX, 50.0),
                    lambda: cost.observe_decode(FLUX, 512, 512, 1, 1, 80.0),
                    lambda: cost.observe_dispatch(3.0)):
        v = cost.version
        observe()
        assert cost.version > v
    v = cost.version
    cost.observe_step(FLUX, 512, 512, 1, 1, 1, -1.0)  # refused: no change
    cost.observe_dispatch(float("nan"))
    assert cost.version == v
    # measured as predicted: no prediction changes (a first sight of another
    # shape included), so predictions kept across decisions stay valid
    fresh = COST.fresh()
    for w in (512, 768):
        v = fresh.version
        fresh.observe_step(FLUX, w, w, 1, 1, 1, fresh.step_ms(FLUX, w, w, 1, 1, 1), count=5)
        fresh.observe_decode(FLUX, w, w, 1, 1, fresh.decode_ms(FLUX, w, w, 1, 1))
        assert fresh.version == v
    fresh.observe_step(FLUX, 512, 512, 1, 1, 1, 1.01 * fresh.step_ms(FLUX, 512, 512, 1, 1, 1))
    assert fresh.version > v


def test_memo_starts_afresh_on_a_new_version_cost_or_cluster():
    memo, cost, cluster = PredictionMemo(), COST.fresh(), ClusterSpec(8)
    table = memo.table(cost, cluster)
    table["x"] = 1.0
    assert memo.table(cost, cluster) is table
    cost.observe_step(FLUX, 512, 512, 1, 1, 1, 100.0)
    assert memo.table(cost, cluster) == {}
    assert memo.table(COST.fresh(), cluster) == {}
    assert memo.table(cost, ClusterSpec(4)) == {}

    class Unversioned:  # a CostModel without a version: nothing is kept
        pass

    assert memo.table(Unversioned(), cluster) is not memo.table(Unversioned(), cluster)


class FromScratch:
    """Plans with one long-lived policy and checks each plan against a fresh
    policy's (which has no predictions from earlier decisions)."""

    def __init__(self, name, cluster):
        self.name, self.cluster = name, cluster
        self.policy = make_policy(name, cluster)
        self.plans = 0

    def plan(self, now_s, requests, devices, cost):
        plan = self.policy.plan(now_s, requests, devices, cost)
        assert plan == make_policy(self.name, self.cluster).plan(now_s, requests, devices, cost)
        self.plans += 1
        return plan


@pytest.mark.parametrize("name", REQUEST_LEVEL)
def test_request_level_plans_match_plans_made_from_scratch(name):
    cluster = ClusterSpec(8)
    trace = generate(WorkloadSpec(rate_rps=0.5, num_requests=60, seed=3))
    workload = resolve(trace, COST, 2.0, 8)
    audit = FromScratch(name, cluster)
    slower = LatencyModel(scaled_profile(COST.profile, 2.5))  # calibration moves predictions a lot
    result = simulate(audit, workload, cluster, COST.fresh(), slower, check=True)
    assert audit.plans == len(result.decision_ms) > 60
    assert len(result.outcomes) == len(workload)
