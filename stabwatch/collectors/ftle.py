"""Input-space FTLE during training: mean and max of λ(x) over a fixed probe batch.

At a scheduled step (after the optimizer step) the maximal finite-time Lyapunov exponent

    λ(x) = (1/L) · log σ_max(J_L(x)),      J_L(x) = ∂(model output)/∂x

is computed for every input of a probe batch with `stabwatch.analysis.ftle` (exact Jacobians for small
inputs, Lanczos iteration with JVP/VJP pairs for large ones), at the last of ``layers`` (for an
``nn.Sequential`` by default its output, ℓ = the number of weight layers; any other model: its output with
ℓ = 1 unless ``layers``/``depths`` say otherwise). λ ≫ 0 on many probes: the network amplifies input
perturbations by a factor ``e^{λL}`` (sensitive, ridges crossing the data); λ ≪ 0 everywhere: signals and
gradients die with depth (training slows). Training tends to bring the distribution to centre around 0.

Keys (``record.extra``):

* ``ftle/mean``: mean of λ over the probe inputs, nats per layer;
* ``ftle/max``: the largest λ over the probe inputs.

The probe: ``probe=`` (a tensor ``[n, *input_shape]``); without one, the inputs of the first batch handed
to ``Monitor.step(batch=...)`` at the family's first scheduled step (a tensor, or the first element of a
tuple/list; at most ``max_probe`` rows) are copied once and kept, so every record measures the same inputs.

The measurement does not change training: the model runs in eval mode (each module's flag restored),
the monitor's other hooks are paused, no ``.grad`` is written, the start vectors come from a generator of
its own and the global RNG state is restored afterwards. Off in the ``cheap`` and ``default`` presets.

Cost per record: exact path ~``d`` forward passes of the probe batch (``d`` = input size ≤
``exact_max_dim``); iterative paths ~3 forward-equivalents per iteration (one JVP, one VJP), at most
``max_iter`` iterations (Lanczos: typically 5–20 at ``tol=1e-3``).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from stabwatch.collectors.base import Collector, CollectorOptions, MonitorContext, Readout
from stabwatch.errors import ConfigError

__all__ = ["FTLECollector"]

#: offset of the start-vector generator's seed from the monitor's seed
_SEED_OFFSET = 0xF71E


class FTLECollector(Collector):
    """See the module docstring.

    Args:
        probe: inputs ``[n, *input_shape]`` to measure (floating point); ``None``: the first scheduled
            step's batch inputs.
        layers: passed to `stabwatch.analysis.ftle` (module paths); ``None``: its defaults. The keys
            report the last one.
        depths: the ℓ of each layer (see `stabwatch.analysis.ftle`).
        method: ``"auto"`` (exact when the input has ≤ ``exact_max_dim`` components, else Lanczos),
            ``"exact"``, ``"lanczos"``, ``"power"``.
        exact_max_dim: the ``"auto"`` threshold.
        tol: iterative paths: tolerance on the estimated error of ``log σ_max`` (nats).
        max_iter: iterative paths: iterations at most.
        max_probe: rows kept from a batch when ``probe`` is not given.

    Example:
        >>> import torch, stabwatch as sw
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> probe = torch.randn(16, 2)
        >>> col = sw.collectors.FTLECollector(every=5, probe=probe)
        >>> with sw.Monitor(model, opt, preset="cheap", collectors=[col], alerts=False) as mon:
        ...     for _ in range(6):  # steps 0..5: measured at 0 and 5
        ...         opt.zero_grad(); loss = model(probe).pow(2).mean(); loss.backward(); opt.step()
        ...         rec = mon.step(loss=loss)
        >>> sorted(k for k in rec.extra if k.startswith("ftle/"))
        ['ftle/max', 'ftle/mean']
    """

    family = "ftle"
    default_every = 500

    class Options(CollectorOptions):
        probe: torch.Tensor | None = None
        layers: tuple[str, ...] | None = None
        depths: tuple[int, ...] | None = None
        method: str = "auto"
        exact_max_dim: int = Field(default=64, ge=1)
        tol: float = Field(default=1e-3, gt=0)
        max_iter: int = Field(default=50, ge=1)
        max_probe: int = Field(default=256, ge=1)

    probe: torch.Tensor | None
    layers: tuple[str, ...] | None
    depths: tuple[int, ...] | None
    method: str
    exact_max_dim: int
    tol: float
    max_iter: int
    max_probe: int

    def __init__(self, every: Any = 500, **options: Any) -> None:
        super().__init__(every, **options)
        if self.method not in ("auto", "exact", "lanczos", "power"):
            raise ConfigError(
                f"FTLECollector: method must be 'auto', 'exact', 'lanczos' or 'power', got {self.method!r}"
            )
        if self.probe is not None:
            p = self.probe
            if p.ndim < 2 or p.shape[0] == 0 or not p.is_floating_point():
                raise ConfigError(
                    f"FTLECollector: probe must be a floating-point tensor [n, *input_shape] with n ≥ 1, got "
                    f"shape {tuple(p.shape)} and dtype {p.dtype}"
                )
        self._probe: torch.Tensor | None = None
        self._loaded = False  # `_probe` came from load_state_dict before the monitor started: keep it
        self._seed = 0

    def setup(self, ctx: MonitorContext) -> None:
        if self.probe is not None:
            self._probe = self.probe.detach().clone()
        elif not self._loaded:
            self._probe = None
        self._loaded = False
        self._seed = int(ctx.generator.initial_seed()) + _SEED_OFFSET

    def state_dict(self) -> dict[str, Any]:
        """The probe taken from a batch (``{"probe": tensor}``; ``{}`` before one was taken or when the
        probe was given): a resumed run measures the same inputs as an uninterrupted one."""
        return {} if self.probe is not None or self._probe is None else {"probe": self._probe}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output (before or after the monitor starts)."""
        probe = state.get("probe")
        if probe is None:
            return
        if not isinstance(probe, torch.Tensor) or probe.ndim < 2:
            raise ConfigError(
                f"FTLECollector.load_state_dict: expected {{'probe': tensor [n, *input_shape]}}, got {probe!r}"
            )
        self._probe = probe.detach().clone()
        self._loaded = self.ctx is None

    def _probe_from(self, batch: Any) -> torch.Tensor:
        x = batch
        if isinstance(batch, (tuple, list)) and batch:
            x = batch[0]
        if not isinstance(x, torch.Tensor) or x.ndim < 2 or not x.is_floating_point():
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(
                f"FTLECollector: no probe given and the step's batch has no floating-point input tensor "
                f"[n, *input_shape] (got {got}); pass FTLECollector(probe=inputs) or Monitor.step(batch=(x, y))"
            )
        return x[: self.max_probe].detach().clone()

    def collect(self, step: int, readout: Readout, loss: torch.Tensor | None, batch: Any) -> None:
        from stabwatch.analysis.ftle import ftle

        assert self.ctx is not None
        ctx = self.ctx
        if self._probe is None:
            if batch is None:
                return  # nothing to measure yet: the first step with a batch takes the probe
            self._probe = self._probe_from(batch)
        model = ctx.model
        param = next(iter(model.parameters()), None)
        x = self._probe
        if param is not None and x.device != param.device:
            x = x.to(param.device)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), ctx.hooks_paused():
            res = ftle(
                model,
                x,
                layers=list(self.layers) if self.layers is not None else None,
                depths=list(self.depths) if self.depths is not None else None,
                method=self.method,  # type: ignore[arg-type]
                exact_max_dim=self.exact_max_dim,
                tol=self.tol,
                max_iter=self.max_iter,
                generator=torch.Generator().manual_seed(self._seed),
            )
        lam = res.exponents[:, -1]
        readout.add_extra("ftle/mean", lam.mean(), reduce="mean")
        readout.add_extra("ftle/max", lam.max(), reduce="max")
