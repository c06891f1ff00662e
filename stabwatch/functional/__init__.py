"""Pure math: tensors in, tensors (or floats) out. No hooks, no state, no host syncs.

Every function here is tested against ``torch.linalg`` / numpy references or an analytic result. The
collectors call these; users can too. Each module's public names are re-exported here (``__all__`` is
their union):

* `stabwatch.functional.gradients` — squared and global norms, per-layer reduction, update ratios;
* `stabwatch.functional.spectral` — exact, batched and randomized singular values, condition numbers,
  spectral norms and radii;
* `stabwatch.functional.activations` — activation statistics;
* `stabwatch.functional.spiking` — spike counts, firing and membrane statistics, surrogate-gradient health;
* `stabwatch.functional.lyapunov` — the shadow replica's difference norms, renormalisation and the
  tangent (JVP) reference estimate;
* `stabwatch.functional.jacobian` — top singular value and vector of input Jacobians (exact, power, Lanczos),
  no Jacobian formed on the iterative paths (FTLE);
* `stabwatch.functional.recurrent` — pure step functions of RNN/GRU/LSTM cells and the QR method for the
  Lyapunov spectrum;
* `stabwatch.functional.hessian` — Hessian-vector products, top Hessian eigenvalues (Lanczos), Adam's
  preconditioner and edge-of-stability ratios;
* `stabwatch.functional.attention` — attention logits, entropies and the output log-partition.
"""

from stabwatch.functional import (
    activations,
    attention,
    gradients,
    hessian,
    jacobian,
    lyapunov,
    recurrent,
    spectral,
    spiking,
)
from stabwatch.functional.activations import *  # noqa: F403
from stabwatch.functional.attention import *  # noqa: F403
from stabwatch.functional.gradients import *  # noqa: F403
from stabwatch.functional.hessian import *  # noqa: F403
from stabwatch.functional.jacobian import *  # noqa: F403
from stabwatch.functional.lyapunov import *  # noqa: F403
from stabwatch.functional.recurrent import *  # noqa: F403
from stabwatch.functional.spectral import *  # noqa: F403
from stabwatch.functional.spiking import *  # noqa: F403

__all__ = sorted(
    {
        *activations.__all__,
        *attention.__all__,
        *gradients.__all__,
        *hessian.__all__,
        *jacobian.__all__,
        *lyapunov.__all__,
        *recurrent.__all__,
        *spectral.__all__,
        *spiking.__all__,
    }
)
