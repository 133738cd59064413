"""The `simulate.*` keys: the simulator's latencies and lengths (`sdp simulate`)."""

from __future__ import annotations

from dataclasses import dataclass

from sdp_cli.config.setting import setting


@dataclass
class SimulateConfig:
    """Simulated servers and trainer for `sdp simulate` (capacity planning, CPU smoke runs)."""

    token_latency_s: float = setting(
        0.002, ge=0, help="mean seconds per generated token for one request"
    )
    token_latency_per_seq_s: float = setting(
        0.0,
        ge=0,
        help="more mean seconds per token for each request decoding on the same server at the "
        "time, itself included (a server decodes its batch in one step, slower as it grows)",
    )
    prefill_s: float = setting(
        0.0,
        ge=0,
        help="mean seconds to prefill one request's prompt (every segment) before its first "
        "token; a server prefills one request at a time, first come first served, and its "
        "decoding requests wait meanwhile",
    )
    latency_jitter: float = setting(
        0.3, ge=0, help="relative spread (lognormal sigma) of per-token and prefill latency"
    )
    server_batch: int = setting(32, ge=1, help="requests one simulated server decodes at once")
    mean_new_tokens: int = setting(16, ge=1, help="mean tokens per completion")
    new_tokens: list[int] = setting(
        factory=list,
        ge=1,
        help="completion lengths, each drawn as often (--calibrate sets a run's quantiles, "
        "so a run whose completions stop at rollout.max_new_tokens is simulated so); [] draws "
        "from a gamma distribution with mean simulate.mean_new_tokens",
    )
    train_step_s: float = setting(0.05, ge=0, help="seconds per simulated training step")
    export_s: float = setting(
        0.0,
        ge=0,
        help="seconds the trainer spends writing the weights in a simulated weight update, "
        "before the servers reload (the trainer waits for it even with train.overlap_reload)",
    )
    update_s: float = setting(
        0.01,
        ge=0,
        help="seconds of a simulated weight update besides the export: the servers' reload, "
        "version change and resume (the trainer trains meanwhile with train.overlap_reload)",
    )
    time_scale: float = setting(
        0.0, ge=0, help="wall seconds per simulated second; 0 runs in virtual time"
    )
    uninformative_fraction: float = setting(
        0.0,
        ge=0,
        le=1,
        help="share of simulated groups whose rewards are all equal (uninformative under "
        "rollout.filter_groups=same_reward)",
    )
    turns: list[int] = setting(
        factory=list,
        ge=1,
        help="episodes: model turns per episode, each drawn as often (e.g. [1,2,3,4,5,6]); "
        "[] simulates single completions. Each turn's length is drawn as one completion's",
    )
    env_latency_s: float = setting(
        0.0,
        ge=0,
        help="episodes: mean seconds the environment takes between two model turns (a tool "
        "call), lognormal with simulate.latency_jitter; the servers serve other requests "
        "meanwhile",
    )
    env_tokens: int = setting(
        8, ge=0, help="episodes: context tokens each environment turn adds (never trained)"
    )
    seed: int = setting(0, help="seed of the simulated latencies and lengths")
