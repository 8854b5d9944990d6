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
# How base-lr-shared forms its one LR cache: the adapters' common v_proj A, or the joint
# orthonormal basis of all start-up adapters' v_proj A rows.
LR_BASES = ("shared-a", "joint")
DEFAULT_LR_BASIS = "shared-a"
LR_BASIS_ENV = "LRAGENT_LR_BASIS"


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


def check_lr_basis(lr_basis: str, scheme: str) -> str:
    """A known LR basis, and `joint` only where one LR cache is shared (base-lr-shared):
    the other schemes have no group basis, so the setting would silently do nothing."""
    if lr_basis not in LR_BASES:
        raise ConfigError(f"unknown LRAgent LR basis {lr_basis!r}: choose one of {', '.join(LR_BASES)}")
    if lr_basis != DEFAULT_LR_BASIS and scheme != "base-lr-shared":
        raise ConfigError(
            f"--lragent-lr-basis {lr_basis} needs --lragent-scheme base-lr-shared "
            f"(the only scheme with one shared LR cache), not {scheme}"
        )
    return lr_basis


def lr_basis_from_env(scheme: str) -> str:
    """The LR basis of a base-lr-shared server (`$LRAGENT_LR_BASIS`, default shared-a)."""
    return check_lr_basis(os.environ.get(LR_BASIS_ENV, DEFAULT_LR_BASIS), scheme)
