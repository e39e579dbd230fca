#!/usr/bin/env bash
# The live CPU experiment of issue 4: a mixed workload where request-level FCFS
# leaves images waiting behind videos, on a live 2-worker server with the tiny
# presets, per policy, next to the simulator's prediction with a profile made
# by `genserve profile` on the same machine.
#
#   bash experiments/live_cpu.sh [OUT_DIR]     (about 6 minutes per workload)
#
# ARRIVAL=gamma CV=2 (the default): bursty arrivals, as production traffic
# comes; ARRIVAL=poisson: the steady case, where a static split does as well.
set -euo pipefail
OUT=${1:-runs/live-cpu}
PROFILE=${PROFILE:-profiles/cpu-tiny-2w.json}
ARRIVAL=${ARRIVAL:-gamma}
CV=${CV:-2}
SEED=${SEED:-7}
[ -f "$PROFILE" ] || genserve profile --out "$PROFILE" --name cpu-tiny-2w --repeats 3
genserve loadgen compare --policies genserve,fcfs,static --num-workers 2 \
  --server-args "--profile $PROFILE" --profile "$PROFILE" \
  --arrival "$ARRIVAL" --cv "$CV" --rate 2 --num-requests 120 --warmup-requests 6 --seed "$SEED" \
  --image-fraction 0.8 --image-shapes 64x64 --video-shapes 128x128x17 \
  --steps-image 10 --steps-video 20 --slo-scale 3 --output-format raw \
  --no-progress --out "$OUT"
