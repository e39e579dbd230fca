#!/usr/bin/env bash
# How much compiling the scheduler as it is would speed up a genserve
# simulation (docs/scheduler.md, "Compiling the policy as it is"). Copies
# scheduler/ into a scratch package, builds the modules a genserve simulation
# runs through with Cython (needs `pip install cython` and a C compiler), and
# times the pure and the compiled package in turns on the same workloads,
# printing requests per wall second and a hash of every outcome (equal hashes:
# the same decisions).
#
#   bash experiments/compiled_policy.sh [RUNS] [POLICY,...]   (default 2 genserve)
set -euo pipefail
RUNS=${1:-2}
POLICIES=${2:-genserve}
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/compiled/genserve" "$WORK/pure"
cp "$REPO/genserve/__init__.py" "$WORK/compiled/genserve/"
cp -r "$REPO/scheduler" "$WORK/compiled/genserve/scheduler"
rm -rf "$WORK/compiled/genserve/scheduler/__pycache__"
(cd "$WORK/compiled/genserve/scheduler" &&
 cythonize -i -3 -q types.py snapshot.py blocks.py genserve_values.py targets.py imagepool.py \
   genserve_policy.py dp.py guards.py placement.py latency.py simulator.py 2>&1 | grep -v warning | grep -i error) && exit 1
cat > "$WORK/speed.py" <<'PY'
import hashlib, sys, time
import genserve.scheduler.genserve_values as gv
from genserve.scheduler import ClusterSpec, LatencyModel, make_policy
from genserve.scheduler.metrics import summarize
from genserve.scheduler.runner import Experiment, resolve_workload
from genserve.scheduler.simulator import simulate
from genserve.scheduler.workload import WorkloadSpec, generate
kind = "compiled" if gv.__file__.endswith(".so") else "pure"
cost, cluster = LatencyModel.load("reference-h100"), ClusterSpec(8)
for rate in (0.2, 0.4):
    trace = generate(WorkloadSpec(rate_rps=rate, num_requests=300, seed=0))
    workload = resolve_workload(Experiment(cluster, cost.profile), trace, 2.0)
    for name in sys.argv[1].split(","):
        t0 = time.perf_counter()
        res = simulate(make_policy(name, cluster), workload, cluster, cost.fresh(), check=False)
        wall = time.perf_counter() - t0
        digest = hashlib.sha256(repr([(o.req_id, o.status, round(o.finish_s, 9))
                                      for o in res.outcomes]).encode()).hexdigest()[:12]
        print(f"{kind:8s} rate {rate} {name:10s} {len(workload) / wall:7.0f} requests/s  "
              f"attainment {summarize(res)['attainment']:.3f}  outcomes {digest}")
PY
for _ in $(seq "$RUNS"); do
  (cd "$WORK/pure" && python "$WORK/speed.py" "$POLICIES")
  (cd "$WORK/compiled" && PYTHONPATH="$WORK/compiled" python "$WORK/speed.py" "$POLICIES")
done
