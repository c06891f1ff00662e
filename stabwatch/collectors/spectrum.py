"""Gradient singular values of every 2-D weight gradient (conv kernels reshaped to ``[out, in*k]``).

Small matrices (``min(m, n) <= exact_max_dim``) get the exact spectrum (``torch.linalg.svdvals``, after
a QR for tall-skinny ones): top-k, the smallest *non-zero* singular value (above the
``sigma_1 * max(m, n) * eps`` rank tolerance), the numerical rank and the condition number. Larger
ones get the top-k by warm-started randomized subspace iteration on the device (the basis is kept
between records, so iterations accumulate as the gradient drifts); their smallest value and condition
number are not estimated (left empty) — the top-k is what is cheap and reliable there.

Emits globally ``grad_max_sv`` (max over layers), ``grad_min_sv`` (min over exact layers),
``grad_condition`` (max over exact layers); per layer the same plus ``grad_rank``; and
``extra["grad/sv_top<i>/<layer>"]`` for i = 1..k.
"""

from __future__ import annotations

from typing import Any

import torch

from stabwatch.collectors.base import Collector, MonitorContext, Readout
from stabwatch.functional.spectral import (
    as_matrix,
    condition_number,
    randomized_singular_values,
    singular_values,
)

__all__ = ["GradientSpectrumCollector"]


def _layer_name(param_name: str) -> str:
    return param_name[: -len(".weight")] if param_name.endswith(".weight") else param_name


class GradientSpectrumCollector(Collector):
    family = "grad_sv"

    def __init__(
        self,
        every: Any = 100,
        top_k: int = 3,
        exact_max_dim: int = 256,
        n_iter: int = 4,
        warm_iter: int = 1,
    ) -> None:
        super().__init__(every)
        self.top_k = top_k
        self.exact_max_dim = exact_max_dim
        self.n_iter = n_iter
        self.warm_iter = warm_iter
        self._bases: dict[str, torch.Tensor] = {}

    def setup(self, ctx: MonitorContext) -> None:
        self._targets = [(name, p) for name, p in ctx.params if p.ndim >= 2 and min(as_matrix(p).shape) > 1]

    def teardown(self) -> None:
        self._bases = {}

    def collect(self, step: int, readout: Readout, loss: torch.Tensor | None, batch: Any) -> None:
        tops: list[torch.Tensor] = []
        exact_layers: list[str] = []
        mins: list[torch.Tensor] = []
        conds: list[torch.Tensor] = []
        ranks: list[torch.Tensor] = []
        top_layers: list[str] = []
        with torch.no_grad():
            for name, p in self._targets:
                if p.grad is None:
                    continue
                g = as_matrix(p.grad.detach())
                layer = _layer_name(name)
                try:
                    if min(g.shape) <= self.exact_max_dim:
                        s = singular_values(g)
                        s_min, rank, kappa = condition_number(s, (g.shape[0], g.shape[1]))
                        exact_layers.append(layer)
                        mins.append(s_min)
                        conds.append(kappa)
                        ranks.append(rank)
                        top = s[: self.top_k]
                    else:
                        basis = self._bases.get(name)
                        top, basis = randomized_singular_values(
                            g,
                            self.top_k,
                            n_iter=self.n_iter if basis is None else self.warm_iter,
                            generator=self.ctx.generator if self.ctx else None,
                            init=basis,
                        )
                        self._bases[name] = basis
                except Exception as exc:  # noqa: BLE001 - a failing metric never kills training
                    self.fail(f"gradient singular values of {name} {tuple(g.shape)}", exc)
                    continue
                top_layers.append(layer)
                tops.append(top[0])
                for i in range(top.numel()):
                    readout.add_extra(f"grad/sv_top{i + 1}", top[i], layer=layer)
        if tops:
            t = torch.stack([x.double() for x in tops])
            readout.add_layers("grad_max_sv", top_layers, t)
            readout.add("grad_max_sv", t.max())
        if exact_layers:
            m = torch.stack([x.double() for x in mins])
            c = torch.stack([x.double() for x in conds])
            readout.add_layers("grad_min_sv", exact_layers, m)
            readout.add_layers("grad_condition", exact_layers, c)
            readout.add_layers("grad_rank", exact_layers, torch.stack([x.double() for x in ranks]))
            readout.add("grad_min_sv", m.min())
            readout.add("grad_condition", c.max())
