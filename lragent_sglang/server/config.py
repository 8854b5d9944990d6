"""LRAgent settings that SGLang's ServerArgs has no field for, read once per process.

Our launcher turns `--lragent-*` flags into environment variables; SGLang's spawned
processes inherit them, so every process of one server sees the same settings. Users of
the stock `sglang serve` set the variables themselves. `LRAgentConfig.from_env` is the
only reader: the plugin calls it once when SGLang loads it and passes the result on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lragent_sglang.scheme import DEFAULT_LR_BASIS, DEFAULT_SCHEME, ConfigError, LRBasis, Scheme, check_lr_basis

#: the name of both our backends (`--attention-backend`, `--radix-cache-backend`)
BACKEND_NAME = "lragent"
SCHEME_ENV = "LRAGENT_SCHEME"
LR_BASIS_ENV = "LRAGENT_LR_BASIS"
MAX_BODY_ENV = "LRAGENT_MAX_BODY_MB"
#: HTTP request bodies above this many MiB are refused (413) before SGLang parses them
DEFAULT_MAX_BODY_MB = 8.0
CASCADE_ENV = "LRAGENT_CASCADE"
CASCADE_MIN_SHARED_ENV = "LRAGENT_CASCADE_MIN_SHARED"
#: cascade decode (kernels/cascade.py): off; auto, where the host sees two requests long
#: enough to share a prefix; on, every decode batch of two or more requests
CASCADE_MODES = ("off", "auto", "on")
DEFAULT_CASCADE = "off"
#: the fewest tokens a group of decoding requests must share for a cascade
DEFAULT_CASCADE_MIN_SHARED = 256


def parse_cascade(value: str) -> str:
    if value not in CASCADE_MODES:
        raise ConfigError(f"{CASCADE_ENV} / --lragent-cascade must be one of {', '.join(CASCADE_MODES)}, "
                          f"got {value!r}")
    return value


def parse_cascade_min_shared(value: str) -> int:
    """Tokens; ConfigError naming the setting unless a positive integer."""
    try:
        tokens = int(value)
    except ValueError:
        tokens = 0
    if tokens < 1:
        raise ConfigError(f"{CASCADE_MIN_SHARED_ENV} / --lragent-cascade-min-shared must be a positive "
                          f"number of tokens, got {value!r}")
    return tokens


def parse_max_body_mb(value: str) -> float:
    """The body limit in MiB; ConfigError naming the setting unless a positive number."""
    try:
        mb = float(value)
    except ValueError:
        mb = 0.0
    if not 0 < mb < float("inf"):
        raise ConfigError(f"{MAX_BODY_ENV} / --lragent-max-body-mb must be a positive number of MiB, got {value!r}")
    return mb


@dataclass(frozen=True)
class LRAgentConfig:
    """One server's sharing settings, checked together."""

    scheme: Scheme = DEFAULT_SCHEME
    lr_basis: LRBasis = DEFAULT_LR_BASIS
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    cascade: str = DEFAULT_CASCADE
    cascade_min_shared: int = DEFAULT_CASCADE_MIN_SHARED

    def __post_init__(self) -> None:
        check_lr_basis(self.lr_basis, self.scheme)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "LRAgentConfig":
        """The settings the launcher (or the user) put in the environment; ConfigError
        naming the variable's bad value otherwise."""
        return cls(
            Scheme.parse(environ.get(SCHEME_ENV, DEFAULT_SCHEME)),
            LRBasis.parse(environ.get(LR_BASIS_ENV, DEFAULT_LR_BASIS)),
            parse_max_body_mb(environ.get(MAX_BODY_ENV, str(DEFAULT_MAX_BODY_MB))),
            parse_cascade(environ.get(CASCADE_ENV, DEFAULT_CASCADE)),
            parse_cascade_min_shared(environ.get(CASCADE_MIN_SHARED_ENV, str(DEFAULT_CASCADE_MIN_SHARED))),
        )

    def to_env(self) -> dict[str, str]:
        return {SCHEME_ENV: str(self.scheme), LR_BASIS_ENV: str(self.lr_basis), MAX_BODY_ENV: str(self.max_body_mb),
                CASCADE_ENV: self.cascade, CASCADE_MIN_SHARED_ENV: str(self.cascade_min_shared)}


def selected(server_args: Any) -> bool:
    """Both our backends are selected: nothing of ours may act otherwise."""
    return server_args.attention_backend == BACKEND_NAME and server_args.radix_cache_backend == BACKEND_NAME
