#!/usr/bin/env bash
# The live CPU experiment of issue 4: a mixed workload where request-level FCFS
# leaves images waiting behind videos, on a live 2-worker server with the tiny
# presets, per policy, next to the simulator's prediction with a profile made
# by `genserve profile` on the same machine.
#
#   bash experiments/live_cpu.sh [OUT_DIR]     (about 5 minutes)
set -euo pipefail
OUT=${1:-runs/live-cpu}
PROFILE=${PROFILE:-profiles/cpu-tiny-2w.json}
[ -f "$PROFILE" ] || genserve profile --out "$PROFILE" --name cpu-tiny-2w
genserve loadgen compare --policies genserve,fcfs,static --num-workers 2 \
  --server-args "--profile $PROFILE" --profile "$PROFILE" \
  --arrival poisson --rate 2 --num-requests 120 --warmup-requests 6 --seed 7 \
  --image-fraction 0.8 --image-shapes 64x64 --video-shapes 128x128x17 \
  --steps-image 10 --steps-video 20 --slo-scale 3 --output-format raw \
  --no-progress --out "$OUT"
