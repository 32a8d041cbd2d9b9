"""Kronecker-factored preconditioner helpers shared by Shampoo and SOAP.

A gradient matrix G (n x m) gets a left factor L = G G^T (n x n) and a right factor R = G^T G
(m x m); the full-matrix preconditioner (E[g g^T])^(-1/2), of size (nm)^2, is approximated by the
Kronecker product of the two, which costs n^2 + m^2. Tensors with more dims (MoE expert stacks
(E, n, m)) are batches of matrices: each expert gets its own factors, as Muon and Adafactor also
treat them (mixing statistics across independent experts would have no meaning). A side longer
than max_precond_dim (or of size 1) gets no factor: identity along that side.

Sharded parameters (DTensors under FSDP2 or tensor parallel) are preconditioned on their full
gradient: `full_grad` gathers it, every rank keeps the same full-size state and computes the same
update, and `like_param` cuts each rank's own shard back out without communication. That state is
replicated (not sharded), the price of exact Kronecker factors.

Usage:
    g = full_grad(p)                                  # p.grad, gathered if p is a DTensor
    left, right = precond_sides(g.shape, 1024)        # which sides get a factor
    L, R = gram(g, "left"), gram(g, "right")          # G G^T, G^T G (batched)
    QL, QR = eigh(L)[1], eigh(R)[1]                   # eigenbases, ascending eigenvalues
    g_rot = rotate(g, QL, QR)                         # QL^T G QR
    g_back = rotate(g_rot, QL, QR, back=True)         # QL G_rot QR^T
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import distribute_tensor


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def full_grad(p: torch.Tensor) -> torch.Tensor:
    """The parameter's gradient as one plain tensor (all-gathered when p is a DTensor)."""
    return p.grad.full_tensor() if _is_dtensor(p.grad) else p.grad


def like_param(update: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A full-size update laid out like p: for a DTensor, each rank's shard of it (every rank holds the
    same full update, so no data has to move)."""
    if not _is_dtensor(p):
        return update

    return distribute_tensor(update, p.device_mesh, p.placements, src_data_rank=None)


def precond_sides(shape: torch.Size | tuple[int, ...], max_dim: int) -> tuple[bool, bool]:
    """(left, right): whether rows (dim -2) and columns (dim -1) get a factor. 1-D tensors get none."""
    if len(shape) < 2:
        return False, False
    return 1 < shape[-2] <= max_dim, 1 < shape[-1] <= max_dim


def gram(g: torch.Tensor, side: str) -> torch.Tensor:
    """G G^T for side 'left', G^T G for 'right' (over the last two dims, batched over the rest)."""
    return g @ g.mT if side == "left" else g.mT @ g


def rotate(g: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None, back: bool = False) -> torch.Tensor:
    """left^T G right (into the bases), or left G right^T (back); a None side is the identity."""
    if left is not None:
        g = (left if back else left.mT) @ g
    if right is not None:
        g = g @ (right.mT if back else right)
    return g


def eigh(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of symmetric PSD matrices (batched); retries in float64
    when float32 fails to converge (nearly repeated eigenvalues)."""
    mat = (mat + mat.mT) / 2  # symmetrise away round-off so eigh sees exactly symmetric input
    try:
        vals, vecs = torch.linalg.eigh(mat.float())
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        vals, vecs = torch.linalg.eigh(mat.double())
    # LAPACK returns column-major eigenvectors; a checkpoint stores them row-major, and matmuls on the
    # two layouts can round differently, so make them contiguous now for bit-exact resume
    return vals.to(mat.dtype), vecs.to(mat.dtype).contiguous()


def inverse_root(mat: torch.Tensor, root: float, damping: float) -> torch.Tensor:
    """(mat + damping * max_eig * I)^(-1/root) by eigendecomposition (batched)."""
    vals, vecs = eigh(mat)
    vals = vals.clamp(min=0.0)
    # relative damping: scale-free, and never a division by zero for an all-zero factor
    vals = vals + damping * vals.amax(dim=-1, keepdim=True).clamp(min=1e-30)
    return (vecs * vals.pow(-1.0 / root).unsqueeze(-2)) @ vecs.mT
