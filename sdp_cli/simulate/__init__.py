"""Simulated vLLM servers and trainer driving the real rollout executor (`sdp simulate`)."""

from sdp_cli.simulate.run import parse_sweep, run_simulation, run_sweep

__all__ = ["parse_sweep", "run_simulation", "run_sweep"]
