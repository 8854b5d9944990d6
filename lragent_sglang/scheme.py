"""The sharing schemes and LR bases: the one place their names are spelled.

Everything else asks a `Scheme` what it does (`shares_base`, `one_lr_cache`, ...) rather
than comparing names, so a scheme's behaviour is defined here and nowhere else.
"""

from __future__ import annotations

import enum


class ConfigError(ValueError):
    """A bad LRAgent setting; the message names the setting and the allowed values."""


def _parse(cls: type[enum.StrEnum], value: str, what: str) -> enum.StrEnum:
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(
            f"unknown LRAgent {what} {value!r}: choose one of {', '.join(cls.choices())}"
        ) from None


class Scheme(enum.StrEnum):
    """What the adapters of one server share (README, the schemes table)."""

    NON_SHARED = "non-shared"  # nothing: stock SGLang, the tree keyed by adapter
    FULL_SHARED = "full-shared"  # K and the whole V, the writer's adapter delta included
    BASE_SHARED = "base-shared"  # K and V_base; one LR cache per adapter
    BASE_LR_SHARED = "base-lr-shared"  # K, V_base and one LR cache for all adapters

    @classmethod
    def choices(cls) -> tuple[str, ...]:
        return tuple(s.value for s in cls)

    @classmethod
    def parse(cls, value: str) -> "Scheme":
        """The scheme named `value`; ConfigError listing the choices otherwise."""
        return _parse(cls, value, "scheme")

    @property
    def keys_by_adapter(self) -> bool:
        """The prefix tree keeps adapters apart (SGLang's own keying)."""
        return self is Scheme.NON_SHARED

    @property
    def shares_base(self) -> bool:
        """K and V_base are shared and V's adapter term lives in an LR cache: our tree
        (`radix/`) and the Flash-LoRA attention serve it."""
        return self in (Scheme.BASE_SHARED, Scheme.BASE_LR_SHARED)

    @property
    def one_lr_cache(self) -> bool:
        """All adapters read one LR cache (computed with one group basis of v_proj A)."""
        return self is Scheme.BASE_LR_SHARED


DEFAULT_SCHEME = Scheme.BASE_LR_SHARED


class LRBasis(enum.StrEnum):
    """How base-lr-shared forms its one LR cache."""

    SHARED_A = "shared-a"  # the adapters' common v_proj A
    JOINT = "joint"  # the orthonormal basis of all start-up adapters' v_proj A rows

    @classmethod
    def choices(cls) -> tuple[str, ...]:
        return tuple(b.value for b in cls)

    @classmethod
    def parse(cls, value: str) -> "LRBasis":
        return _parse(cls, value, "LR basis")


DEFAULT_LR_BASIS = LRBasis.SHARED_A


def check_lr_basis(lr_basis: LRBasis, scheme: Scheme) -> LRBasis:
    """A non-default basis only where one LR cache is shared: the other schemes have no
    group basis, so the setting would silently do nothing."""
    if lr_basis is not DEFAULT_LR_BASIS and not scheme.one_lr_cache:
        raise ConfigError(
            f"--lragent-lr-basis {lr_basis} needs --lragent-scheme {Scheme.BASE_LR_SHARED} "
            f"(the only scheme with one shared LR cache), not {scheme}"
        )
    return lr_basis
