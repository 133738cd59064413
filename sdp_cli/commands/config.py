"""`sdp config show`: print the fully resolved config."""

from __future__ import annotations

import sys
from typing import TextIO

from sdp_cli.config import SdpConfig, config_to_yaml


def config_show(cfg: SdpConfig, out: TextIO | None = None) -> None:
    (out or sys.stdout).write(config_to_yaml(cfg))
