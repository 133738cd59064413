"""sdp: segment-wise decoupled PPO on vLLM."""

__version__ = "0.1.0"
