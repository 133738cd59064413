"""What every part writes: the event schema, the run log (events.jsonl) writer and reader, and
the metrics backends fed the same events. Reads no other sdp part; views of the events live in
`sdp_cli.views`."""

from sdp_cli.events.event_log import EventLog, EventSink, NullEventLog, read_events

__all__ = ["EventLog", "EventSink", "NullEventLog", "read_events"]
