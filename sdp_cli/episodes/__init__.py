"""Multi-turn episodes: a conversation of model turns and environment turns trained as one
trajectory (docs/design.md, Episodes).

- `episode.py`: `Episode`, the exact ids of every turn with the per-token trained mask;
- `turns.py`: `TurnSession`, what a driver (the built-in multi-turn workflow, or the OpenAI
  gateway) calls to generate one model turn and append turns to its episode;
- `environment.py`: the Python environment protocol and `task.env` loading;
- `multiturn.py`: the workflow that plays `rollout.n_samples` episodes of one instance.
"""
