"""Plumbing every part may use (it imports nothing else of sdp_cli): an asyncio loop on its own
thread, and a directory written atomically."""

from sdp_cli.common.atomic import atomic_dir, fsync_tree
from sdp_cli.common.loop_thread import LoopThread

__all__ = ["LoopThread", "atomic_dir", "fsync_tree"]
