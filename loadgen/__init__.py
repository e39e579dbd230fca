"""Load generator: open and closed loop gRPC load against a live server.

Entry points: ``genserve loadgen`` (mounted with ``cli.add_loadgen_parser``)
and ``python -m genserve.loadgen``. The summary of a run is a pure function
of its records: ``summarize(read_records("OUT/requests.jsonl"))``.
"""
from .records import RequestRecord, read_records, write_records
from .summary import Summary, format_table, summarize

__all__ = ["RequestRecord", "Summary", "format_table", "read_records", "summarize", "write_records"]
