"""LRAgent settings that SGLang's own ServerArgs has no field for.

Our launcher turns `--lragent-*` flags into environment variables; SGLang's spawned
scheduler processes inherit them, so every process sees the same settings. Users of the
stock `sglang serve` set the variables themselves.
"""

from __future__ import annotations

import os

SCHEMES = ("non-shared", "full-shared", "base-shared", "base-lr-shared")
DEFAULT_SCHEME = "base-lr-shared"
SCHEME_ENV = "LRAGENT_SCHEME"


class ConfigError(ValueError):
    """A bad LRAgent setting; the message names the setting and the allowed values."""


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ConfigError(
            f"unknown LRAgent scheme {scheme!r}: choose one of {', '.join(SCHEMES)}"
        )
    return scheme


def scheme_from_env() -> str:
    """The sharing scheme of this server (`$LRAGENT_SCHEME`, default base-lr-shared)."""
    return check_scheme(os.environ.get(SCHEME_ENV, DEFAULT_SCHEME))
