"""Pure math: tensors in, tensors (or floats) out. No hooks, no state, no host syncs.

Every function here is tested against ``torch.linalg`` / numpy references or an analytic result. The
collectors call these; users can too.
"""

from stabwatch.functional.activations import activation_statistics
from stabwatch.functional.gradients import gradient_norm, squared_norms, update_ratio
from stabwatch.functional.spectral import (
    batched_singular_values,
    block_krylov_singular_values,
    condition_number,
    randomized_singular_values,
    singular_values,
    spectral_norm,
    spectral_radius,
)

__all__ = [
    "activation_statistics",
    "batched_singular_values",
    "block_krylov_singular_values",
    "condition_number",
    "gradient_norm",
    "randomized_singular_values",
    "singular_values",
    "spectral_norm",
    "spectral_radius",
    "squared_norms",
    "update_ratio",
]
