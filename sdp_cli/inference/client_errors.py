"""Errors of the inference client; all are SdpError so the CLI prints them without a traceback."""

from __future__ import annotations

from sdp_cli.errors import SdpError


class InferenceError(SdpError):
    """A request to the inference servers failed for good."""


class NoServerAvailableError(InferenceError):
    """No server could take a request: all are dead, or none became ready in time."""


class RequestFailedError(InferenceError):
    """A request kept failing (connection errors, timeouts, server errors) after all retries."""


class PoisonRequestError(RequestFailedError):
    """Servers died while serving this request, twice with no other suspect beside it."""


class RequestRejectedError(InferenceError):
    """A server answered 4xx: the request itself is wrong, so retrying elsewhere cannot help."""


class ServerProtocolError(InferenceError):
    """A server answered something sdp cannot interpret (missing fields, unknown version)."""


class WeightsDirError(InferenceError):
    """The weights directory handed to a weight update is missing or incomplete."""


class WeightUpdateError(InferenceError):
    """The weight-update protocol failed on every server it was run on."""
