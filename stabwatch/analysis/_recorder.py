"""Online recording of the replica cloud: exact distances, and exact or projected positions.

At every checkpoint the recorder reads the ``N`` replicas once, tensor by tensor in chunks, and keeps

* the exact squared distance of every replica pair, ``|x_i - x_j|^2`` (float64, ``O(N^2)``),
* each replica's squared norm and its squared displacement since the previous checkpoint,
* the positions themselves while they fit in ``max_exact_bytes`` (exact PCA); past that, a
  ``k``-dimensional subsampled randomized Fourier transform of each position (``O(N*T*k)``).

Memory besides that: one copy of the current positions (``N*P`` in the parameters' precision, on the
CPU) to measure displacements and, once the projection is in use, one reference position (``P``
values) and ``P`` bytes of random signs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

import numpy as np
import scipy.fft
import torch
from numpy.typing import NDArray

from stabwatch.analysis._log import analysis_logger
from stabwatch.analysis._replicas import derive_seed

__all__: list[str] = []

logger = analysis_logger()

#: Largest projection done in float64; above it the FFT runs in float32.
_FLOAT64_FFT_MAX = 2**20
#: Elements of float64 scratch per chunk and array (16 MiB).
_SCRATCH_ELEMENTS = 2**21


class ReplicaView(Protocol):
    """Read/write access to the ``N`` replicas' trainable tensors, however they are stored."""

    @property
    def n_replicas(self) -> int:
        """``N``."""
        ...

    def columns(self, j: int, start: int, stop: int) -> torch.Tensor:
        """Elements ``start:stop`` of tensor ``j`` (flattened) of every replica, detached: ``[N, stop-start]``."""
        ...

    def grad_norms(self) -> NDArray[np.float64]:
        """Global L2 gradient norm of each replica (NaN where no gradient exists)."""
        ...

    def renormalize(self, alphas: NDArray[np.float64]) -> None:
        """Set ``s_i <- s_0 + alpha_i (s_i - s_0)`` for every piece of training state ``s``."""
        ...


class SubsampledFourierProjection:
    r"""A fast Johnson-Lindenstrauss map ``R^P -> R^k`` (subsampled randomized Fourier transform).

    .. math:: y = \sqrt{L/k}\; S\, F\, D\, x

    ``D`` flips the sign of each coordinate at random, ``x`` is zero-padded to a length ``L >= P``
    with small prime factors (fast FFT), ``F`` is the orthonormal real Fourier basis of ``R^L``
    (cosines and sines, from one ``rfft``) and ``S`` keeps ``k`` of its ``L`` rows, chosen uniformly
    without replacement. ``E|y|^2 = |x|^2``, and on the ``r``-dimensional span of a trajectory cloud
    the map distorts squared lengths by a factor ``1 +- O(sqrt(r log r / k))``. Cost ``O(L log L)``
    per vector; state: ``P`` bytes of signs and ``k`` indices. With ``k >= P`` no padding or sampling
    is done and the map is an exact isometry.

    Args:
        dim: ``P``.
        k: output dimension (clipped to ``P``).
        seed: seed of ``D`` and ``S``.
    """

    def __init__(self, dim: int, k: int, seed: int) -> None:
        self.dim = int(dim)
        self.k = min(int(k), self.dim)
        self.length = self.dim if self.k == self.dim else int(scipy.fft.next_fast_len(self.dim, real=True))
        gen = torch.Generator().manual_seed(derive_seed(seed, 7))
        if self.k == self.length:
            rows = torch.arange(self.length)
        else:
            rows = torch.sort(_sample_without_replacement(self.length, self.k, gen)).values
        self._signs = torch.randint(0, 2, (self.dim,), generator=gen, dtype=torch.int8).mul_(2).sub_(1)
        m = (self.length - 1) // 2
        paired = (rows >= 1) & (rows <= 2 * m)
        self._freq = torch.where(rows == 0, 0, torch.where(paired, (rows + 1) // 2, self.length // 2))
        self._imag = paired & (rows % 2 == 0)
        one = torch.ones(self.k, dtype=torch.float64)
        weight = torch.where(paired, one * math.sqrt(2.0), one)
        self._weight = weight / math.sqrt(self.length) * math.sqrt(self.length / self.k)

    def __call__(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """Project ``x - reference`` (length ``P``); returns ``k`` float64 values.

        The transform runs in float64 up to 2**20 coordinates and in float32 above (half the time and
        memory; relative round-off ~1e-7 of ``|x - reference|``, far below the projection's own error).
        """
        work = torch.float64 if self.dim <= _FLOAT64_FFT_MAX else torch.float32
        u = torch.empty(x.shape, dtype=work)
        u.copy_(x)
        if reference is not None:
            u.sub_(reference)
        u.mul_(self._signs)
        spectrum = torch.fft.rfft(u, n=self.length)
        del u
        picked = spectrum[self._freq]
        values = torch.where(self._imag, picked.imag, picked.real).to(torch.float64)
        return values * self._weight


def _sample_without_replacement(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` distinct integers from ``range(n)`` with ``O(k)`` memory (rejection of repeats)."""
    chosen: set[int] = set()
    while len(chosen) < k:
        draw = torch.randint(0, n, (2 * (k - len(chosen)),), generator=gen).tolist()
        for v in draw:
            if len(chosen) < k:
                chosen.add(int(v))
    return torch.tensor(sorted(chosen), dtype=torch.int64)


class TrajectoryRecorder:
    """Accumulates what the metrics need, one checkpoint at a time.

    Args:
        numels: number of elements of each trainable tensor, in a fixed order.
        n_replicas: ``N``.
        projection_dim: ``k`` of the random projection.
        max_exact_bytes: budget for keeping whole positions (exact PCA).
        seed: seed of the projection.
        store_dtype: dtype of the kept positions (float32, or float64 for float64 models).
        expected_checkpoints: how many checkpoints will come, when known: positions are projected
            from the start if they would not all fit in ``max_exact_bytes``.
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
        expected_checkpoints: int | None = None,
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
        self._reference: torch.Tensor | None = None
        itemsize = torch.empty((), dtype=store_dtype).element_size()
        self._bytes_per_checkpoint = self.n * self.n_params * itemsize
        fits = self._max_exact_bytes >= 2 * self._bytes_per_checkpoint
        if expected_checkpoints is not None:
            fits = fits and self._max_exact_bytes >= expected_checkpoints * self._bytes_per_checkpoint
        self.mode = "exact" if fits else "sketch"
        self._chunk = max(4096, _SCRATCH_ELEMENTS // max(self.n, 1))

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

        Everything is accumulated in float64 from the parameters' exact values, chunk by chunk. Pair
        distances come from the deviations from replica 0, ``y_i = x_i - x_0`` (exact), as
        ``d_ij^2 = G_ii + G_jj - 2 G_ij`` with ``G = sum_chunks Y Y^T``: ``d_0i^2 = G_ii`` exactly,
        and no large weight magnitude enters the products, so nothing cancels.
        """
        first = self._prev is None
        if self._prev is None:
            self._prev = [torch.empty(self.n, p, dtype=self._store_dtype) for p in self.numels]
        gram = torch.zeros(self.n, self.n, dtype=torch.float64)
        norms = torch.zeros(self.n, dtype=torch.float64)
        steps = torch.zeros(self.n, dtype=torch.float64)
        with torch.no_grad():
            for j, numel in enumerate(self.numels):
                prev = self._prev[j]
                for a in range(0, numel, self._chunk):
                    b = min(numel, a + self._chunk)
                    x = view.columns(j, a, b).to("cpu").to(torch.float64)  # two steps: MPS has no float64
                    y = x - x[:1]
                    gram += y @ y.T
                    norms += torch.einsum("ij,ij->i", x, x)
                    if not first:
                        d = x - prev[:, a:b]
                        steps += torch.einsum("ij,ij->i", d, d)
                    prev[:, a:b].copy_(x)
        g = gram.numpy()
        diag = np.diag(g).copy()
        pair = np.clip(diag[:, None] + diag[None, :] - 2.0 * g, 0.0, None)
        pair[0, :] = diag
        pair[:, 0] = diag
        np.fill_diagonal(pair, 0.0)
        self.pair_sq.append(pair)
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
                for a in range(0, self.numels[j], self._chunk):
                    b = min(self.numels[j], a + self._chunk)
                    prev[:, a:b].copy_(view.columns(j, a, b).to(device="cpu"))

    def _keep_positions(self) -> None:
        assert self._prev is not None
        if self.mode == "exact":
            needed = (len(self._exact) + 1) * self._bytes_per_checkpoint
            if needed <= self._max_exact_bytes:
                self._exact.append(torch.cat(self._prev, dim=1))
                return
            self._switch_to_projection(needed)
        self._sketch.append(self._project_rows(torch.cat([p[i] for p in self._prev]) for i in range(self.n)))

    def _switch_to_projection(self, needed: float) -> None:
        logger.info(
            "keeping whole trajectories would need %.1f MiB > max_exact_bytes=%.1f MiB: "
            "using a %d-dimensional random projection for PCA",
            needed / 2**20,
            self._max_exact_bytes / 2**20,
            min(self._projection_dim, self.n_params),
        )
        self.mode = "sketch"
        for snapshot in self._exact:
            self._sketch.append(self._project_rows(snapshot[i] for i in range(self.n)))
        self._exact = []

    def _project_rows(self, rows: Iterable[torch.Tensor]) -> NDArray[np.float64]:
        """Project replica positions one at a time, relative to a fixed reference point.

        The reference (replica 0's first recorded position) only shifts the cloud, which centring
        removes; it keeps the transformed numbers small so round-off stays relative to the motion.
        """
        if self._projection is None:
            self._projection = SubsampledFourierProjection(self.n_params, self._projection_dim, self._seed)
        out = []
        for row in rows:
            if self._reference is None:
                self._reference = row.clone()
            out.append(self._projection(row, self._reference).numpy())
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
