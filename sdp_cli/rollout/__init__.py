"""Trajectories, staleness control, strategies, the rollout executor, proximal recompute."""
