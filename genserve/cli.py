"""The ``genserve`` command: serve, generate, models, simulate, profile, loadgen."""
from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import threading

from genserve import logs
from genserve.client_cli import MIME_SUFFIX, add_generate, add_models
from genserve.config import DEFAULT_MODELS, EngineConfig, Limits, Security, ServerConfig
from genserve.scheduler.policies import POLICY_NAMES

def default_device() -> str:
    """cuda when torch sees a GPU, else cpu (serve's and profile's default)."""
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC server",
                       description="Run the GenServe gRPC server. Defaults: the tiny built-in models "
                                   f"({', '.join(DEFAULT_MODELS)}), CUDA if a GPU is visible else 2 CPU workers.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0 picks a free one)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (default: off)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="cpu, or cuda (every visible GPU); default: cuda when available")
    p.add_argument("--num-workers", type=int, default=None,
                   help="worker processes (default: 2 on cpu; every visible GPU on cuda)")
    p.add_argument("--threads-per-worker", type=int, default=0,
                   help="torch threads per CPU worker (default: cores / workers)")
    p.add_argument("--model", action="append", default=None, metavar="NAME|NAME=PATH",
                   help="a built-in preset or a diffusers checkpoint directory; repeat for several "
                        "(default: " + " ".join(DEFAULT_MODELS) + "); the first of each task is its default")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="dtype of the model weights and activations (default float32)")
    p.add_argument("--policy", default="genserve",
                   help=f"scheduling policy (default genserve), one of: {', '.join(POLICY_NAMES)}")
    p.add_argument("--profile", default="", help="latency profile name or JSON path "
                                                  "(default: measured by a warm-up at start, on one device and on every SP degree)")
    p.add_argument("--default-slo-scale", type=float, default=3.0,
                   help="SLO of requests with slo_ms=0, as a multiple of their predicted isolated latency "
                        "(default 3)")
    p.add_argument("--chunk-ms", type=float, default=0.0,
                   help="step-level policies dispatch up to this many ms of steps per decision "
                        "(default 0: one step, the finest preemption granularity)")
    p.add_argument("--hung-worker-s", type=float, default=300.0,
                   help="kill and restart the workers of a dispatch this many seconds past its predicted end "
                        "(and 10x its prediction): a hung worker; its requests go on as after a crash "
                        "(0: never, only log a warning)")
    p.add_argument("--admission-control", action="store_true",
                   help="refuse requests that cannot meet their SLO (RESOURCE_EXHAUSTED)")
    p.add_argument("--max-queue", type=int, default=4096, help="waiting requests before RESOURCE_EXHAUSTED (default 4096)")
    for flag, what in (("--max-width", "image/video width"), ("--max-height", "height"),
                       ("--max-frames", "video frames"), ("--max-steps", "denoising steps")):
        p.add_argument(flag, type=int, help=f"cap on {what} below the models' own maxima (default: none)")
    p.add_argument("--max-prompt-chars", type=int, default=4096, help="longest prompt accepted (default 4096)")
    p.add_argument("--max-message-bytes", type=int, default=1 << 20,
                   help="largest inbound gRPC message (default 1 MiB)")
    add_attention_arg(p)
    p.add_argument("--max-sp-degree", type=int, default=8, choices=(1, 2, 4, 8),
                   help="largest sequence-parallel group for a video step (default 8, capped by devices and by the "
                        "video models' attention heads, which must split evenly over it)")
    p.add_argument("--paused-budget-mb", type=float, default=0.0,
                   help="device memory per worker for paused requests' state before it moves to host "
                        "memory (default 0: no limit)")
    p.add_argument("--grace-s", type=float, default=30.0,
                   help="on SIGTERM, seconds accepted requests get to finish before the server exits (default 30)")
    p.add_argument("--tls-cert", default="", metavar="FILE", help="PEM certificate chain: serve TLS (with --tls-key)")
    p.add_argument("--tls-key", default="", metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default="", metavar="FILE",
                   help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    p.add_argument("--auth-tokens", default="", metavar="FILE",
                   help="file of 'TOKEN TENANT' lines: every call needs 'authorization: Bearer TOKEN' "
                        "(the health and reflection services stay open for probes)")
    p.add_argument("--max-streams-per-client", type=int, default=64, metavar="N",
                   help="in-flight Generate/GenerateStream calls per client (tenant, else peer host) "
                        "before RESOURCE_EXHAUSTED (default 64; 0: no limit)")
    p.add_argument("--demo", action="store_true",
                   help="once up, generate one image and one video through the gRPC API and print them "
                        "(a plaintext, token-less smoke test: not with --tls-cert or --auth-tokens)")
    add_log_format_arg(p)
    p.set_defaults(func=cmd_serve)


def add_log_format_arg(p) -> None:
    p.add_argument("--log-format", choices=logs.FORMATS, default="text",
                   help="log lines on stderr, the server's and its workers': text (default), or json "
                        "(one object per line, for log pipelines)")


def add_attention_arg(p) -> None:
    p.add_argument("--attention", choices=("sdpa", "xformers"), default="sdpa",
                   help="attention kernel of the denoising transformers: sdpa (PyTorch, default) or "
                        "xformers (CUDA only; pip install 'genserve[cuda]')")


def cmd_serve(args) -> None:
    from genserve.app import ListenError, run_server
    from genserve.models.registry import model_family
    from genserve.scheduler import load_profile
    from genserve.security import SecurityError
    from genserve.server import host_port
    from genserve.workers.executor import WorkerStartError

    device = args.device or default_device()
    num_workers = args.num_workers if args.num_workers is not None else (2 if device == "cpu" else 0)
    config = ServerConfig(
        host=args.host, port=args.port, metrics_port=args.metrics_port, device=device,
        num_workers=num_workers, threads_per_worker=args.threads_per_worker,
        models=tuple(args.model or DEFAULT_MODELS), dtype=args.dtype, attention=args.attention,
        max_sp_degree=args.max_sp_degree, paused_budget_mb=args.paused_budget_mb, grace_s=args.grace_s,
        log_format=args.log_format,
        engine=EngineConfig(policy=args.policy, profile=args.profile,
                            default_slo_scale=args.default_slo_scale,
                            admission_control=args.admission_control, chunk_ms=args.chunk_ms,
                            hung_worker_s=args.hung_worker_s),
        limits=Limits(max_queue=args.max_queue, max_width=args.max_width, max_height=args.max_height,
                      max_frames=args.max_frames, max_steps=args.max_steps,
                      max_prompt_chars=args.max_prompt_chars, max_message_bytes=args.max_message_bytes),
        security=Security(tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                          auth_tokens=args.auth_tokens, max_streams_per_client=args.max_streams_per_client))

    def ready(server) -> None:
        where = host_port(config.host, server.port)
        print(f"GenServe listening on {where} (policy {config.engine.policy}, "
              f"{server.engine.executor.num_devices} {device} worker(s), models: "
              f"{', '.join(server.engine.cards)})", flush=True)
        if config.metrics_port:
            print(f"metrics on http://{host_port(config.host, config.metrics_port)}/metrics", flush=True)
        if args.demo:
            threading.Thread(target=_demo, args=(where,), daemon=True).start()

    try:
        config.validate()
        if config.engine.profile:  # a missing or malformed file: before any worker starts
            load_profile(config.engine.profile)
        for spec in config.models:  # likewise a checkpoint's path, not once the models before it loaded
            model_family(spec)
    except (ValueError, OSError) as err:  # e.g. --tls-cert without --tls-key, an unknown policy
        sys.exit(f"error: {err}")
    if args.demo and (args.tls_cert or args.auth_tokens):
        sys.exit("error: --demo talks to the server in plaintext without a token; leave out --tls-cert and "
                 "--auth-tokens, or try the secured server with `genserve generate --tls-ca FILE --token T`")
    try:
        run_server(config, ready)
    except (SecurityError, WorkerStartError, ListenError) as err:  # a bad certificate or token file; no
        sys.exit(f"error: {err}")                                   # device, a model that does not load; a port
    except KeyboardInterrupt:  # Ctrl-C while the workers start (they are stopped)
        sys.exit(130)



def _demo(target: str) -> None:
    """One image and one video through the API, each of a task the server
    serves (a server of one task demos that one); a failure is one line, and
    the server serves on either way."""
    import grpc

    from genserve.client import Client
    from genserve.v1 import genserve_pb2 as pb

    out = pathlib.Path("demo-out")
    out.mkdir(exist_ok=True)
    with Client(target) as client:
        served = {m.task for m in client.models()}
        for task, task_pb, fmt in (("image", pb.TASK_TEXT_TO_IMAGE, "png"), ("video", pb.TASK_TEXT_TO_VIDEO, "mp4")):
            if task_pb not in served:
                print(f"demo: no {task}: no served model does text-to-{task}", flush=True)
                continue
            try:
                resp = client.generate("a lighthouse on a cliff at dusk", task=task, seed=7, output_format=fmt)
            except grpc.RpcError as err:
                print(f"demo: {task} failed: {err.code().name}: {err.details()}", flush=True)
                continue
            path = out / f"demo-{task}{MIME_SUFFIX.get(resp.media.mime_type, '')}"
            path.write_bytes(resp.media.data)
            print(f"demo: {task} {resp.media.width}x{resp.media.height}x{resp.media.num_frames} "
                  f"in {resp.latency_ms:.0f} ms (SLO {resp.slo_ms} ms, met={resp.slo_met}) -> {path}",
                  flush=True)
    print("demo: done; the server keeps serving (Ctrl-C stops it)", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genserve", description="GenServe: step-level co-serving of "
                                     "text-to-image and text-to-video diffusion models over gRPC.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve(sub)
    add_generate(sub)
    add_models(sub)
    for add_parser in _subcommand_hooks():
        add_parser(sub)
    show_defaults(parser)
    return parser


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append each option's default to its help, in every subcommand, unless
    the help already tells it or there is none to tell (unset, off, empty, 0)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                show_defaults(subparser)
            continue
        default, text = action.default, action.help or ""
        if (not action.option_strings or text == argparse.SUPPRESS or action.nargs == 0
                or default is None or default is argparse.SUPPRESS or isinstance(default, bool)
                or default in ("", 0, [], ()) or "default" in text.lower()):
            continue
        action.help = f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _subcommand_hooks():
    from genserve.loadgen.cli import add_loadgen_parser
    from genserve.profile import add_profile_parser
    from genserve.scheduler.cli import add_simulate_parser

    return [add_profile_parser, add_simulate_parser, add_loadgen_parser]


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    logs.configure(logging.DEBUG if args.verbose else logging.INFO, getattr(args, "log_format", "text"))
    status = args.func(args)
    if isinstance(status, int) and status:  # a command that reports its exit status (simulate)
        sys.exit(status)


if __name__ == "__main__":
    main()
