"""Arrow's prototypes (Ostapenko et al., 2024; PEFT's ``ArrowLoraLinearLayer``).

For one adapter on one module, the prototype is the unit top *right* singular vector of
ΔW = B·A (B as trained or pre-scaled: the scaling changes ΔW's singular values, not its
singular vectors), the input direction the adapter changes most. Tokens are scored against
it by |⟨x, prototype⟩|: PEFT's raw dot product (not a cosine) and sign-free, because a
singular vector's sign is arbitrary. GenKnowSub (PEFT's ``use_gks``) is not applied.

PEFT finds the vector with 15 steps of power iteration on Aᵀ(BᵀB)A from a random start;
here it is the exact vector (QR of Aᵀ, then the SVD of the small out×r matrix), which is
what the power iteration converges to: the same routing wherever PEFT's iteration has
converged, without depending on a seed or on the gap between the top two singular values.
"""

from __future__ import annotations

import torch


def top_right_singular_vector(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The unit top right singular vector [in] (float32) of ΔW = b @ a, without forming ΔW.

    a [r, in], b [out, r]. With Aᵀ = Q·R (Q [in, r] orthonormal), ΔW = (b·Rᵀ)·Qᵀ; if
    b·Rᵀ = U·S·Vᵀ then ΔW = U·S·(Q·V)ᵀ, so ΔW's right singular vectors are Q·V. The sign
    is fixed (largest entry positive) so that the same adapter always gives the same vector;
    scoring takes |⟨x, p⟩| and does not depend on it.
    """
    a32 = a.detach().to(torch.float32)
    b32 = b.detach().to(torch.float32)
    q, r = torch.linalg.qr(a32.T)  # q [in, r], r [r, r]
    _, _, vh = torch.linalg.svd(b32 @ r.T, full_matrices=False)
    vector = q @ vh[0]
    vector = vector / vector.norm().clamp_min(torch.finfo(torch.float32).tiny)
    if vector[vector.abs().argmax()] < 0:
        vector = -vector
    return vector.contiguous()
