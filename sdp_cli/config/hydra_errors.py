"""Turn Hydra / OmegaConf exceptions into ConfigError with the key path and the allowed values."""

from __future__ import annotations

import re

from hydra.errors import MissingConfigException
from omegaconf.errors import OmegaConfBaseException

from sdp_cli.errors import ConfigError


def _chain(exc: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in found:
        found.append(seen)
        seen = seen.__cause__ or seen.__context__
    return found


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else text


def _keyed_omegaconf_error(exc: BaseException) -> OmegaConfBaseException | None:
    for item in _chain(exc):
        if isinstance(item, OmegaConfBaseException) and getattr(item, "full_key", None):
            return item
    return None


def _missing_group_option(exc: MissingConfigException) -> ConfigError:
    text = str(exc)
    match = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
    if match:
        group, option = match.groups()
        return ConfigError(
            group, f"no option '{option}' in config group '{group}'", f"use one of {options}"
        )
    return ConfigError("conf", _first_line(text))


def config_error_from_exception(exc: BaseException) -> ConfigError:
    keyed = _keyed_omegaconf_error(exc)
    if keyed is not None:
        key = str(keyed.full_key)
        msg = _first_line(str(keyed))
        if "not in struct" in msg or re.search(r"Key '[^']+' not in '", msg):
            return ConfigError(
                key,
                "unknown key",
                "remove it or check its spelling; `sdp config show` lists every key",
            )
        if "expected one of" in msg:
            allowed = msg.split("expected one of", 1)[1].strip()
            return ConfigError(key, msg, f"set {key} to one of {allowed}")
        wanted = re.search(r"converted to (\w+)", msg)
        if wanted:
            return ConfigError(key, msg, f"set {key} to a value of type {wanted.group(1)}")
        return ConfigError(key, msg, f"`sdp config show` shows the current value of {key}")
    for item in _chain(exc):
        if isinstance(item, MissingConfigException):
            return _missing_group_option(item)
    text = _first_line(str(exc))
    match = re.search(r"override '([^']+)'", text)
    return ConfigError(
        match.group(1) if match else "overrides", text, "overrides look like key=value"
    )
