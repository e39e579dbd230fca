"""Serving overhead: N sequential tiny requests through the server versus the
same denoising steps run in one process by a bare diffusers pipeline.

    python benchmarks/bench_overhead.py [--requests 30] [--steps 8] [--size 64]

Both sides use one torch thread per busy worker, the same tiny SD3 weights,
the same steps, and decode to pixels; the server also pays gRPC, the engine's
plan per step, the pipes to its worker, and RAW media encoding. Prints the
ratio server / bare (goal: <= 1.10).
"""
from __future__ import annotations

import argparse
import statistics
import time


def bare_pipeline_ms(args) -> list[float]:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from genserve.models.base import GenParams
    from genserve.models.registry import build_model

    torch.set_num_threads(1)
    model = build_model(args.model)
    pipe = StableDiffusion3Pipeline(
        transformer=model.transformer, vae=model.vae,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(args.warmup + args.requests):
        t0 = time.perf_counter()
        p = GenParams(f"prompt {i}", "", args.size, args.size, 1, args.steps, args.guidance_scale, i)
        cond = model.encode_prompt(p)  # the pipeline's own text encoders are not in the tiny preset
        pipe(prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.pooled,
             negative_prompt_embeds=cond.neg_embeds, negative_pooled_prompt_embeds=cond.neg_pooled,
             height=args.size, width=args.size, num_inference_steps=args.steps,
             guidance_scale=args.guidance_scale, output_type="np",
             generator=torch.Generator("cpu").manual_seed(i))
        if i >= args.warmup:
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def server_ms(args) -> list[float]:
    from genserve.client import Client
    from genserve.loadgen.launch import LaunchedServer

    srv = LaunchedServer(args.policy, num_workers=2, metrics=False,
                         args=("--threads-per-worker", "1", "--chunk-ms", str(args.chunk_ms)))
    try:
        out = []
        with Client(srv.target) as client:
            for i in range(args.warmup + args.requests):
                t0 = time.perf_counter()
                client.generate(f"prompt {i}", task="image", model=args.model, width=args.size,
                                height=args.size, steps=args.steps, seed=i, output_format="raw",
                                guidance_scale=args.guidance_scale)
                if i >= args.warmup:
                    out.append((time.perf_counter() - t0) * 1e3)
        return out
    finally:
        srv.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model", default="sd3-tiny")
    parser.add_argument("--policy", default="genserve")
    parser.add_argument("--chunk-ms", type=float, default=0.0, help="the server's --chunk-ms")
    parser.add_argument("--guidance-scale", type=float, default=5.0,
                        help="the same on both sides (> 1: classifier-free guidance, a batch of 2)")
    args = parser.parse_args()
    served = server_ms(args)
    bare = bare_pipeline_ms(args)
    s_med, b_med = statistics.median(served), statistics.median(bare)
    print(f"{args.requests} sequential {args.model} {args.size}x{args.size} requests, {args.steps} steps, "
          f"guidance {args.guidance_scale:g}, policy {args.policy}")
    print(f"  server (gRPC end to end): median {s_med:8.2f} ms   mean {statistics.fmean(served):8.2f} ms")
    print(f"  bare diffusers pipeline : median {b_med:8.2f} ms   mean {statistics.fmean(bare):8.2f} ms")
    print(f"  overhead per step       : {(s_med - b_med) / args.steps:8.3f} ms")
    print(f"  ratio server / bare     : {s_med / b_med:8.3f}x (goal <= 1.10x)")


if __name__ == "__main__":
    main()
