"""``genserve loadgen`` / ``python -m genserve.loadgen``.

Modes (the optional first positional):
    run        (default) send a workload to --target and write --out
    compare    the same workload per policy (--policies / --targets), live and simulated
    summarize  recompute summary.json and the plots of the run directory --out
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

MODES = ("run", "compare", "summarize")
CLOSED_LOOP_CAP = 100_000  # requests planned for a closed loop bounded only by time


def _not_negative(v) -> bool:
    return v >= 0


def _positive(v) -> bool:
    return v > 0


def _zero_or_min_slo(v) -> bool:
    from genserve.scheduler.workload import MIN_SLO_MS

    return v == 0 or v >= MIN_SLO_MS


def _zero_or_power_of_two(v) -> bool:
    return v == 0 or (v > 0 and not v & (v - 1))


# (argument, test, what it must be): checked before anything is built or sent.
# Workload shapes are checked by WorkloadOptions / WorkloadSpec (which check
# the rest again for callers other than this command).
RANGES = (
    ("rate", _positive, "must be positive"),
    ("image_fraction", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("num_requests", _not_negative, "must not be negative"),
    ("duration_s", _not_negative, "must not be negative"),
    ("slo_ms_image", _not_negative, "must not be negative (0: the server's default)"),
    ("slo_ms_video", _not_negative, "must not be negative (0: the server's default)"),
    ("slo_ms_image", _zero_or_min_slo, "must be 0 (the server's default) or at least 1 ms"),
    ("slo_ms_video", _zero_or_min_slo, "must be 0 (the server's default) or at least 1 ms"),
    ("slo_scale", _not_negative, "must not be negative (0: the server's default)"),
    ("concurrency", _not_negative, "must not be negative (0: open loop)"),
    ("warmup_s", _not_negative, "must not be negative"),
    ("warmup_requests", _not_negative, "must not be negative"),
    ("timeout_s", _not_negative, "must not be negative (0: no deadline)"),
    ("drain_timeout_s", _positive, "must be positive"),
    ("connect_timeout_s", _positive, "must be positive"),
    ("scrape_interval_s", _positive, "must be positive"),
    ("num_workers", _positive, "must be at least 1"),
    ("sim_max_sp_degree", _zero_or_power_of_two, "must be 0 or a power of two"),
)


def _workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload (generated unless --trace)")
    g.add_argument("--trace", default="", help="replay this JSON-lines trace (arrival times as written)")
    g.add_argument("--arrival", choices=("poisson", "gamma", "constant"), default="poisson")
    g.add_argument("--rate", type=float, default=1.0, help="requests per second (open loop)")
    g.add_argument("--cv", type=float, default=2.0, help="gamma arrivals: CV of inter-arrival times")
    g.add_argument("--image-fraction", type=float, default=0.7, help="class mix: share of images")
    g.add_argument("--image-shapes", default="64x64", help="WxH[:weight],... (default 64x64)")
    g.add_argument("--video-shapes", default="64x64x9", help="WxHxF[:weight],... (default 64x64x9)")
    g.add_argument("--image-model", default="", help="default: the server's image default")
    g.add_argument("--video-model", default="", help="default: the server's video default")
    g.add_argument("--steps-image", type=int, default=0, help="denoising steps (0: server default)")
    g.add_argument("--steps-video", type=int, default=0, help="denoising steps (0: server default)")
    g.add_argument("--num-requests", type=int, default=0,
                   help="stop after N requests (a trace: its first N arrivals, as simulate)")
    g.add_argument("--duration-s", type=float, default=0.0,
                   help="stop sending after S seconds (a trace: its arrivals within S s, as "
                        "simulate); with --num-requests, whichever ends first")
    g.add_argument("--seed", type=int, default=0)
    s = p.add_argument_group("SLOs (default: slo_ms=0, the server's default SLO)")
    s.add_argument("--slo-ms-image", type=float, default=0.0, help="fixed SLO of every image")
    s.add_argument("--slo-ms-video", type=float, default=0.0, help="fixed SLO of every video")
    s.add_argument("--slo-scale", type=float, default=0.0,
                   help="SLO = scale x isolated latency from --profile (compare with --profile "
                        "auto: the measured one; without a profile: passed to the servers compare "
                        "starts as --default-slo-scale; 0: the server's default)")
    s.add_argument("--profile", default="", help="latency profile (name or JSON path): SLOs for "
                                                 "--slo-scale, and the simulator in compare; compare "
                                                 "also takes 'auto' (measured on the live servers)")


def _run_args(p: argparse.ArgumentParser) -> None:
    from genserve.client_cli import add_client_args

    g = p.add_argument_group("sending (TLS and token: for --target and compare's --targets)")
    add_client_args(g)
    g.add_argument("--connect-timeout-s", type=float, default=10.0,
                   help="before sending, wait up to this long (> 0) for each server to answer "
                        "ListModels; a server that does not is an error, and nothing is sent")
    g.add_argument("--concurrency", type=int, default=0,
                   help="closed loop with N clients (default 0: open loop at the arrival times)")
    g.add_argument("--warmup-s", type=float, default=0.0, help="requests before this are warm-up")
    g.add_argument("--warmup-requests", type=int, default=0, help="the first N requests are warm-up")
    g.add_argument("--timeout-s", type=float, default=0.0, help="per-request deadline (0: none)")
    g.add_argument("--drain-timeout-s", type=float, default=600.0,
                   help="after the last send, wait this long (> 0) for outstanding requests")
    g.add_argument("--output-format", default="",
                   help="png|jpeg|webp|mp4|gif|raw (default png/mp4); the server's models must "
                        "offer it for every class in the workload")
    g.add_argument("--id-prefix", default="",
                   help="request ids are PREFIX-000000, ... (default: lg- and a random tag, new "
                        "each run, so runs sharing a server never share an id; compare adds "
                        "-NAME per run)")
    g.add_argument("--out", default="loadgen-out", help="output directory")
    g.add_argument("--metrics-url", default="",
                   help="run only: server /metrics URL (or HOST:PORT) to scrape; it must answer "
                        "before the run")
    g.add_argument("--scrape-interval-s", type=float, default=0.5, help="seconds (> 0)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plots", action="store_true")


def _compare_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compare")
    g.add_argument("--policies", default="",
                   help="start a server per policy, e.g. genserve,fcfs,static (from: "
                        "genserve.scheduler.POLICY_NAMES)")
    g.add_argument("--targets", default="", help="running servers: NAME=HOST:PORT,...")
    g.add_argument("--num-workers", type=int, default=2, help="workers of each started server (>= 1)")
    g.add_argument("--server-args", default="", help="extra `genserve serve` flags (one string)")
    g.add_argument("--sim-max-sp-degree", type=int, default=0,
                   help="simulated cluster's SP limit, 0 or a power of two (default 0: as the live "
                        "engine, the largest power of two of --num-workers)")


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every loadgen argument to ``p`` and set ``func``."""
    p.add_argument("mode", nargs="?", choices=MODES, default="run", help="run (default), compare, summarize")
    _workload_args(p)
    _run_args(p)
    _compare_args(p)
    p.set_defaults(func=cmd_loadgen)
    return p


def add_loadgen_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``loadgen`` on the ``genserve`` CLI's subparsers."""
    p = subparsers.add_parser("loadgen", help="load generator: SLO experiments against a live server",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return configure_parser(p)


def build_parser() -> argparse.ArgumentParser:
    return configure_parser(argparse.ArgumentParser(
        prog="python -m genserve.loadgen", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter))


def workload_options(args, *, slo_scale: float | None = None):
    from .plan import WorkloadOptions

    num = args.num_requests  # (check_args refuses neither this nor --duration-s)
    if args.concurrency and not num and not args.trace:
        num = CLOSED_LOOP_CAP  # the clients stop at --duration-s
    return WorkloadOptions(
        trace=args.trace, arrival=args.arrival, rate_rps=args.rate, cv=args.cv,
        image_fraction=args.image_fraction, image_shapes=args.image_shapes,
        video_shapes=args.video_shapes, num_requests=num,
        duration_s=0.0 if args.concurrency else args.duration_s, seed=args.seed,
        image_model=args.image_model, video_model=args.video_model,
        steps_image=args.steps_image, steps_video=args.steps_video,
        slo_ms_image=args.slo_ms_image, slo_ms_video=args.slo_ms_video,
        slo_scale=args.slo_scale if slo_scale is None else slo_scale, profile=args.profile,
        max_devices=max(1, args.num_workers))


def run_options(args):
    from .runner import RunOptions

    return RunOptions(
        target=args.target, concurrency=args.concurrency,
        duration_s=args.duration_s if args.concurrency else 0.0, warmup_s=args.warmup_s,
        warmup_requests=args.warmup_requests, timeout_s=args.timeout_s,
        drain_timeout_s=args.drain_timeout_s, output_format=args.output_format, seed=args.seed,
        id_prefix=args.id_prefix, progress=not args.no_progress)


def check_args(args) -> None:
    """Refuse what no run can use, before anything is built or sent: a
    ValueError naming the flag (numbers out of ``RANGES`` or not finite, an
    unknown output format)."""
    from genserve.client import FORMATS

    from .runner import MAX_ID_PREFIX_CHARS
    from .scrape import metrics_url

    for name, value in sorted(vars(args).items()):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{_flag(name)} must be a finite number, not {value}")
    for name, ok, rule in RANGES:
        if not ok(getattr(args, name)):
            raise ValueError(f"{_flag(name)} {rule}, not {getattr(args, name)}")
    if args.arrival == "gamma" and not args.cv > 0:
        raise ValueError(f"--cv must be positive with gamma arrivals, not {args.cv}")
    if not (args.trace or args.num_requests or args.duration_s):
        raise ValueError("give --num-requests or --duration-s (or --trace)")
    if args.output_format.lower() not in FORMATS:
        raise ValueError(f"--output-format must be one of {'|'.join(filter(None, FORMATS))}, "
                         f"not {args.output_format!r}")
    if args.metrics_url:
        metrics_url(args.metrics_url)  # the syntax; it is scraped once before the run
    if not (args.id_prefix.isprintable() and len(args.id_prefix) <= MAX_ID_PREFIX_CHARS):
        raise ValueError(f"--id-prefix: at most {MAX_ID_PREFIX_CHARS} printable characters, "
                         f"not {args.id_prefix!r}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _compare_options(args):
    from genserve.scheduler import POLICY_NAMES

    from .compare import CompareOptions

    targets = tuple(tuple(t.split("=", 1)) for t in filter(None, args.targets.split(",")))
    if any(len(t) != 2 or not all(t) for t in targets):
        raise ValueError(f"--targets: expected NAME=HOST:PORT,..., not {args.targets!r}")
    policies = tuple(filter(None, (p.strip() for p in args.policies.split(","))))
    if not policies and not targets:
        raise ValueError("compare: give --policies and/or --targets")
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown:
        raise ValueError(f"--policies: unknown {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(POLICY_NAMES)}")
    names = [*policies, *(name for name, _ in targets)]
    if len(set(names)) != len(names):
        raise ValueError(f"compare: each policy or target name once, not {', '.join(names)}")
    if args.metrics_url:
        raise ValueError("--metrics-url is for run (compare scrapes the servers it starts)")
    server_args = shlex.split(args.server_args)
    # Without a profile the loadgen cannot compute SLOs: the servers it starts apply the
    # scale (with "auto", compare computes them from the first server's measured profile).
    if args.slo_scale and not args.profile:
        server_args += ["--default-slo-scale", str(args.slo_scale)]
    return CompareOptions(policies=policies, targets=targets, num_workers=args.num_workers,
                          server_args=tuple(server_args), profile=args.profile, slo_scale=args.slo_scale,
                          sim_slo_scale=args.slo_scale or 3.0,
                          sim_max_sp_degree=args.sim_max_sp_degree, plots=not args.no_plots)


def cmd_loadgen(args) -> None:
    """The command. Bad input (flags, trace, run directory, a server that does
    not answer or cannot serve the workload) is one ``loadgen: ...`` line and
    exit status 1, before anything is sent or written. Ctrl-C during a run
    stops it and writes what was sent; elsewhere (or a second one) it ends
    the command with one line (servers compare started are stopped)."""
    try:
        _cmd_loadgen(args)
    except KeyboardInterrupt:
        print("loadgen: interrupted", file=sys.stderr)
        sys.exit(130)


def _cmd_loadgen(args) -> None:
    from .launch import ServerStartError
    from .run import PreflightError

    out = Path(args.out)
    try:
        if args.mode == "summarize":
            return _cmd_summarize(out, _read_run(out))
        items, wopts, copts, client = _prepare(args)
        try:  # the results' folder: made (or found writable) before any load is sent
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"--out {out}: cannot make the folder: {err.strerror or err}") from None
        if not os.access(out, os.W_OK | os.X_OK):
            raise OSError(f"--out {out}: the folder is not writable")
    except (ValueError, OSError) as err:  # SecurityError, PreflightError are ValueErrors
        sys.exit(f"loadgen: {err}")
    if copts:
        from genserve.scheduler.workload import write_trace

        from .compare import compare

        write_trace(out / "workload.jsonl", items)
        try:
            compare(items, run_options(args), copts, out, client)
        except ServerStartError as err:
            sys.exit(f"loadgen: {err.line}")
        except PreflightError as err:  # a server compare started cannot serve the workload
            sys.exit(f"loadgen: {err}")
        return
    _cmd_run(args, out, items, wopts, client)


def _prepare(args):
    """(items, workload options, compare options or None, client options),
    once every check passed; ValueError / OSError otherwise."""
    from genserve.client_cli import client_options

    from .plan import build_workload
    from .run import check_server, check_workload
    from .scrape import check_metrics_url

    if args.profile == "auto" and args.mode != "compare":
        raise ValueError("--profile auto is for compare")
    check_args(args)
    copts = _compare_options(args) if args.mode == "compare" else None
    scale = 0.0 if args.mode == "compare" and args.profile in ("", "auto") else None
    wopts = workload_options(args, slo_scale=scale)
    items = build_workload(wopts)
    if not items:
        raise ValueError("the workload is empty")
    if args.warmup_requests >= len(items):
        raise ValueError(f"--warmup-requests {args.warmup_requests} leaves none of the workload's "
                         f"{len(items)} request(s) to measure")
    if not args.concurrency and args.warmup_s > 0 and all(i.arrival_s < args.warmup_s for i in items):
        raise ValueError(f"--warmup-s {args.warmup_s:g} leaves no request to measure (the last arrives at "
                         f"{items[-1].arrival_s:g} s)")
    client = client_options(args)  # SecurityError: e.g. an unreadable certificate
    # Pre-flight: every server named must answer, and serve what the workload asks for
    # (compare checks the servers it starts itself).
    for target in [t for _, t in copts.targets] if copts else [args.target]:
        check_workload(items, check_server(target, client, args.connect_timeout_s),
                       args.output_format, target)
    if args.metrics_url:
        check_metrics_url(args.metrics_url)
    return items, wopts, copts, client


def _cmd_run(args, out: Path, items, wopts, client: dict) -> None:
    from .run import run_load, write_run

    result = run_load(items, run_options(args), metrics_url=args.metrics_url,
                      scrape_interval_s=args.scrape_interval_s, settings={"workload": asdict(wopts)},
                      client_options=client, stop_on_sigint=True)
    write_run(out, result, items, plots=not args.no_plots)
    print(f"results in {out}/ (requests.jsonl, summary.json{', *.png' if not args.no_plots else ''})")
    if result.settings["interrupted"]:
        stopped = sum(r.status == "CANCELLED" and "load generator" in r.reason for r in result.records)
        print(f"loadgen: interrupted: the results are of the {len(result.records)} of {len(items)} "
              f"request(s) sent ({stopped} cancelled in flight)", file=sys.stderr)
        sys.exit(130)


def _read_run(out: Path):
    """(records, summary.json document, metric samples) of the run directory ``out``."""
    import json

    from .records import read_records
    from .scrape import read_samples

    if not (out / "requests.jsonl").is_file():
        runs = sorted(p.parent.name for p in out.glob("*/requests.jsonl"))
        hint = (f"; it holds the runs {', '.join(runs)} (a compare folder): give one of them as --out"
                if runs else ": give the run's directory as --out")
        raise ValueError(f"no run in {out}/ (no requests.jsonl){hint}")
    try:
        records = read_records(out / "requests.jsonl")
        path = out / "summary.json"
        doc = json.loads(path.read_text()) if path.exists() else {}
        samples = read_samples(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    except (ValueError, TypeError, AttributeError) as err:  # not JSON lines of the expected keys
        raise ValueError(f"{out}/ is not a readable run directory: {type(err).__name__}: {err}") \
            from None
    return records, doc, samples


def _cmd_summarize(out: Path, run) -> None:
    import json

    from .plots import run_plots
    from .summary import format_table, summarize

    records, doc, samples = run
    summary = summarize(records)
    doc["summary"] = summary.to_dict()
    (out / "summary.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    run_plots(records, samples, out)
    print(format_table(summary))


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)
