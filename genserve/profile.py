"""``genserve profile``: measure the served models on the real workers and
write a latency profile for the scheduler.

It starts the same worker processes the server uses (so SP steps run over the
same process groups) and drives them directly with dispatches: step time per
(shape, SP degree, batch size), decode time per shape, prompt-encode time,
and the overhead of one dispatch beyond its compute.
"""
from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

from genserve.models.base import GenParams
from genserve.scheduler import DecodeSample, Profile, StepSample, save_profile
from genserve.workers import protocol as P
from genserve.workers.executor import Executor, WorkerDied

log = logging.getLogger("genserve.profile")


class Profiler:
    """Runs measurement dispatches on started workers (no engine, no policy)."""

    def __init__(self, executor: Executor, cards: dict[str, P.ModelCard]):
        self.executor, self.cards = executor, cards
        self._ids = iter(range(1, 1 << 62))

    def measure(self, model: str, width: int, height: int, frames: int, block: tuple[int, ...],
                batch: int, steps: int, timeout_s: float = 3600.0) -> tuple[list[float], float, float]:
        """Run ``batch`` fresh requests ``steps`` steps to the end on ``block``
        and, at the same time, on every other disjoint block of its size, so
        the devices are as busy as when serving (CPU workers share cores,
        caches and memory bandwidth): (step times after the first, mean
        encode ms, decode ms of the leaders). RuntimeError when a request
        fails, a worker dies or the runs take over ``timeout_s``."""
        k, n = len(block), self.executor.num_devices
        blocks = [tuple(range(s, s + k)) for s in range(0, n - k + 1, k)] or [block]
        lim = self.cards[model].limits
        runs = {}
        for b in blocks:
            req_ids = tuple(f"profile-{next(self._ids)}" for _ in range(batch))
            new = tuple(P.NewRequest(r, model, GenParams("profiling prompt", "", width, height, frames, steps,
                                                         lim.default_guidance_scale, i), "raw", 8)
                        for i, r in enumerate(req_ids))
            dispatch_id = next(self._ids)
            runs[dispatch_id] = b
            for member in b:
                self.executor.send(member, P.RunSteps(dispatch_id, model, req_ids, steps, new, b))
        step_ms: dict[int, list[float]] = {d: [] for d in runs}
        done: dict[tuple[int, int], P.DispatchDone] = {}
        expected = sum(len(b) for b in runs.values())
        deadline = time.monotonic() + timeout_s
        while len(done) < expected:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"profiling {model} on {len(block)} device(s) took over {timeout_s:.0f} s")
            for device_id, msg in self.executor.wait(min(left, 60)):
                if isinstance(msg, P.StepDone) and msg.dispatch_id in runs:
                    step_ms[msg.dispatch_id].append(msg.step_ms)
                elif isinstance(msg, P.DispatchDone) and msg.dispatch_id in runs:
                    done[(msg.dispatch_id, device_id)] = msg
                elif isinstance(msg, WorkerDied):
                    raise RuntimeError(f"profiling {model}: worker {device_id} died "
                                       f"(exit code {msg.exitcode})")
        leads = [done[(d, b[0])] for d, b in runs.items()]
        for lead in leads:
            if lead.failed:
                raise RuntimeError(f"profiling {model} failed: {lead.failed[0].message}")
        decode_ms = statistics.fmean(f.decode_ms for lead in leads for f in lead.finished)
        times = [t for ts in step_ms.values() for t in (ts[1:] or ts)]
        return times, statistics.fmean(lead.encode_ms for lead in leads) / batch, decode_ms


    def measure_dispatch(self, model: str, rounds: int = 20) -> list[float]:
        """Per-dispatch overhead as a step-level policy meets it: every device
        runs a request of its own one step per dispatch, all at once, each
        round sent as soon as the last round's replies are in; the overhead of
        a dispatch is its round trip less the compute its worker reports, plus
        the turnaround from the replies to the next send (ms, first round not
        counted: it encodes and warms up)."""
        n = self.executor.num_devices
        lim = self.cards[model].limits
        params = GenParams("profiling prompt", "", lim.default_width, lim.default_height,
                           lim.default_frames if self.cards[model].task == "video" else 1,
                           rounds + 1, lim.default_guidance_scale, 0)
        req_ids = {d: f"profile-{next(self._ids)}" for d in range(n)}
        out: list[float] = []
        woke = None
        try:
            for rnd in range(rounds):
                start = time.monotonic()
                turnaround_ms = (start - woke) * 1e3 if woke is not None else 0.0
                sent: dict[int, tuple[int, float]] = {}
                for d, rid in req_ids.items():
                    new = (P.NewRequest(rid, model, params, "raw", 8),) if rnd == 0 else ()
                    dispatch_id = next(self._ids)
                    sent[dispatch_id] = (d, time.monotonic())
                    self.executor.send(d, P.RunSteps(dispatch_id, model, (rid,), 1, new, (d,)))
                compute = dict.fromkeys(sent, 0.0)
                done: dict[int, float] = {}
                deadline = time.monotonic() + 600
                while len(done) < len(sent) and time.monotonic() < deadline:
                    for _, msg in self.executor.wait(60):
                        if isinstance(msg, P.StepDone) and msg.dispatch_id in sent:
                            compute[msg.dispatch_id] += msg.step_ms
                        elif isinstance(msg, P.DispatchDone) and msg.dispatch_id in sent:
                            if msg.failed:
                                raise RuntimeError(f"profiling {model} failed: {msg.failed[0].message}")
                            compute[msg.dispatch_id] += msg.encode_ms
                            done[msg.dispatch_id] = time.monotonic()
                woke = time.monotonic()
                if rnd > 0:
                    out += [(done[i] - t) * 1e3 - compute[i] + turnaround_ms
                            for i, (_, t) in sent.items() if i in done]
        finally:
            for d, rid in req_ids.items():
                self.executor.send(d, P.Drop((rid,)))
        return out


def warm_up_sp(executor: Executor, cards: dict[str, P.ModelCard], progress=log.info,
               timeout_s: float = 600.0) -> list[StepSample]:
    """Run every video model's sequence-parallel step once on every aligned
    block of each degree it can use (2 .. the largest the workers and the
    model allow), at the model's served default shape, before any request:
    a process's first SP step pays one-time costs (the SP path's first run;
    on GPUs NCCL's communicators, made at their first collective) that would
    otherwise land on the first video, and the steps after it are measured, one StepSample per degree
    (the fastest step: the warm-up's rule at one device). The workers' own
    warm-up measured one device only. RuntimeError when a step fails."""
    prof, samples = Profiler(executor, cards), []
    for card in cards.values():
        top = min(executor.max_sp_degree, card.max_sp_degree) if card.task == "video" else 1
        lim, degree = card.limits, 2
        while degree <= top:
            t0 = time.perf_counter()
            times, _, _ = prof.measure(card.name, lim.default_width, lim.default_height, lim.default_frames,
                                       tuple(range(degree)), 1, 3, timeout_s)
            samples.append(StepSample(card.name, card.task, lim.default_width, lim.default_height,
                                      lim.default_frames, degree, 1, min(times)))
            progress(f"{card.name}: SP {degree} warmed up on every block of {degree} in "
                     f"{time.perf_counter() - t0:.1f} s; step {min(times):.1f} ms")
            degree *= 2
    return samples


def default_grid(card: P.ModelCard, max_block: int, max_batch: int, image_sizes: tuple[int, ...] = (),
                 video_shapes: tuple[tuple[int, int, int], ...] = ()):
    """(width, height, frames, sp degrees, batch sizes) points for a model:
    square images of ``image_sizes`` (default: the model's default width x1,
    x2, x4 within its maximum) and videos of ``video_shapes`` (W, H, F)
    (default: those sizes at the default frame count and about twice it)."""
    lim = card.limits
    sizes = sorted({lim.default_width * k for k in (1, 2, 4) if lim.default_width * k <= lim.max_width})
    if card.task == "image":
        batches = [b for b in (1, 2, 4, 8, 16) if b <= max_batch]
        return [(s, s, 1, (1,), batches) for s in (image_sizes or sizes)]
    degrees = tuple(d for d in (1, 2, 4, 8) if d <= max_block)
    if video_shapes:
        return [(w, h, f, degrees, [1]) for w, h, f in video_shapes]
    frames = sorted({f for f in (lim.default_frames, 2 * lim.default_frames - 1) if f <= lim.max_frames})
    return [(s, s, f, degrees, [1]) for s in sizes for f in frames]


def grid_problems(cards: dict[str, P.ModelCard], max_block: int, max_batch: int,
                  image_sizes: tuple[int, ...] = (),
                  video_shapes: tuple[tuple[int, int, int], ...] = ()) -> list[str]:
    """Why a grid point cannot be measured (a size the model does not take),
    as the server would refuse a request of that size; [] when all can."""
    from genserve.config import Limits
    from genserve.convert import Validator
    from genserve.types import RequestError
    from genserve.v1 import genserve_pb2 as pb

    validator, out = Validator(cards, Limits()), []
    for card in cards.values():
        for width, height, frames, _, _ in default_grid(card, max_block, max_batch, image_sizes, video_shapes):
            try:
                validator.request(pb.GenerateRequest(prompt="profiling prompt", model=card.name, width=width,
                                                     height=height, num_frames=frames))
            except RequestError as err:
                flag, shape = (("--image-sizes", f"{width}x{height}") if card.task == "image" else
                               ("--video-shapes", f"{width}x{height}x{frames}"))
                out.append(f"{flag}: {card.name} cannot take {shape} ({err.message})")
    return out


def run_profile(executor: Executor, cards: dict[str, P.ModelCard], name: str, hardware: str,
                steps: int = 6, max_batch: int = 8, progress=print, repeats: int = 3,
                image_sizes: tuple[int, ...] = (), video_shapes: tuple[tuple[int, int, int], ...] = ()) -> Profile:
    """Measure every grid point ``repeats`` times, interleaved (a whole pass
    over the grid per repeat), so a burst of interference on the machine
    lands on one sample of many points rather than on every sample of one."""
    prof = Profiler(executor, cards)
    step_samples, decode_samples, encode = [], [], {}
    points = [(card, width, height, frames, degree, batch)
              for card in cards.values()
              for width, height, frames, degrees, batches in default_grid(
                  card, executor.max_sp_degree, max_batch, image_sizes, video_shapes)
              for degree in degrees for batch in batches]
    for rep in range(max(1, repeats)):
        for card, width, height, frames, degree, batch in points:
            times, enc, dec = prof.measure(card.name, width, height, frames, tuple(range(degree)), batch, steps)
            step_samples += [StepSample(card.name, card.task, width, height, frames, degree, batch, t)
                             for t in times]
            if degree == 1:  # the leader decodes alone, whatever the block
                decode_samples.append(DecodeSample(card.name, width, height, frames, 1, dec))
            encode.setdefault(card.name, []).append(enc)
            progress(f"[{rep + 1}/{repeats}] {card.name} {width}x{height}x{frames} sp={degree} batch={batch}: "
                     f"step {statistics.median(times):.1f} ms, decode {dec:.1f} ms")
    # the overhead a dispatch adds, on the model with the shortest steps
    # (images first): where it weighs most
    model = min(cards.values(), key=lambda c: (c.task != "image", c.name)).name
    overheads = prof.measure_dispatch(model)
    dispatch_ms = statistics.median(overheads) if overheads else 0.0
    progress(f"dispatch overhead: {dispatch_ms:.2f} ms (median of {len(overheads)} one-step dispatches)")
    return Profile.from_measurements(
        name, step_samples, decode_samples,
        encode_ms={m: statistics.median(v) for m, v in encode.items()},
        default_steps={c.name: c.limits.default_steps for c in cards.values()},
        hardware=hardware, dispatch_ms=dispatch_ms,
        dispatch_note=f"median of {len(overheads)} one-step dispatches of {model} on every "
                      "device at once: round trip less reported compute, plus turnaround")


def cmd_profile(args) -> None:
    import os
    import platform

    from genserve.config import check_attention
    from genserve.workers.executor import MultiprocessExecutor, WorkerStartError, make_worker_specs

    from genserve.cli import default_device

    device = args.device or default_device()
    num_workers = args.num_workers if args.num_workers is not None else (2 if device == "cpu" else 0)
    try:
        check_attention(args.attention, device)
        least = {"--steps": (args.steps, 2), "--repeats": (args.repeats, 1),
                 "--max-batch": (args.max_batch, 1),
                 "--threads-per-worker": (args.threads_per_worker, 0),
                 "--num-workers": (num_workers, 1 if device == "cpu" else 0)}
        for flag, (value, low) in least.items():
            if value < low:
                raise ValueError(f"{flag} must be at least {low}, got {value}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # fail now, not after measuring
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    threads = args.threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, num_workers))
    try:
        specs = make_worker_specs(device, num_workers, tuple(args.model), args.dtype, threads,
                                  attention=args.attention, log_format=args.log_format)
        executor = MultiprocessExecutor(specs)
        try:
            ready = executor.start()
            cards = {c.name: c for c in ready[0].models}
            problems = grid_problems(cards, executor.max_sp_degree, args.max_batch, args.image_sizes,
                                     args.video_shapes)
            if problems:  # before measuring anything (the workers stop in finally)
                raise SystemExit(f"error: {problems[0]}" + (f" (and {len(problems) - 1} more)"
                                                             if len(problems) > 1 else ""))
            if device == "cuda":
                import torch

                hardware = f"{len(specs)} x {torch.cuda.get_device_name(0)}, {args.dtype}"
            else:
                hardware = (f"{len(specs)} x {device} ({platform.processor() or platform.machine()}), "
                            f"{threads} thread(s) each")
            profile = run_profile(executor, cards, args.name, hardware, args.steps, args.max_batch,
                                  repeats=args.repeats, image_sizes=args.image_sizes,
                                  video_shapes=args.video_shapes)
        finally:
            executor.shutdown()
    except WorkerStartError as err:
        raise SystemExit(f"error: {err}") from None
    try:
        save_profile(profile, args.out)
    except OSError as err:
        raise SystemExit(f"error: cannot write the profile: {err}") from None
    print(f"wrote {args.out}")


def add_profile_parser(sub) -> None:
    from genserve.cli import add_attention_arg, add_log_format_arg
    from genserve.config import DEFAULT_MODELS

    p = sub.add_parser("profile", help="measure the served models and write a latency profile",
                       description="Measure step (per shape, SP degree, batch size), decode and prompt-encode "
                                   "times on the real worker processes and write a profile JSON for --profile.")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--name", default="measured", help="profile name (default: measured)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="cpu, or cuda (every visible GPU); default: cuda when available, as serve")
    p.add_argument("--num-workers", type=int, default=None, help="default: 2 on cpu, every GPU on cuda")
    p.add_argument("--threads-per-worker", type=int, default=0)
    p.add_argument("--model", action="append", default=None, metavar="NAME|NAME=PATH")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    add_attention_arg(p)
    p.add_argument("--steps", type=int, default=6,
                   help="steps per measurement, at least 2 (the first is not counted)")
    p.add_argument("--max-batch", type=int, default=8, help="largest image batch measured")
    p.add_argument("--repeats", type=int, default=3,
                   help="passes over the grid; each point's figure is the median of all its samples")
    p.add_argument("--image-sizes", type=_sizes, default=(), metavar="S,S,...",
                   help="square image sizes to measure, e.g. 512,768,1024 (default: each image model's "
                        "default width x1, x2, x4 within its maximum)")
    p.add_argument("--video-shapes", type=_shapes, default=(), metavar="WxHxF,...",
                   help="video shapes to measure, e.g. 832x480x33,832x480x81 (default: each video model's "
                        "default-width squares at its default frame count and about twice it)")
    add_log_format_arg(p)
    p.set_defaults(func=lambda a: cmd_profile(_with_default_models(a, DEFAULT_MODELS)))


def _sizes(text: str) -> tuple[int, ...]:
    import argparse

    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 512,768,1024, got {text!r}") from None
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return sizes


def _shapes(text: str) -> tuple[tuple[int, int, int], ...]:
    import argparse

    try:
        shapes = tuple(tuple(int(x) for x in s.lower().split("x")) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected shapes like 832x480x81, got {text!r}") from None
    if not shapes or any(len(s) != 3 or min(s) <= 0 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected shapes like 832x480x81 (WxHxF), got {text!r}")
    return shapes


def _with_default_models(args, defaults):
    args.model = args.model or list(defaults)
    return args
