"""Log lines for people (``text``, the default) or for log pipelines
(``json``: one object per line), the same in the server and in its worker
processes, which configure their own logging (they are spawned).

A JSON line holds ``time`` (UTC, ISO 8601 with milliseconds), ``level``,
``logger``, ``process`` (``server`` or ``workerN``) and ``message``, plus
``exception`` (the formatted traceback) when there is one. In JSON mode the
``warnings`` module and the diffusers and transformers loggers (which keep
handlers of their own) go through the same handler, and their progress bars
are off, so every line on stderr is an object.
"""
from __future__ import annotations

import json
import logging
import sys
import time

FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out = {"time": f"{stamp}.{int(record.msecs):03d}Z", "level": record.levelname,
               "logger": record.name, "process": self.process, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False)


def configure(level: int, fmt: str = "text", process: str = "server") -> None:
    """Send this process's log records to stderr in ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        name = "%(name)s" if process == "server" else process
        handler.setFormatter(logging.Formatter(f"%(asctime)s {name} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(fmt == "json")
    if fmt == "json":
        _libraries_through_root(load=process != "server")


def _libraries_through_root(load: bool) -> None:
    """diffusers and transformers log through handlers of their own and draw
    tqdm bars; route their records to the root handler and drop the bars.
    Workers (``load``) import them to do so; the server only fixes those
    already imported (it runs no model, and importing them takes seconds).
    Either may be missing (the torch-free scheduler needs neither)."""
    for name in ("diffusers", "transformers"):
        if not load and name not in sys.modules:
            continue
        try:
            lib = __import__(f"{name}.utils.logging", fromlist=["logging"])
        except ImportError:
            continue
        lib.disable_default_handler()
        lib.enable_propagation()
        lib.disable_progress_bar()
