"""The client commands of ``genserve``: ``generate`` (one image or video
through a running server, saved to a file) and ``models``, with the client
flags (target, TLS, token) they share with ``loadgen``."""
from __future__ import annotations

import os
import pathlib
import re
import sys
import threading
import time

MIME_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "video/mp4": ".mp4",
               "image/gif": ".gif", "application/octet-stream": ".raw"}
OUTPUT_FORMATS = ("png", "jpeg", "jpg", "webp", "mp4", "gif", "raw")  # for --format; jpg is jpeg
FORMAT_ALIASES = {"jpg": "jpeg"}
SUFFIX_FORMAT = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".mp4": "mp4", ".gif": "gif",
                 ".raw": "raw"}  # -o's extension (any case) implies --format


def add_client_args(p) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="server HOST:PORT")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's trusted roots")
    p.add_argument("--tls-ca", default="", metavar="FILE", help="use TLS, trusting this PEM CA bundle")
    p.add_argument("--tls-client-cert", default="", metavar="FILE", help="client certificate (mutual TLS)")
    p.add_argument("--tls-client-key", default="", metavar="FILE", help="key of --tls-client-cert")
    p.add_argument("--token", default=os.environ.get("GENSERVE_TOKEN", ""),
                   help="bearer token (default: $GENSERVE_TOKEN, which keeps it out of ps)")


def client_options(args) -> dict:
    """``Client`` keyword arguments from the shared client flags; SecurityError
    (a ValueError) names the flag of a TLS file that is missing or malformed,
    ValueError a token that cannot be sent."""
    from genserve.client import check_token
    from genserve.security import channel_credentials

    tls = args.tls or args.tls_ca or args.tls_client_cert or args.tls_client_key
    credentials = channel_credentials(args.tls_ca, args.tls_client_cert, args.tls_client_key) if tls else None
    try:
        token = check_token(args.token)
    except ValueError as err:
        raise ValueError(f"--token (or $GENSERVE_TOKEN): {err}") from None
    return {"credentials": credentials, "token": token}


def _client_options_or_exit(args) -> dict:
    try:
        return client_options(args)
    except ValueError as err:
        sys.exit(f"error: {err}")


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate one image or video through a running server")
    add_client_args(p)
    p.add_argument("prompt")
    p.add_argument("--task", choices=("image", "video"), default="image")
    p.add_argument("--model", default="", help="model name (default: the server's default for the task)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--frames", type=int, help="video frames")
    p.add_argument("--fps", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--seed", type=int, help="signed 64-bit (default: random, printed at the end)")
    p.add_argument("--slo-ms", type=int, default=0)
    p.add_argument("--format", default="", type=str.lower, choices=OUTPUT_FORMATS, metavar="FORMAT",
                   help="png|jpeg (or jpg)|webp (images), mp4|gif|webp (videos), raw; any case "
                        "(default: the one -o's extension names, if it does, else png for images, mp4 for "
                        "videos; a --format other than -o's extension is refused)")
    p.add_argument("--request-id", default="")
    p.add_argument("-o", "--output", metavar="PATH",
                   help="output file, or an existing folder to write the default name in (default: "
                        "<request id>.<ext> in the current folder, the id made safe as a file name: "
                        "characters other than A-Z a-z 0-9 . _ - and leading dots become _). "
                        "Its folder must exist; checked before the request is sent")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> None:
    from genserve.client import INT64_MAX, INT64_MIN, UINT32_MAX, Client

    for flag in ("width", "height", "frames", "fps", "steps", "slo_ms"):
        value = getattr(args, flag)
        if value is not None and not 0 <= value <= UINT32_MAX:  # unsigned 32-bit fields
            sys.exit(f"error: --{flag.replace('_', '-')} must be in 0..{UINT32_MAX}, got {value}")
    if args.seed is not None and not INT64_MIN <= args.seed <= INT64_MAX:  # signed 64-bit
        sys.exit(f"error: --seed must be in {INT64_MIN}..{INT64_MAX}, got {args.seed}")
    fmt = FORMAT_ALIASES.get(args.format, args.format)
    folder, path = _output_target(args.output)
    implied = SUFFIX_FORMAT.get(path.suffix.lower()) if path is not None else None
    if implied and fmt and fmt != implied:
        sys.exit(f"error: -o {args.output} names {implied} output but --format is {args.format}; "
                 "leave out --format or change the extension")
    fmt = fmt or implied or ""
    options = _client_options_or_exit(args)
    try:
        with Client(args.target, **options) as client:
            _generate(client, args, fmt, folder, path)
    except KeyboardInterrupt:  # Ctrl-C: _generate cancelled the call, which cancels the request
        print("cancelled", file=sys.stderr, flush=True)
        sys.exit(130)


def _generate(client, args, fmt: str, folder: pathlib.Path, path: pathlib.Path | None) -> None:
    import grpc
    from tqdm import tqdm

    from genserve.v1 import genserve_pb2 as pb

    T = pb.GenerateEvent.Type
    try:
        stream = client.stream(args.prompt, task=args.task, model=args.model, negative_prompt=args.negative_prompt,
                               width=args.width, height=args.height, num_frames=args.frames, fps=args.fps,
                               steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                               slo_ms=args.slo_ms, output_format=fmt, request_id=args.request_id)
    except ValueError as err:  # a field build_request cannot send (the flags are checked above)
        sys.exit(f"error: {err}")
    # shown after 0.3 s: a call refused at once prints its error line alone
    bar = _held_interrupt(lambda: tqdm(total=0, unit="step", desc="queued", file=sys.stderr,
                                       delay=0.3))
    try:
        for ev in stream:
            # refresh=False and update(0): tqdm draws only after its delay, and
            # ends its line on close only if update() drew it (refresh() ignores both)
            if ev.type == T.STEP:
                bar.total = ev.num_steps
                bar.n = ev.step
                bar.set_postfix_str(f"eta {ev.eta_s:.1f}s", refresh=False)
            elif ev.type in (T.STARTED, T.RESUMED, T.PREEMPTED, T.RESHARDED):
                bar.set_description(T.Name(ev.type).lower() + (f" sp={ev.sp_degree}" if ev.sp_degree else ""),
                                    refresh=False)
            elif ev.type == T.COMPLETED:
                bar.close()
                _save(ev.response, folder, path)
                return
            elif ev.type in (T.FAILED, T.CANCELLED):
                bar.close()
                code = ev.status_code or T.Name(ev.type)  # as Generate's RpcError would name it
                sys.exit(f"error: {code}: {ev.reason or T.Name(ev.type).lower()}")
            bar.update(0)
    except grpc.RpcError as err:
        bar.close()
        sys.exit(f"error: {err.code().name}: {err.details()}")
    except KeyboardInterrupt:
        stream.cancel()  # ends the server's stream, which abandons the request there
        bar.close()
        _let_grpc_settle()
        raise


def _let_grpc_settle(timeout_s: float = 1.0) -> None:
    """After a cancel, give gRPC's threads (named for its ``_run`` wrapper)
    up to ``timeout_s`` to finish the call before the channel closes and the
    interpreter exits: one still running then can fail, and it printed half
    a traceback after "cancelled" (seen once in CI). Whatever fails after
    that stays quiet: the process is ending on the user's word."""
    threading.excepthook = lambda args: None
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and thread.name.endswith("(_run)"):
            thread.join(max(0.0, deadline - time.monotonic()))


def _held_interrupt(make):
    """``make()`` with Ctrl-C held until it returns, then raised. A Ctrl-C
    inside tqdm's constructor leaves a half-made bar whose finaliser prints a
    traceback at exit, after the one-line message."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return make()
    held = []
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        made = make()
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if held:
        raise KeyboardInterrupt
    return made


def _output_target(output: str | None) -> tuple[pathlib.Path, pathlib.Path | None]:
    """(folder, file) that ``-o`` names; file None: the default name in folder.
    Exits with one line if the result could not be written there, before
    anything is sent."""
    if output is None:
        folder = pathlib.Path(".")
        if not os.access(folder, os.W_OK | os.X_OK):
            sys.exit("error: the current folder is not writable; give -o PATH")
        return folder, None
    path = pathlib.Path(output)
    if output.endswith(("/", os.sep)) or path.is_dir():
        folder, path = path, None
    else:
        folder = path.parent
    if not folder.exists():
        sys.exit(f"error: -o {output}: folder {folder} does not exist")
    if not folder.is_dir():
        sys.exit(f"error: -o {output}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (path is not None and path.exists()
                                                   and not os.access(path, os.W_OK)):
        sys.exit(f"error: -o {output}: not writable")
    return folder, path


def _safe_name(request_id: str) -> str:
    """``request_id`` as one harmless file name: only A-Z a-z 0-9 . _ -, no
    leading dot (so never '.', '..' or hidden)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", request_id)
    name = re.sub(r"^\.+", lambda m: "_" * len(m.group()), name)
    return name or "output"


def _save(resp, folder: pathlib.Path, path: pathlib.Path | None) -> None:
    if path is None:
        path = folder / (_safe_name(resp.request_id) + MIME_SUFFIX.get(resp.media.mime_type, ""))
    try:
        path.write_bytes(resp.media.data)
    except OSError as err:  # e.g. the disk filled, or the folder went away during the generation
        sys.exit(f"error: cannot write {path}: {err.strerror or err}")
    m = resp.media
    print(f"{path}: {m.mime_type} {m.width}x{m.height}, {m.num_frames} frame(s); "
          f"latency {resp.latency_ms:.0f} ms (queue {resp.queue_ms:.0f} ms), SLO {resp.slo_ms} ms "
          f"{'met' if resp.slo_met else 'missed'}, preemptions {resp.num_preemptions}, "
          f"SP degrees {list(resp.sp_degrees)}, seed {resp.seed}")


def add_models(sub) -> None:
    p = sub.add_parser("models", help="list the models a running server serves")
    add_client_args(p)
    p.set_defaults(func=cmd_models)


def cmd_models(args) -> None:
    import grpc

    from genserve.client import Client
    from genserve.v1 import genserve_pb2 as pb

    options = _client_options_or_exit(args)
    try:
        with Client(args.target, **options) as client:
            models = client.models()
    except grpc.RpcError as err:
        sys.exit(f"error: {err.code().name}: {err.details()}")
    print(f"{'name':<24}{'task':<8}{'default':<9}{'size (max)':<22}{'frames (max)':<14}{'steps (max)':<13}"
          "max SP")
    for m in models:
        task = "image" if m.task == pb.TASK_TEXT_TO_IMAGE else "video"
        print(f"{m.name:<24}{task:<8}{'yes' if m.is_default else '':<9}"
              f"{f'{m.default_width}x{m.default_height} ({m.max_width}x{m.max_height})':<22}"
              f"{f'{m.default_num_frames} ({m.max_num_frames})':<14}{f'{m.default_steps} ({m.max_steps})':<13}"
              f"{m.max_sp_degree or '-'}")
