#!/usr/bin/env bash
# Issue 4's GPU part in one run on a machine with an NVIDIA GPU:
#   1. the CUDA tests (tests/test_cuda.py: tiny models on the GPU match the
#      CPU; xformers matches SDPA where xformers imports; bfloat16 runs);
#   2. `genserve serve --device cuda --demo` on the tiny models;
#   3. `genserve profile` on random-weight models of real size
#      (sd3-medium-random, wan-1.3b-random) in bfloat16, written to
#      $OUT/h200-real-size-random.json (commit it under profiles/).
#
#   bash experiments/gpu_check.sh [all|smoke|profile]     (default all)
#
# Results go to $OUT (default runs/gpu): summary.txt and one log per stage.
# Packages the GPU image lacks travel as wheels in .whl/ (`make gpu-wheels`
# fetches them here; .whl/ is git-ignored, so the device run must carry it;
# they are installed into /tmp/site, this tree into /tmp/genserve). Budget:
# smoke about 3 minutes, profile about 5 on an H200; the whole run keeps to
# BUDGET_S (default 560 s, under the device's 600 s a command): the profile
# gets what the smoke stage left.
set -uo pipefail
STAGE=${1:-all}
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
say() { echo "== $*" | tee -a "$OUT/summary.txt"; }

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { say "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# a rerun on a warm machine: --target keeps an old tree (with a warning, rc 0)
rm -rf /tmp/genserve build
$PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/genserve . \
  >/tmp/genserve-install.log 2>&1 || { say "genserve install failed: $(tail -3 /tmp/genserve-install.log)"; exit 1; }
export PYTHONPATH=/tmp/genserve${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# run outside the tree: from its root, `import genserve` would find the source
# folder genserve/ first, which lacks genserve.scheduler and the rest
REPO=$PWD
OUT=$(cd "$OUT" && pwd)
[ -x "$PY" ] && PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # a relative path, made absolute
cd "$(mktemp -d)"
BUDGET_S=${BUDGET_S:-560}  # under the device's 600 s a command, so the summary is always written
END=$((SECONDS + BUDGET_S))
say "$(date -u +%FT%TZ) stage $STAGE; $(nvidia-smi -L 2>/dev/null | head -1)"
# every stage below needs these; without them (.whl/ not carried: it is
# git-ignored, so the run call must name it in carry) stop now, not after
# each stage has failed slowly
versions=$($PY -c 'import torch, diffusers, transformers, av, grpc_health, grpc_reflection, genserve.models.registry; print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__, "transformers", transformers.__version__)' 2>&1) \
  || { say "imports failed: ${versions##*$'\n'}"; exit 1; }
say "$versions"
say "xformers: $($PY -c 'import xformers, xformers.ops; print(xformers.__version__)' 2>&1 | tail -1)"

if [ "$STAGE" = all ] || [ "$STAGE" = smoke ]; then
  timeout 150 $PY -m pytest -q -p no:cacheprovider "$REPO/tests/test_cuda.py" >"$OUT/pytest-cuda.txt" 2>&1
  say "tests/test_cuda.py (rc $?): $(tail -1 "$OUT/pytest-cuda.txt")"
  timeout 180 $PY -m genserve serve --device cuda --port 0 --demo >"$OUT/serve-demo.txt" 2>&1 &
  pid=$!
  for _ in $(seq 150); do  # until the demo is done, or the server has exited (a start failure)
    grep -q "demo: done\|Traceback" "$OUT/serve-demo.txt" && break
    kill -0 $pid 2>/dev/null || break
    sleep 1
  done
  kill -TERM $pid 2>/dev/null; wait $pid
  say "serve --device cuda --demo: $(grep -c '^demo: ' "$OUT/serve-demo.txt") demo lines"
  grep "^demo: \|GenServe listening\|Error\|error" "$OUT/serve-demo.txt" | head -8 | tee -a "$OUT/summary.txt"
fi

if [ "$STAGE" = all ] || [ "$STAGE" = profile ]; then
  left=$((END - SECONDS))  # the profile gets what the smoke stage left of the budget
  if [ $left -lt 60 ]; then
    say "genserve profile skipped: ${left} s left of the ${BUDGET_S} s budget"
    exit 1
  fi
  timeout -k 10 $((left < 420 ? left : 420)) $PY -m genserve profile --device cuda --dtype bfloat16 \
    --model sd3-medium-random --model wan-1.3b-random \
    --image-sizes 512,768,1024 --video-shapes 832x480x33,832x480x81 \
    --steps 4 --repeats 2 --max-batch 8 --name h200-real-size-random \
    --out "$OUT/h200-real-size-random.json" >"$OUT/profile.txt" 2>&1
  say "genserve profile (rc $?): $(tail -1 "$OUT/profile.txt")"
  grep "step\|dispatch" "$OUT/profile.txt" | tail -30 >>"$OUT/summary.txt"
fi
