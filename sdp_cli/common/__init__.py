"""Plumbing every part may use (it imports nothing else of sdp_cli): an asyncio loop on its own
thread, and files and directories written atomically."""

from sdp_cli.common.atomic import atomic_dir, fsync_tree, write_text_atomically
from sdp_cli.common.loop_thread import LoopThread

__all__ = ["LoopThread", "atomic_dir", "fsync_tree", "write_text_atomically"]
