"""Online recording of the replica cloud: exact distances, and exact or projected positions.

At every checkpoint the recorder reads the ``N`` replicas once, tensor by tensor in chunks, and keeps

* the exact squared distance of every replica pair, ``|x_i - x_j|^2`` (float64, ``O(N^2)``),
* each replica's squared norm and its squared displacement since the previous checkpoint,
* the positions themselves while they fit in ``max_exact_bytes`` (exact PCA); past that, a
  ``k``-dimensional subsampled randomized Fourier transform of each position (``O(N*T*k)``).

Memory besides that: one copy of the current positions (``N*P`` in the parameters' precision, on the
CPU) to measure displacements, and ``P`` bytes of random signs once the projection is in use.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from stabwatch.analysis._replicas import derive_seed
from stabwatch.analysis._stats import pair_indices

__all__: list[str] = []

logger = logging.getLogger("stabwatch.analysis")

#: Elements of float64 scratch per chunk (32 MiB).
_SCRATCH_ELEMENTS = 2**22


class ReplicaView(Protocol):
    """Read/write access to the ``N`` replicas' trainable tensors, however they are stored."""

    @property
    def n_replicas(self) -> int:
        """``N``."""

    def columns(self, j: int) -> torch.Tensor:
        """Tensor ``j`` of every replica, flattened, detached: ``[N, numel_j]``."""

    def grad_norms(self) -> NDArray[np.float64]:
        """Global L2 gradient norm of each replica (NaN where no gradient exists)."""

    def renormalize(self, alphas: NDArray[np.float64]) -> None:
        """Set ``s_i <- s_0 + alpha_i (s_i - s_0)`` for every piece of training state ``s``."""


class SubsampledFourierProjection:
    r"""A fast Johnson-Lindenstrauss map ``R^P -> R^k`` (subsampled randomized Fourier transform).

    .. math:: y = \sqrt{P/k}\; S\, F\, D\, x

    ``D`` flips the sign of each coordinate at random, ``F`` is the orthonormal real Fourier basis
    (cosines and sines, from one ``rfft``), ``S`` keeps ``k`` of its ``P`` rows chosen uniformly
    without replacement. ``E|y|^2 = |x|^2``, and on the ``r``-dimensional span of a trajectory cloud
    the map distorts squared lengths by a factor ``1 +- O(sqrt(r log r / k))``. Cost ``O(P log P)``
    per vector, state ``P`` bytes of signs and ``k`` indices. With ``k >= P`` it is an exact isometry.

    Args:
        dim: ``P``.
        k: output dimension (clipped to ``P``).
        seed: seed of ``D`` and ``S``.
    """

    def __init__(self, dim: int, k: int, seed: int) -> None:
        self.dim = int(dim)
        self.k = min(int(k), self.dim)
        gen = torch.Generator().manual_seed(derive_seed(seed, 7))
        if self.k == self.dim:
            rows = torch.arange(self.dim)
        else:
            rows = torch.sort(torch.randperm(self.dim, generator=gen)[: self.k]).values
        signs = torch.randint(0, 2, (self.dim,), generator=gen, dtype=torch.int8)
        self._flip = signs.bool()
        m = (self.dim - 1) // 2
        paired = (rows >= 1) & (rows <= 2 * m)
        self._freq = torch.where(rows == 0, 0, torch.where(paired, (rows + 1) // 2, self.dim // 2))
        self._imag = paired & (rows % 2 == 0)
        one = torch.ones(self.k, dtype=torch.float64)
        weight = torch.where(paired, one * math.sqrt(2.0), one)
        self._weight = weight / math.sqrt(self.dim) * math.sqrt(self.dim / self.k)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Project one vector (float64, length ``P``); returns ``k`` float64 values."""
        u = torch.where(self._flip, -x, x)
        spectrum = torch.fft.rfft(u)
        picked = spectrum[self._freq]
        values = torch.where(self._imag, picked.imag, picked.real)
        return values * self._weight


class TrajectoryRecorder:
    """Accumulates what the metrics need, one checkpoint at a time.

    Args:
        numels: number of elements of each trainable tensor, in a fixed order.
        n_replicas: ``N``.
        projection_dim: ``k`` of the random projection.
        max_exact_bytes: budget for keeping whole positions (exact PCA).
        seed: seed of the projection.
        store_dtype: dtype of the kept positions (float32, or float64 for float64 models).
    """

    def __init__(
        self,
        numels: list[int],
        n_replicas: int,
        *,
        projection_dim: int,
        max_exact_bytes: int,
        seed: int,
        store_dtype: torch.dtype,
    ) -> None:
        self.numels = list(numels)
        self.n_params = int(sum(self.numels))
        self.n = int(n_replicas)
        self.times: list[float] = []
        self.pair_sq: list[NDArray[np.float64]] = []
        self.norm_sq: list[NDArray[np.float64]] = []
        self.step_sq: list[NDArray[np.float64]] = []
        self.grad_norms: list[NDArray[np.float64]] = []
        self._projection_dim = int(projection_dim)
        self._max_exact_bytes = int(max_exact_bytes)
        self._seed = int(seed)
        self._store_dtype = store_dtype
        self._prev: list[torch.Tensor] | None = None
        self._exact: list[torch.Tensor] = []
        self._sketch: list[NDArray[np.float64]] = []
        self._projection: SubsampledFourierProjection | None = None
        self.mode = "exact" if self._max_exact_bytes > 0 else "sketch"
        self._iu, self._ju = pair_indices(self.n)
        per_chunk = max(len(self._iu), self.n, 1)
        self._chunk = max(4096, _SCRATCH_ELEMENTS // per_chunk)

    @property
    def n_checkpoints(self) -> int:
        """Number of recorded checkpoints."""
        return len(self.times)

    @property
    def method(self) -> str:
        """How positions are kept: ``"exact"`` or ``"projection(k=...)"``."""
        if self.mode == "exact":
            return "exact"
        k = min(self._projection_dim, self.n_params)
        return f"projection(k={k})"

    def record(self, view: ReplicaView, time: float, track_gradients: bool = False) -> None:
        r"""Measure the replicas now.

        Distances are accumulated in float64 from the parameters' exact values:
        ``d_ij^2 = sum_chunks sum (x_i - x_j)^2``; no Gram-matrix shortcut, so nothing cancels.
        """
        first = self._prev is None
        if self._prev is None:
            self._prev = [torch.empty(self.n, p, dtype=self._store_dtype) for p in self.numels]
        iu = torch.as_tensor(self._iu)
        ju = torch.as_tensor(self._ju)
        pair = torch.zeros(len(self._iu), dtype=torch.float64)
        norms = torch.zeros(self.n, dtype=torch.float64)
        steps = torch.zeros(self.n, dtype=torch.float64)
        with torch.no_grad():
            for j, numel in enumerate(self.numels):
                cols = view.columns(j)
                prev = self._prev[j]
                for a in range(0, numel, self._chunk):
                    b = min(numel, a + self._chunk)
                    x = cols[:, a:b].to(device="cpu", dtype=torch.float64)
                    diff = x[iu] - x[ju]
                    pair += (diff * diff).sum(dim=1)
                    norms += (x * x).sum(dim=1)
                    if not first:
                        d = x - prev[:, a:b].to(torch.float64)
                        steps += (d * d).sum(dim=1)
                    prev[:, a:b].copy_(x)
        full = np.zeros((self.n, self.n))
        full[self._iu, self._ju] = pair.numpy()
        full[self._ju, self._iu] = pair.numpy()
        self.pair_sq.append(full)
        self.norm_sq.append(norms.numpy())
        if not first:
            self.step_sq.append(steps.numpy())
        self.times.append(float(time))
        if track_gradients:
            self.grad_norms.append(np.asarray(view.grad_norms(), dtype=np.float64))
        self._keep_positions()

    def refresh(self, view: ReplicaView) -> None:
        """Re-read the current positions (after renormalisation moved the replicas)."""
        assert self._prev is not None
        with torch.no_grad():
            for j, prev in enumerate(self._prev):
                prev.copy_(view.columns(j).to(device="cpu"))

    def _keep_positions(self) -> None:
        assert self._prev is not None
        if self.mode == "exact":
            itemsize = torch.empty((), dtype=self._store_dtype).element_size()
            needed = (len(self._exact) + 1) * self.n * self.n_params * itemsize
            if needed <= self._max_exact_bytes:
                self._exact.append(torch.cat([p.clone() for p in self._prev], dim=1))
                return
            logger.info(
                "keeping whole trajectories would need %.1f MiB > max_exact_bytes=%.1f MiB: "
                "switching to a %d-dimensional random projection",
                needed / 2**20,
                self._max_exact_bytes / 2**20,
                min(self._projection_dim, self.n_params),
            )
            self.mode = "sketch"
            for snapshot in self._exact:
                self._sketch.append(self._project_rows([snapshot[i] for i in range(self.n)]))
            self._exact = []
        rows = [torch.cat([p[i] for p in self._prev]) for i in range(self.n)]
        self._sketch.append(self._project_rows(rows))

    def _project_rows(self, rows: list[torch.Tensor]) -> NDArray[np.float64]:
        if self._projection is None:
            self._projection = SubsampledFourierProjection(self.n_params, self._projection_dim, self._seed)
        out = [self._projection(row.to(torch.float64)).numpy() for row in rows]
        return np.stack(out)

    def gram(self) -> NDArray[np.float64]:
        r"""Gram matrix ``G[a, b] = <x_a, x_b>`` of all ``n = T*N`` recorded points (t-major order).

        Points are centred on their mean first (per column chunk, float64), which leaves the
        centred spectrum unchanged and avoids cancellation. Exact when positions were kept, the
        projected Gram ``<Ry_a, Ry_b>`` otherwise.
        """
        if self.mode == "exact":
            n_points = len(self._exact) * self.n
            g = torch.zeros(n_points, n_points, dtype=torch.float64)
            step = max(1024, _SCRATCH_ELEMENTS // max(n_points, 1))
            for a in range(0, self.n_params, step):
                b = min(self.n_params, a + step)
                block = torch.cat([snap[:, a:b] for snap in self._exact]).to(torch.float64)
                block -= block.mean(dim=0, keepdim=True)
                g += block @ block.T
            return g.numpy()
        y = np.concatenate(self._sketch, axis=0)
        y = y - y.mean(axis=0, keepdims=True)
        return y @ y.T
