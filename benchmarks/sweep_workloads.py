"""Attainment of GenServe and the baselines across the standard workload
variants: image/video mixes 90/10, 70/30, 50/50 and bursty (Gamma, CV 3)
arrivals, at a load near each mix's capacity. Prints one table per variant.

    python benchmarks/sweep_workloads.py [--jobs 2] [--num-requests 300] [--seeds 0,1]
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing
import statistics
import sys

from genserve.scheduler import BASELINES

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_scheduler import _attain_job  # noqa: E402  (same job runner)

# (mix, arrival, cv, rates): rates chosen around each mix's saturation point
VARIANTS = ((0.9, "poisson", 1.0, (0.6, 0.9)), (0.7, "poisson", 1.0, (0.3, 0.45)),
            (0.5, "poisson", 1.0, (0.2, 0.3)), (0.7, "gamma", 3.0, (0.3, 0.45)))
SCALES = (1.5, 3.0)
POLICIES = ("genserve",) + BASELINES + ("edf-step",)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--num-requests", type=int, default=300)
    p.add_argument("--seeds", default="0,1")
    args = p.parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",")]
    jobs = [(pol, rate, scale, seed, args.num_requests, mix, arrival, cv)
            for mix, arrival, cv, rates in VARIANTS
            for rate, scale, seed, pol in itertools.product(rates, SCALES, seeds, POLICIES)]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.map(_attain_job, jobs, chunksize=1)
    for mix, arrival, cv, rates in VARIANTS:
        print(f"\nmix {mix:.0%} images, {arrival}{f' cv {cv:g}' if arrival == 'gamma' else ''}")
        print(f"{'rate':>5s} {'scale':>5s} " + " ".join(f"{x[:9]:>9s}" for x in POLICIES)
              + "   best baseline  ratio")
        for rate, scale in itertools.product(rates, SCALES):
            mean = {}
            for pol in POLICIES:
                got = [s["attainment"] for job, s in results
                       if job[:3] == (pol, rate, scale) and job[5:7] == (mix, arrival)]
                mean[pol] = statistics.mean(got)
            best = max(BASELINES, key=mean.get)
            print(f"{rate:5.2f} {scale:5.1f} " + " ".join(f"{mean[x]:9.3f}" for x in POLICIES)
                  + f"   {best:>9s} {mean['genserve'] / max(mean[best], 1e-9):6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
