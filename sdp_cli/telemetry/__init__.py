"""Run log (events.jsonl) writer and reader, metrics, dashboard. Reads no other sdp part."""

from sdp_cli.telemetry.events import EventLog, EventSink, NullEventLog, read_events

__all__ = ["EventLog", "EventSink", "NullEventLog", "read_events"]
