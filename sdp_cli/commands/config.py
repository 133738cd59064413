"""`sdp config show`: print the fully resolved config, optionally with each key's help."""

from __future__ import annotations

import sys
from typing import TextIO

from sdp_cli.config import SdpConfig, config_to_yaml
from sdp_cli.config.reference import explained_yaml


def config_show(cfg: SdpConfig, out: TextIO | None = None, *, explain: bool = False) -> None:
    (out or sys.stdout).write(explained_yaml(cfg) if explain else config_to_yaml(cfg))
