"""One line per request: the ``requests.jsonl`` format and its reader/writer.

Every request the load generator plans is recorded exactly once, whatever its
outcome (OK, a FAILED event, a gRPC error at submit, a client-side timeout or
a cancellation at the end of the run). Times are seconds since the start of
the run on the generator's monotonic clock; ``queue_ms`` and ``latency_ms``
are what the server reported (0 when it reported nothing).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator

OK = "OK"


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """The outcome of one request, as written to ``requests.jsonl``."""

    req_id: str
    index: int  # position in the planned workload (0-based)
    task: str  # image | video
    model: str  # as sent ("" = the server's default for the task)
    width: int
    height: int
    num_frames: int
    num_steps: int
    intended_s: float  # planned send time (open loop); -1 in closed loop
    send_s: float  # when the RPC was issued
    first_event_s: float  # first streamed event (-1: none arrived)
    finish_s: float  # terminal event or error
    status: str  # gRPC status code name; OK when COMPLETED
    slo_ms: float  # the server's SLO when it reported one, else the one sent (0 = default)
    slo_met: bool
    num_preemptions: int = 0
    sp_degrees: tuple[int, ...] = ()
    queue_ms: float = 0.0  # server: arrival to first step
    latency_ms: float = 0.0  # server: arrival to result
    warmup: bool = False  # excluded from the summary
    reason: str = ""  # error message, if any

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def client_latency_ms(self) -> float:
        """End to end as the client saw it (send to terminal event)."""
        return (self.finish_s - self.send_s) * 1000.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["sp_degrees"] = list(self.sp_degrees)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RequestRecord":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["sp_degrees"] = tuple(values.get("sp_degrees", ()))
        return cls(**values)


def write_records(path: str | Path, records: Iterable[RequestRecord]) -> None:
    """Write records as JSON lines, sorted by planned index."""
    with open(path, "w", encoding="utf-8") as fh:
        for rec in sorted(records, key=lambda r: r.index):
            fh.write(json.dumps(rec.to_dict(), sort_keys=True) + "\n")


def iter_records(path: str | Path) -> Iterator[RequestRecord]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield RequestRecord.from_dict(json.loads(line))


def read_records(path: str | Path) -> list[RequestRecord]:
    """Every record of a ``requests.jsonl`` file."""
    return list(iter_records(path))
