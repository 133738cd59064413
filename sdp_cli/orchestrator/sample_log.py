"""`RUN_DIR/samples.jsonl`: completions a person can read.

Every training step writes a few of the completions it trained on, and the rollouts dropped as
stale are written with their reason (at most `log.samples_per_step` per version, since a purge
can drop thousands). Each line: `kind` (`trained` or `dropped`), step, version, the prompt,
the completion text, its reward, its token-version spans and its head and tail lag. With
`log.eval_samples`, every held-out evaluation completion is written too (`kind` `eval`: step,
version, `prompt_index`, prompt, completion, reward), so what the model still gets wrong can be
read. An episode's line also has its `turns` (`{role, text, n_tokens, trained}`), `end_reason`,
`env_s` and `generate_s`; its `completion` is every token after the first prompt, model and
environment turns together, and its version spans are over those tokens (a context token has
the version of the model token before it).
`sdp samples RUN_DIR` shows them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sdp_cli.orchestrator.evaluate import EvalCompletion
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory

SAMPLES_FILE = "samples.jsonl"


def version_spans(versions: Sequence[int]) -> list[list[int]]:
    """[[version, start, end], ...]: output tokens [start, end) were sampled by `version`."""
    spans: list[list[int]] = []
    for index, version in enumerate(versions):
        if spans and spans[-1][0] == version:
            spans[-1][2] = index + 1
        else:
            spans.append([version, index, index + 1])
    return spans


def episode_record(sample: Trajectory) -> dict[str, Any]:
    """An episode's turns (`{role, text, n_tokens, trained}`, OpenAI roles), why it ended and
    its seconds in the environment; nothing for a single completion."""
    if sample.turns is None:
        return {}
    return {
        "turns": sample.turns,
        "n_trained": sample.n_trained,
        "end_reason": sample.end_reason,
        "env_s": sample.env_s,
        "generate_s": sample.generate_s,
    }


class SampleLog:
    """Appends sample records; thread-safe (drops arrive on the executor loop)."""

    def __init__(
        self,
        path: Path,
        decode: Callable[[list[int]], str],
        per_step: int,
        with_dropped: bool,
        with_eval: bool = False,
    ) -> None:
        self.path = Path(path)
        self.decode = decode
        self.per_step = per_step
        self.with_dropped = with_dropped
        self.with_eval = with_eval
        self._lock = threading.Lock()
        self._file = self.path.open("a", encoding="utf-8")
        self._dropped_at: dict[int, int] = {}

    def record(self, sample: Trajectory, group: RolloutGroup, version: int) -> dict[str, Any]:
        head, tail = sample.head_version, sample.tail_version
        return {
            "rollout_id": group.rollout_id,
            "position": group.meta.get("position"),
            "prompt": group.meta.get("prompt"),
            "completion": self.decode(list(sample.output_ids)),
            "reward": sample.reward,
            "n_tokens": len(sample.output_ids),
            "version_spans": version_spans(sample.versions),
            "head_lag": None if head is None else version - head,
            "tail_lag": None if tail is None else version - tail,
        } | episode_record(sample)

    def trained(self, step: int, version: int, groups: Sequence[RolloutGroup]) -> None:
        """The first `per_step` completions of the batch trained at `step` on `version`."""
        chosen = [(s, g) for g in groups for s in g.samples][: self.per_step]
        for sample, group in chosen:
            self._write(
                {"kind": "trained", "step": step, "version": version}
                | self.record(sample, group, version)
            )

    def dropped(self, group: RolloutGroup, reason: str, point: str, version: int) -> None:
        """A group dropped as stale: its first completion, up to `per_step` per version."""
        if not self.with_dropped or not group.samples:
            return
        with self._lock:
            count = self._dropped_at.get(version, 0)
            if count >= self.per_step:
                return
            self._dropped_at[version] = count + 1
        self._write(
            {"kind": "dropped", "reason": reason, "point": point, "version": version}
            | self.record(group.samples[0], group, version)
        )

    def evaluated(self, step: int, version: int, completions: Sequence[EvalCompletion]) -> None:
        """Every completion of the held-out evaluation before training step `step`."""
        if not self.with_eval:
            return
        for completion in completions:
            record: dict[str, Any] = {
                "kind": "eval",
                "step": step,
                "version": version,
                "prompt_index": completion.prompt_index,
                "prompt": completion.prompt,
                "completion": completion.completion,
                "reward": completion.reward,
            }
            if completion.turns is not None:
                record |= {"turns": completion.turns, "end_reason": completion.end_reason}
            self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False)
        with self._lock:
            if not self._file.closed:
                self._file.write(line + "\n")
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_samples(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a samples file; a truncated last line is skipped."""
    with Path(path).open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record
