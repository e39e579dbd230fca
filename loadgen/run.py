"""One load-generator run end to end: send, scrape, record, summarize, plot.

``run_load`` drives the async loop (uvloop when available) and returns the
records; ``write_run`` writes a run directory:

    requests.jsonl   one RequestRecord per request (``records.py``)
    summary.json     ``summarize(records)`` plus the run's settings
    workload.jsonl   the requests sent, as a trace (given the workload's items)
    metrics.jsonl    scraped gauges (only with a metrics URL)
    *.png            latency CDF, attainment over time, queue depth
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import grpc
from tqdm import tqdm

from genserve.client import FORMATS, AsyncClient, Client
from genserve.scheduler.workload import TraceRequest, write_trace
from genserve.v1 import genserve_pb2 as pb

from .plots import run_plots
from .records import RequestRecord, read_records, write_records
from .runner import Clock, RunOptions, closed_loop, new_id_prefix, open_loop
from .scrape import MetricSample, Scraper, write_samples
from .summary import Summary, format_table, summarize


@dataclass(frozen=True, slots=True)
class RunResult:
    """What a run produced; the summary is recomputed from ``records``."""

    records: tuple[RequestRecord, ...]
    samples: tuple[MetricSample, ...] = ()
    started_unix_s: float = 0.0
    elapsed_s: float = 0.0
    settings: dict = field(default_factory=dict)


TASKS = {pb.TASK_TEXT_TO_IMAGE: "image", pb.TASK_TEXT_TO_VIDEO: "video"}


class PreflightError(ValueError):
    """A server that cannot take the run: it does not answer, or does not
    serve what the workload asks for. The message is one line."""


def check_server(target: str, client_options: dict | None = None,
                 wait_s: float = 10.0) -> list[pb.ModelInfo]:
    """The models ``target`` serves: the pre-flight call of a run. Waits up to
    ``wait_s`` for the server to come up; PreflightError (with the gRPC status)
    if it does not answer, or refuses the call (e.g. a bad token)."""
    with Client(target, **(client_options or {})) as client:
        try:
            try:
                return client.models(timeout_s=wait_s, wait_for_ready=True)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                # Still not connected: without waiting, the call fails at once with the reason
                # (connection refused, name not resolved, TLS handshake ...).
                return client.models(timeout_s=1.0)
        except grpc.RpcError as err:
            code = err.code()
            what = ("cannot reach the server" if code in (
                grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN)
                else "the server refused the pre-flight ListModels call")
            reason = " ".join((err.details() or "").split())
            raise PreflightError(f"{what} at {target}: {code.name}: {reason}") from None


def check_workload(items: Sequence[TraceRequest], models: Sequence[pb.ModelInfo],
                   output_format: str = "", target: str = "the server") -> None:
    """PreflightError unless ``models`` (ListModels) serve each class of
    ``items`` (a model of one of its requests, "" being the default) in
    ``output_format``: a run whose images or videos could only fail is not
    started. Single requests the server will refuse (a trace may hold some)
    are its business, recorded as they come."""
    served = ", ".join(f"{m.name} ({TASKS.get(m.task, '?')})" for m in models) or "nothing"
    fmt = FORMATS[output_format.lower()]
    for task in sorted({t.task for t in items}):
        names = sorted({t.model for t in items if t.task == task})
        found = [m for m in models if TASKS.get(m.task) == task
                 and (m.name in names or ("" in names and m.is_default))]
        if not found:
            asked = ", ".join(repr(n) if n else "the default" for n in names)
            raise PreflightError(f"{target} serves no {task} model for the workload (asked for: "
                                 f"{asked}; it serves: {served})")
        for model in found:
            if fmt and fmt not in model.output_formats:
                offered = "|".join(pb.OutputFormat.Name(f).removeprefix("OUTPUT_FORMAT_").lower()
                                   for f in model.output_formats)
                raise PreflightError(f"output format {output_format}: {target}'s {task} model "
                                     f"{model.name} offers {offered}")


def _loop_factory():
    try:
        import uvloop
    except ImportError:  # e.g. Windows: the default loop keeps up at these rates
        return None
    return uvloop.new_event_loop


async def _drive(items: Sequence[TraceRequest], opts: RunOptions, clock: Clock,
                 client_options: dict, stop: asyncio.Event | None = None) -> list[RequestRecord]:
    total = len(items) if not (opts.concurrency and opts.duration_s) else None
    bar = tqdm(total=total, unit="req", desc="loadgen", file=sys.stderr, disable=not opts.progress,
               dynamic_ncols=True)
    counts = {"ok": 0, "met": 0, "err": 0}

    def done(record: RequestRecord) -> None:
        counts["ok" if record.ok else "err"] += 1
        counts["met"] += record.slo_met
        bar.update(1)
        bar.set_postfix(counts, refresh=False)

    try:
        async with AsyncClient(opts.target, **client_options) as client:
            loop = closed_loop if opts.concurrency > 0 else open_loop
            return await loop(client, items, opts, clock, done, stop)
    finally:
        bar.close()


async def _drive_until_sigint(items, opts, clock, client_options) -> tuple[list[RequestRecord], bool]:
    """``_drive``, with the first Ctrl-C ending it early (a second one
    interrupts as usual): (records, interrupted)."""
    import signal

    loop, stop = asyncio.get_running_loop(), asyncio.Event()

    def first() -> None:
        loop.remove_signal_handler(signal.SIGINT)
        stop.set()
    try:
        loop.add_signal_handler(signal.SIGINT, first)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread; Windows
        return await _drive(items, opts, clock, client_options), False
    try:
        records = await _drive(items, opts, clock, client_options, stop)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    return records, stop.is_set()


def run_load(items: Sequence[TraceRequest], opts: RunOptions, metrics_url: str = "",
             scrape_interval_s: float = 0.5, settings: dict | None = None,
             client_options: dict | None = None, stop_on_sigint: bool = False) -> RunResult:
    """Send ``items`` to ``opts.target`` and wait for every outcome; ``settings``
    (e.g. the workload's options) is kept for summary.json; ``client_options``
    (``credentials``, ``token``) go to the client and are not recorded. Without
    ``opts.id_prefix`` the run's request ids get a fresh prefix (``lg-`` and a
    random tag, in ``settings["run"]``), so concurrent runs never share one. With
    ``stop_on_sigint``, Ctrl-C stops sending and cancels the requests still
    open (their records say CANCELLED), and the result is of what was sent
    (``settings["interrupted"]``); else it raises KeyboardInterrupt as usual."""
    opts = replace(opts, id_prefix=opts.id_prefix or new_id_prefix())  # (recorded in settings)
    clock = Clock()
    started = time.time()
    scraper = Scraper(metrics_url, clock.t0, scrape_interval_s).start() if metrics_url else None
    interrupted = False
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            if stop_on_sigint:
                records, interrupted = runner.run(_drive_until_sigint(items, opts, clock, client_options or {}))
            else:
                records = runner.run(_drive(items, opts, clock, client_options or {}))
    finally:
        samples = scraper.stop() if scraper else []
    settings = {**(settings or {}), "run": asdict(opts), "metrics_url": metrics_url,
                "tls": bool((client_options or {}).get("credentials")), "interrupted": interrupted}
    return RunResult(tuple(sorted(records, key=lambda r: r.index)), tuple(samples), started,
                     clock(), settings)


def sent_trace(items: Sequence[TraceRequest], records: Sequence[RequestRecord]) -> list[TraceRequest]:
    """The requests of ``records`` as a trace that ``--trace`` replays at the
    times they were sent: open loop, the items as planned; closed loop (no
    planned time), each at its send time, seconds since the run's start."""
    return [items[r.index] if r.intended_s >= 0 else replace(items[r.index], arrival_s=round(r.send_s, 6))
            for r in records]


def write_run(out_dir: str | Path, result: RunResult, items: Sequence[TraceRequest] | None = None,
              *, plots: bool = True, quiet: bool = False) -> Summary:
    """Write the run directory (see the module docstring; ``workload.jsonl``
    when given the ``items`` the run was handed); returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_records(out / "requests.jsonl", result.records)
    if items is not None:
        write_trace(out / "workload.jsonl", sent_trace(items, result.records))
    summary = summarize(result.records)
    doc = {"summary": summary.to_dict(), "settings": result.settings,
           "started_unix_s": result.started_unix_s, "elapsed_s": result.elapsed_s}
    (out / "summary.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    if result.samples:
        write_samples(out / "metrics.jsonl", result.samples)
    if plots:
        run_plots(result.records, result.samples, out)
    if not quiet:
        print(format_table(summary))
    if summary.rate_warning:
        print(f"warning: achieved send rate {summary.achieved_rate_per_s:.3f}/s vs intended "
              f"{summary.intended_rate_per_s:.3f}/s", file=sys.stderr)
    return summary


def resummarize(run_dir: str | Path) -> Summary:
    """The summary of a run directory, recomputed from its ``requests.jsonl``."""
    return summarize(read_records(Path(run_dir) / "requests.jsonl"))
