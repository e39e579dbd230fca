"""The scheduler is pure Python: importing it and simulating loads no torch."""
import subprocess
import sys

SCRIPT = r"""
import sys
import genserve.scheduler as gs
from genserve.scheduler import POLICY_NAMES, ClusterSpec, LatencyModel, make_policy
from genserve.scheduler.simulator import simulate
from genserve.scheduler.workload import WorkloadSpec, generate, resolve
from genserve.scheduler import cli, runner, metrics  # everything but matplotlib
cost = LatencyModel.load("reference-h100")
cluster = ClusterSpec(4)
workload = resolve(generate(WorkloadSpec(rate_rps=0.5, num_requests=12, seed=2)), cost, 3.0, 4)
for name in POLICY_NAMES:
    result = simulate(make_policy(name, cluster), workload, cluster, cost.fresh())
    assert all(o.status == "done" for o in result.outcomes), name
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("TORCH" if loaded else "CLEAN", loaded[:3])
"""


def test_scheduler_and_simulator_never_import_torch():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("CLEAN"), out.stdout
