"""Weight spectra: spectral norm of every 2-D weight and spectral radius of recurrent (square) weights.

* ``spectral_norm`` (``weight/spectral_norm[/layer]``): largest singular value by warm-started power
  iteration with a persistent left vector per weight (as ``torch.nn.utils.spectral_norm``); the first
  record runs ``init_iter`` iterations, later ones ``n_iter`` (each iteration reads the weight twice).
* ``spectral_radius`` (``weight/spectral_radius[/layer]``): largest |eigenvalue| (``eigvals``) of the
  hidden-to-hidden blocks of ``nn.RNN``/``LSTM``/``GRU`` (``weight_hh_l<k>`` split into its 1/4/3
  gate blocks, layer keys ``<module>.weight_hh_l0.<gate>``) and of parameters whose name contains
  ``weight_hh`` or ``recurrent``. With ``radius="square"`` every square 2-D weight is included.

FSDP2 (``fully_shard``): each sharded weight is gathered whole (``DTensor.full_tensor``, one all-gather per
weight) at the family's scheduled steps only, and every rank computes the same spectrum.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from stabwatch import distributed as _dist
from stabwatch.collectors.base import Collector, CollectorOptions, MonitorContext, Readout
from stabwatch.errors import ConfigError
from stabwatch.functional.spectral import as_matrix, spectral_norm, spectral_radius

__all__ = ["WeightCollector"]

_GATES = {nn.RNN: ("h",), nn.LSTM: ("i", "f", "g", "o"), nn.GRU: ("r", "z", "n")}


class WeightCollector(Collector):
    """See the module docstring.

    Options:
        n_iter: power iterations per record after the first; init_iter: on the first record.
        radius: ``"recurrent"`` (RNN/LSTM/GRU hidden weights), ``"square"`` (every square weight too)
            or ``"none"``.
    """

    family = "weight"
    default_every = 100

    class Options(CollectorOptions):
        n_iter: int = Field(default=2, ge=1)
        init_iter: int = Field(default=30, ge=1)
        radius: Literal["recurrent", "square", "none"] = "recurrent"

    n_iter: int
    init_iter: int
    radius: str

    def __init__(self, every: Any = 100, **options: Any) -> None:
        super().__init__(every, **options)
        self._u: dict[str, torch.Tensor] = {}
        self._loaded = False  # `_u` came from load_state_dict before the monitor started: keep it in setup

    def setup(self, ctx: MonitorContext) -> None:
        if not self._loaded:  # a collector attached again starts cold
            self._u = {}
        self._loaded = False
        self._norm_targets = [
            (n[: -len(".weight")] if n.endswith(".weight") else n, p)
            for n, p in ctx.params
            if p.ndim >= 2 and min(as_matrix(p).shape) > 0
        ]
        self._radius_targets: list[tuple[str, nn.Parameter, int, int]] = []  # (key, p, row0, size)
        if self.radius == "none":
            return
        claimed: set[int] = set()
        for mod_name, module in ctx.model.named_modules():
            gates = next((g for t, g in _GATES.items() if isinstance(module, t)), None)
            if gates is None:
                continue
            for p_name, p in module.named_parameters(recurse=False):
                if p_name.startswith("weight_hh") and p.ndim == 2:
                    h = p.shape[1]
                    for gi, gate in enumerate(gates):
                        key = f"{mod_name}.{p_name}" if mod_name else p_name
                        self._radius_targets.append((f"{key}.{gate}" if len(gates) > 1 else key, p, gi * h, h))
                    claimed.add(id(p))
        for name, p in ctx.params:
            if id(p) in claimed or p.ndim != 2 or p.shape[0] != p.shape[1]:
                continue
            if self.radius == "square" or "weight_hh" in name or "recurrent" in name:
                key = name[: -len(".weight")] if name.endswith(".weight") else name
                self._radius_targets.append((key, p, 0, p.shape[0]))

    # teardown keeps `_u` (one vector per weight): state_dict() after the monitor closed still has it

    def state_dict(self) -> dict[str, Any]:
        """The power iteration's left vector of every weight (``{"u": {layer: tensor}}``): a resumed run
        warm-starts from them and measures exactly what an uninterrupted one does."""
        return {"u": dict(self._u)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output (before or after the monitor starts); a layer not in it starts cold."""
        u = state.get("u", {})
        if not isinstance(u, dict) or not all(isinstance(v, torch.Tensor) for v in u.values()):
            raise ConfigError(
                f"WeightCollector.load_state_dict: expected {{'u': {{layer: tensor}}}}, got {state!r:.200}"
            )
        self._u = dict(u)
        self._loaded = self.ctx is None

    def collect(self, step: int, readout: Readout, loss: torch.Tensor | None, batch: Any) -> None:
        gen = self.ctx.generator if self.ctx else None
        with torch.no_grad():
            norms, layers = [], []
            for layer, p in self._norm_targets:
                try:
                    u = self._u.get(layer)
                    if u is not None and u.device != p.device:  # loaded from a checkpoint on another device
                        u = u.to(p.device)
                    sigma, self._u[layer] = spectral_norm(
                        _dist.full_tensor(p), u, n_iter=self.init_iter if u is None else self.n_iter, generator=gen
                    )
                except Exception as exc:  # noqa: BLE001
                    self.fail(f"spectral norm of {layer}", exc)
                    continue
                norms.append(sigma.double())
                layers.append(layer)
            if norms:
                t = torch.stack(norms)
                readout.add_layers("spectral_norm", layers, t)
                readout.add("spectral_norm", t.max())
            radii, r_layers = [], []
            for key, p, row0, size in self._radius_targets:
                try:
                    radii.append(spectral_radius(_dist.full_tensor(p).detach()[row0 : row0 + size]).double())
                except Exception as exc:  # noqa: BLE001
                    self.fail(f"spectral radius of {key}", exc)
                    continue
                r_layers.append(key)
            if radii:
                t = torch.stack(radii)
                readout.add_layers("spectral_radius", r_layers, t)
                readout.add("spectral_radius", t.max())
