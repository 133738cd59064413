"""Async client for the vLLM servers: segmented generation, prompt logprobs, routing over a
shared ServerPool. Independent of the launcher (the launcher imports this); weight updates are
`weight_sync`'s."""

from sdp_cli.inference.client import InferenceClient
from sdp_cli.inference.client_errors import (
    InferenceError,
    NoServerAvailableError,
    RequestFailedError,
    RequestRejectedError,
    ServerProtocolError,
    WeightsDirError,
    WeightUpdateError,
)
from sdp_cli.inference.pool import ServerPool, ServerState, ServerStatus, WeightsTarget
from sdp_cli.inference.protocol import SERVED_MODEL_NAME, parse_version
from sdp_cli.inference.types import Completion, Gate, SamplingParams, Segment

__all__ = [
    "SERVED_MODEL_NAME",
    "Completion",
    "Gate",
    "InferenceClient",
    "InferenceError",
    "NoServerAvailableError",
    "RequestFailedError",
    "RequestRejectedError",
    "SamplingParams",
    "Segment",
    "ServerPool",
    "ServerProtocolError",
    "ServerState",
    "ServerStatus",
    "WeightUpdateError",
    "WeightsDirError",
    "WeightsTarget",
    "parse_version",
]
