"""Joint low-rank basis of several adapters' v_proj A (LRAgent's extension for
independently trained adapters).

Stack the rows of A_1..A_n ([r_i, hidden] each) and take an orthonormal basis A_s of
their row space ([k, hidden], k <= sum r_i). Every A_i then factors exactly as
A_i = C_i A_s with C_i = A_i A_s^T, so B_i A_i x = (B_i C_i)(A_s x): one shared LR cache
`X A_s^T` of width k serves every adapter, each with its own up-projection B_i C_i.

Truncating A_s to its K leading singular directions trades exactness for a narrower LR
cache; `truncation` reports what that costs per adapter.

Everything is computed in float64 (the SVD decides the rank, and exactness tests compare
against float tolerance); results come back in the inputs' dtype.

`GroupBasis` is what a base-lr-shared server serves with: per layer the rows G_l of its one
LR cache, either the adapters' common A (shared-A) or their joint basis, and
`coefficients` / `group_b` give each adapter's rewritten up-projection B C.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lragent_sglang.scheme import LRBasis, Scheme

DEFAULT_RTOL = 1e-6


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the tiny [n*r, hidden] factorisations on one CPU thread: with other processes
    on the cores, OpenMP's thread hand-offs made a 30-layer report 200x slower (11 s vs
    0.05 s on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _stack(a_list: Sequence[torch.Tensor]) -> torch.Tensor:
    if not a_list:
        raise ValueError("joint_basis needs at least one A matrix")
    hidden = {a.shape[-1] for a in a_list}
    if any(a.dim() != 2 for a in a_list) or len(hidden) != 1:
        raise ValueError(f"A matrices must be 2-D with one hidden size, got {[tuple(a.shape) for a in a_list]}")
    return torch.cat([a.detach().to(torch.float64) for a in a_list], dim=0)


def singular_values(a_list: Sequence[torch.Tensor]) -> torch.Tensor:
    """Singular values (descending, float64) of the stacked A rows."""
    with _one_thread():
        return torch.linalg.svdvals(_stack(a_list))


def joint_rank(s: torch.Tensor, rtol: float = DEFAULT_RTOL) -> int:
    """Numerical rank: singular values above rtol times the largest one."""
    if s.numel() == 0 or s[0] <= 0:
        return 0
    return int((s > rtol * s[0]).sum())


def joint_basis(
    a_list: Sequence[torch.Tensor], rtol: float = DEFAULT_RTOL, max_k: int | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(A_s [k, hidden] with orthonormal rows, [C_i = A_i A_s^T, each [r_i, k]]).

    k is the numerical rank of the stacked rows (relative tolerance `rtol`), capped at
    `max_k` if given; with the cap below the rank the factorisation is the best rank-K
    approximation in the stacked rows' Frobenius norm, no longer exact.
    """
    with _one_thread():
        _, s, vh = torch.linalg.svd(_stack(a_list), full_matrices=False)
        k = joint_rank(s, rtol)
        if max_k is not None:
            k = min(k, max_k)
        basis = vh[:k]
        dtype = a_list[0].dtype
        coeffs = [(a.detach().to(torch.float64) @ basis.T).to(dtype) for a in a_list]
    return basis.to(dtype), coeffs


@dataclass(frozen=True)
class Truncation:
    """What keeping K basis rows costs: energy kept of the stacked A, and per adapter the
    relative Frobenius error of its delta B_i A_i."""

    k: int
    full_k: int
    energy_kept: float
    rel_errors: tuple[float, ...]


def truncation(
    a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor], max_k: int, rtol: float = DEFAULT_RTOL
) -> Truncation:
    """Cost of a K-row joint basis: energy = sum of kept s^2 / total, error_i =
    ||B_i A_i - B_i A_i P_K|| / ||B_i A_i|| with P_K the projector onto the K rows.

    The error uses the r x r Gram matrices (||B M||^2 = tr(B^T B M M^T)), so it costs no
    [out, hidden] product even for 8B-sized layers.
    """
    if len(a_list) != len(b_list):
        raise ValueError(f"{len(a_list)} A matrices but {len(b_list)} B matrices")
    if max_k < 0:
        raise ValueError(f"max_k must be >= 0, got {max_k}")
    with _one_thread():
        _, s, vh = torch.linalg.svd(_stack(a_list), full_matrices=False)
        full_k = joint_rank(s, rtol)
        k = min(max_k, full_k)
        energy = s.square()
        kept = float(energy[:k].sum() / energy.sum()) if energy.sum() > 0 else 1.0
        basis = vh[:k]
        errors = []
        for a, b in zip(a_list, b_list):
            a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
            if b64.shape[-1] != a64.shape[0]:
                raise ValueError(f"B {tuple(b64.shape)} does not match A {tuple(a64.shape)}")
            gram_b = b64.T @ b64
            resid = a64 - (a64 @ basis.T) @ basis
            total = torch.trace(gram_b @ (a64 @ a64.T))
            lost = torch.trace(gram_b @ (resid @ resid.T)).clamp_min(0)
            errors.append(float((lost / total).sqrt()) if total > 0 else 0.0)
    return Truncation(k=k, full_k=full_k, energy_kept=kept, rel_errors=tuple(errors))


# ----------------------------------------------------------------- the served group

SHARED_A_RTOL = 1e-3
SHARED_A_ATOL = 1e-6


class LRBasisMismatch(ValueError):
    """An adapter's v_proj A is not served exactly by the group's LR basis."""


class SharedAMismatch(LRBasisMismatch):
    """An adapter's v_proj A differs from the group's in base-lr-shared (shared-A) mode."""


class OutsideJointBasis(LRBasisMismatch):
    """An adapter's v_proj A rows leave the span of the start-up joint basis."""


def same_a(ref: torch.Tensor, a: torch.Tensor) -> bool:
    """Shared-A test; `ref` is rounded to `a`'s dtype first, so a float32 reference and the
    same weights held in bfloat16 by SGLang's LoRA buffer compare equal."""
    if ref.shape != a.shape:
        return False
    rounded = ref.detach().to(a.dtype).to("cpu", torch.float64)
    return torch.allclose(rounded, a.detach().to("cpu", torch.float64), rtol=SHARED_A_RTOL, atol=SHARED_A_ATOL)


def residual_tol(dtype: torch.dtype) -> float:
    """Largest relative residual ||A - A P|| / ||A|| that is rounding, not another
    subspace: a few ulps of the dtype the A was held in (0.03 for bfloat16, 1e-4 at least)."""
    return max(1e-4, 4 * torch.finfo(dtype).eps)


def tensors_digest(tag: str, named: Sequence[tuple[str, torch.Tensor]]) -> str:
    """A short content hash of named tensors (their bytes, dtypes and shapes)."""
    h = hashlib.sha256(tag.encode())
    for name, t in named:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class GroupBasis:
    """The rows G_l [k_l, hidden] (float64) that base-lr-shared computes every LR row
    with, `L = x G_l^T`, and the adapters it came from. Shared-A: G_l is the common A
    (k_l = r); joint: orthonormal rows spanning all adapters' A (k_l <= n r)."""

    kind: LRBasis
    names: tuple[str, ...]
    rows: dict[int, torch.Tensor]

    @property
    def width(self) -> int:
        """LR row width that holds every layer's rows."""
        return max((g.shape[0] for g in self.rows.values()), default=0)

    @functools.cached_property
    def digest(self) -> str:
        """Content hash of the rows (hashed once): the LR cache computed with them is keyed
        by it, so rows computed with another basis are never read back."""
        return tensors_digest(self.kind, [(str(layer), self.rows[layer]) for layer in sorted(self.rows)])

    def describe(self) -> str:
        who = ", ".join(repr(n) for n in self.names)
        if self.kind is LRBasis.SHARED_A:
            return f"v_proj A of adapter {who} (width {self.width})"
        ks = [g.shape[0] for g in self.rows.values()]
        return f"joint basis of {who}: width {self.width} (per layer {min(ks, default=0)}..{max(ks, default=0)})"


def shared_a_group(name: str, a_by_layer: dict[int, torch.Tensor]) -> GroupBasis:
    """The group of adapters sharing `name`'s v_proj A."""
    return GroupBasis(LRBasis.SHARED_A, (name,), {layer: a.detach().double() for layer, a in a_by_layer.items()})


def joint_group(named: Sequence[tuple[str, dict[int, torch.Tensor]]], rtol: float = DEFAULT_RTOL) -> GroupBasis:
    """Per layer, the orthonormal basis of all adapters' A rows at that layer."""
    layers = sorted({layer for _, by_layer in named for layer in by_layer})
    rows = {
        layer: joint_basis([by_layer[layer].double() for _, by_layer in named if layer in by_layer], rtol)[0]
        for layer in layers
    }
    return GroupBasis(LRBasis.JOINT, tuple(name for name, _ in named), rows)


def coefficients(group: GroupBasis, layer: int, name: str, a: torch.Tensor) -> torch.Tensor:
    """C [r, k_l] (float64) with A = C G_l, so that (x G_l^T)(B C)^T = x A^T B^T: the
    group's LR rows serve this adapter exactly. LRBasisMismatch naming the adapter when
    no such C exists (up to rounding of A's dtype)."""
    g = group.rows.get(layer)
    a64 = a.detach().to("cpu", torch.float64)
    if not a64.any():  # no v_proj LoRA at this layer: nothing to serve
        return a64.new_zeros(a64.shape[0], 0 if g is None else g.shape[0])
    if group.kind is LRBasis.SHARED_A:
        if g is None or not same_a(g, a):
            raise SharedAMismatch(
                f"adapter {name!r} has a different v_proj A than {group.names[0]!r} (layer {layer}); "
                f"{Scheme.BASE_LR_SHARED} with --lragent-lr-basis {LRBasis.SHARED_A} needs shared-A "
                f"adapters: use --lragent-lr-basis {LRBasis.JOINT} (all adapters in --lora-paths at "
                "start-up), adapters trained with a shared v_proj A (lragent-adapters train "
                f"--shared-a), or --lragent-scheme {Scheme.BASE_SHARED}"
            )
        return torch.eye(a.shape[0], dtype=torch.float64)
    if g is None:
        g = a64.new_zeros(0, a64.shape[-1])
    coeff = a64 @ g.T
    norm = float(a64.norm())
    rel = float((a64 - coeff @ g).norm()) / norm if norm > 0 else 0.0
    if rel > residual_tol(a.dtype):
        names = ", ".join(repr(n) for n in group.names)
        raise OutsideJointBasis(
            f"adapter {name!r}: its v_proj A at layer {layer} lies outside the joint LR basis of "
            f"{names} (relative residual {rel:.2g}); the basis is fixed at start-up: add the adapter "
            f"to --lora-paths and restart, or use --lragent-scheme {Scheme.BASE_SHARED}"
        )
    return coeff


def group_b(b: torch.Tensor, scaling: float, coeff: torch.Tensor) -> torch.Tensor:
    """The up-projection [out, k] an adapter applies to the group's LR rows: B C scaled
    by alpha/r (float64; the caller casts)."""
    return (b.detach().double() * scaling) @ coeff
