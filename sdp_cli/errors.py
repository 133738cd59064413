"""Errors that the CLI turns into a short message and exit code 2, never a traceback."""

from __future__ import annotations


class SdpError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(SdpError):
    """A bad configuration value; `key` is the dotted key path."""

    def __init__(self, key: str, problem: str, fix: str = "") -> None:
        self.key = key
        self.problem = problem
        self.fix = fix
        text = f"config error at '{key}': {problem}"
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)


class MissingDependencyError(SdpError):
    """A package the command needs is not installed."""


class EpisodeRejected(SdpError):
    """An episode's environment or agent raised, timed out or broke the protocol: its rollout
    is rejected (reason `environment`) and the run goes on. `kind` names the failure so that
    each kind is logged once."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
