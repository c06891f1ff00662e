"""Gradient singular values of every 2-D weight gradient (conv kernels reshaped to ``[out, in*k]``).

Small matrices (``min(m, n) <= exact_max_dim``) get the exact spectrum
(`functional.batched_singular_values`: eigenvalues of the float64 Gram matrix for float32 gradients,
``svdvals`` for float64 ones): top-k, the smallest *non-zero* singular value (above the
``sigma_1 * max(m, n) * eps`` rank tolerance), the numerical rank and the condition number. Larger
ones get the top-k by randomized block Krylov iteration on the device
(`functional.block_krylov_singular_values`, depth 4, started from the previous record's basis); their
smallest value and condition number are not estimated (left empty) — the top-k is what is cheap and
reliable there. Same-shape gradients run as one batch.

Emits globally ``grad_max_sv`` (max over layers), ``grad_min_sv`` (min over exact layers),
``grad_condition`` (max over exact layers) and ``grad_rank`` (min over exact layers: the most
rank-deficient gradient; it is bounded by the narrowest exact layer and by the batch size, so read its
drops, not its level); per layer the same four (``grad_rank``, ``grad_min_sv`` and ``grad_condition``
for exact layers only); and ``extra["grad_sv/top<i>/<layer>"]`` for i = 1..k (flat key
``grad_sv_layers/top<i>/<layer>``). With no exact layer (every gradient wider than ``exact_max_dim``),
``grad_min_sv``, ``grad_condition`` and ``grad_rank`` stay empty.

FSDP2 (``fully_shard``): each sharded gradient is gathered whole (``DTensor.full_tensor``, one all-gather per
matrix) at the family's scheduled steps only, and every rank computes the same spectra.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from pydantic import Field

from stabwatch import distributed as _dist
from stabwatch.collectors.base import Collector, CollectorOptions, MonitorContext, Readout, weight_layer_name
from stabwatch.errors import ConfigError
from stabwatch.functional.spectral import (
    as_matrix,
    block_krylov_singular_values,
    group_matrices,
    spectrum_summary,
)

__all__ = ["GradSVCollector"]


class _Spectra(NamedTuple):
    tops: list[torch.Tensor]  # [layers of a group, k] per group
    top_layers: list[str]
    exact: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (s_min, rank, kappa) per exact group
    exact_layers: list[str]


class GradSVCollector(Collector):
    """See the module docstring. Gradients of the same shape are stacked and run as one batch (one
    batched SVD, or one batched block Krylov iteration), so a deep stack of equal layers costs a few
    batched kernels, not a few kernels per layer.

    Args:
        top_k: how many leading singular values to emit per layer (``grad_sv/top<i>``).
        exact_max_dim: matrices with ``min(m, n)`` up to this get the exact full spectrum.
        n_iter: Krylov depth for the larger ones (warm-started from the previous record's basis; 4
            gives the top-1 to ~1e-3 relative or better even on flat, noise-like gradient spectra).
        oversample: extra Krylov probe vectors beyond ``top_k`` for the larger ones (block size
            ``top_k + oversample``).
    """

    family = "grad_sv"
    default_every = 100

    class Options(CollectorOptions):
        top_k: int = Field(default=3, ge=1)
        exact_max_dim: int = Field(default=256, ge=1)
        n_iter: int = Field(default=4, ge=1)
        oversample: int = Field(default=8, ge=0)

    top_k: int
    exact_max_dim: int
    n_iter: int
    oversample: int

    def __init__(self, every: Any = 100, **options: Any) -> None:
        super().__init__(every, **options)
        self._bases: dict[tuple[int, ...], torch.Tensor] = {}
        self._pending: _Spectra | None = None
        self._loaded = False  # `_bases` came from load_state_dict before the monitor started: keep it in setup

    def setup(self, ctx: MonitorContext) -> None:
        if not self._loaded:  # a collector attached again starts cold
            self._bases = {}
        self._loaded = False
        self._targets = [(name, p) for name, p in ctx.params if p.ndim >= 2 and min(as_matrix(p).shape) > 1]

    # teardown keeps `_bases` (small): state_dict() after the monitor closed still has them

    def state_dict(self) -> dict[str, Any]:
        """The Krylov start bases of the large gradients (``{"bases": [{"shape": [b, m, n], "basis": tensor}]}``,
        one per group of same-shape gradients): a resumed run warm-starts from them and measures exactly
        what an uninterrupted one does."""
        return {"bases": [{"shape": list(key), "basis": basis} for key, basis in self._bases.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output (before or after the monitor starts); a group not in it starts cold."""
        try:
            self._bases = {tuple(int(d) for d in item["shape"]): item["basis"] for item in state.get("bases", [])}
            self._loaded = self.ctx is None
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"GradSVCollector.load_state_dict: expected {{'bases': [{{'shape': [b, m, n], 'basis': tensor}}]}}; "
                f"{type(exc).__name__}: {exc}"
            ) from None

    def _groups(self) -> list[tuple[list[str], torch.Tensor]]:
        """``[(parameter names, gradient stack [b, m, n])]``: same-shape gradients as one batch."""
        # FSDP2: every rank gathers each sharded gradient (an all-gather per matrix, on this schedule)
        named = [(name, _dist.full_tensor(p.grad)) for name, p in self._targets if p.grad is not None]
        return [([named[i][0] for i in idx], stack) for idx, stack in group_matrices([g for _, g in named])]

    def begin_step(self, step: int) -> None:
        self._pending = None

    def before_optimizer_step(self) -> None:
        # the gradients the optimizer uses in this step (an LBFGS closure or zero_grad may replace them later)
        if self.active:
            self._pending = self._spectra()

    def _spectra(self) -> _Spectra:
        tops: list[torch.Tensor] = []  # [b, k] per group
        top_layers: list[str] = []
        exact: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (s_min, rank, kappa) per group
        exact_layers: list[str] = []
        scale = self.ctx.grad_scale if self.ctx is not None else None
        with torch.no_grad():
            for names, stack in self._groups():
                shape = (stack.shape[1], stack.shape[2])
                try:
                    if scale is not None:  # GradScaler's scale, still in the gradients of a fused optimizer
                        stack = stack / scale.to(stack.device, stack.dtype)
                    if min(shape) <= self.exact_max_dim:
                        top, s_min, rank, kappa = spectrum_summary(stack, self.top_k)
                        exact.append((s_min, rank, kappa))
                        exact_layers += [weight_layer_name(n) for n in names]
                    else:
                        top = self._top(names, stack)[:, : self.top_k]
                except Exception as exc:  # noqa: BLE001 - a failing metric never kills training
                    self.fail(f"gradient singular values of {len(names)} matrices {shape}", exc)
                    continue
                tops.append(top)
                top_layers += [weight_layer_name(n) for n in names]
        return _Spectra(tops, top_layers, exact, exact_layers)

    def collect(self, step: int, readout: Readout, loss: torch.Tensor | None, batch: Any) -> None:
        spectra = self._pending if self._pending is not None else self._spectra()
        self._pending = None
        tops, top_layers, exact, exact_layers = spectra
        if not tops:
            return
        k = min(t.shape[1] for t in tops)
        top = torch.cat([t[:, :k] for t in tops]).double()  # [layers, k]
        readout.add_layers("grad_max_sv", top_layers, top[:, 0])
        readout.add("grad_max_sv", top[:, 0].max())
        for i in range(k):
            for layer, value in zip(top_layers, top[:, i].unbind(), strict=True):
                readout.add_extra(f"grad_sv/top{i + 1}", value, layer=layer)
        if exact:
            s_min = torch.cat([e[0] for e in exact]).double()
            rank = torch.cat([e[1] for e in exact]).double()
            kappa = torch.cat([e[2] for e in exact]).double()
            readout.add_layers("grad_min_sv", exact_layers, s_min)
            readout.add_layers("grad_condition", exact_layers, kappa)
            readout.add_layers("grad_rank", exact_layers, rank)
            readout.add("grad_min_sv", s_min.min())
            readout.add("grad_condition", kappa.max())
            readout.add("grad_rank", rank.min())

    def _top(self, names: list[str], stack: torch.Tensor) -> torch.Tensor:
        """Top singular values of a stack of same-shape matrices, warm-started per group."""
        b, m, n = stack.shape
        ell = min(self.top_k + self.oversample, m, n)
        key = (len(names), m, n)
        omega = self._bases.get(key)
        if omega is not None and omega.device != stack.device:  # loaded from a checkpoint on another device
            omega = omega.to(stack.device)
        if omega is None or omega.dtype != stack.dtype or omega.shape != (b, n, ell):
            gen = self.ctx.generator if self.ctx is not None else None
            omega = torch.randn(b, n, ell, generator=gen, dtype=stack.dtype).to(stack.device)
        s, basis, _ = block_krylov_singular_values(stack, omega, self.n_iter)
        self._bases[key] = basis
        return s
