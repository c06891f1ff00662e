"""Pure math: tensors in, tensors (or floats) out. No hooks, no state, no host syncs.

Every function here is tested against ``torch.linalg`` / numpy references or an analytic result. The
collectors call these; users can too. Each module's public names are re-exported here (``__all__`` is
their union):

* `stabwatch.functional.gradients` — squared and global norms, per-layer reduction, update ratios;
* `stabwatch.functional.spectral` — exact, batched and randomized singular values, condition numbers,
  spectral norms and radii;
* `stabwatch.functional.activations` — activation statistics;
* `stabwatch.functional.spiking` — spike counts, firing and membrane statistics;
* `stabwatch.functional.lyapunov` — the shadow replica's difference norms, renormalisation and the
  tangent (JVP) reference estimate.
"""

from stabwatch.functional import activations, gradients, lyapunov, recurrent, spectral, spiking
from stabwatch.functional import jacobian
from stabwatch.functional.activations import *  # noqa: F403
from stabwatch.functional.gradients import *  # noqa: F403
from stabwatch.functional.jacobian import *  # noqa: F403
from stabwatch.functional.lyapunov import *  # noqa: F403
from stabwatch.functional.recurrent import *  # noqa: F403
from stabwatch.functional.spectral import *  # noqa: F403
from stabwatch.functional.spiking import *  # noqa: F403

__all__ = sorted({*activations.__all__, *gradients.__all__, *lyapunov.__all__, *spectral.__all__, *spiking.__all__})
__all__ = sorted({*__all__, *recurrent.__all__})
__all__ = sorted({*__all__, *jacobian.__all__})  # noqa: PLE0605
from stabwatch.functional import attention
from stabwatch.functional.attention import *  # noqa: F403

__all__ = sorted({*__all__, *attention.__all__})
from stabwatch.functional import hessian
from stabwatch.functional.hessian import *  # noqa: F403

__all__ = sorted({*__all__, *hessian.__all__})
