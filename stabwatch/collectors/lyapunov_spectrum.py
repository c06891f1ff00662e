"""The top-k Lyapunov exponents of each recurrent module of the model, on a fixed probe batch.

Every ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` of the model (unidirectional, ``proj_size=0``; or the ones named
in ``modules``) is run, with its current weights, over a probe batch that is fixed for the whole run, and
the QR method (`stabwatch.functional.recurrent.qr_lyapunov`, ``top_k`` frame columns, Q ← J·Q by JVPs)
gives its ``top_k`` leading exponents, averaged over the probe sequences, in nats per step. This is the
readout of Vogt et al. (2020): the spectrum separates stable from unstable training across
hyperparameters. λ_1 > 0 means the network's state forgets its past chaotically (exploding sensitivity);
λ_1 ≪ 0 means it forgets fast (vanishing memory).

The probe batch is ``probe`` if given (``[batch, time, input_size]``, fed to every monitored module), else
``batch`` sequences of ``steps`` standard-normal inputs per module, drawn once from a generator of its
own seeded with ``seed`` (the global RNG and the monitor's generator are not touched); the start state is
zero and the first ``warmup`` steps are discarded. The weights are only read (detached, no copy, no
graph; the pure cell functions of `stabwatch.functional.recurrent` replace the module's forward), so
training is unchanged.

Emits ``extra["lyapunov_spectrum/max"]`` (the largest λ_1 over the monitored modules) and per module
``extra["lyapunov_spectrum/top<i>/<module>"]`` (flat key ``lyapunov_spectrum_layers/top<i>/<module>``),
i = 1..k with k = min(top_k, the module's state dimension). Off in the ``cheap`` and ``default`` presets.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from stabwatch.collectors.base import Collector, CollectorOptions, MonitorContext, Readout
from stabwatch.errors import ConfigError
from stabwatch.functional.recurrent import qr_lyapunov, random_frame, recurrent_params, recurrent_step

__all__ = ["LyapunovSpectrumCollector"]


class LyapunovSpectrumCollector(Collector):
    """See the module docstring.

    Args:
        top_k: how many leading exponents per module (frame columns: the cost is ~``top_k`` JVPs per step).
        steps: length of the probe sequences (time steps, warmup included).
        warmup: steps discarded at the start (state and frame transients).
        batch: probe sequences per module (drawn when ``probe`` is ``None``).
        qr_every: steps between re-orthonormalisations.
        modules: module paths to monitor (``()``: every supported recurrent module).
        probe: a fixed ``[batch, time, input_size]`` input tensor for every monitored module (``None``: drawn).
        seed: seeds the drawn probe and the start frame.

    Example:
        >>> import stabwatch as sw
        >>> model = torch.nn.LSTM(3, 4, batch_first=True)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> col = LyapunovSpectrumCollector(every=1, top_k=2, steps=30, warmup=10)
        >>> with sw.Monitor(model, opt, preset="cheap", collectors=[col], alerts=False) as mon:
        ...     model(torch.randn(2, 5, 3))[0].sum().backward()
        ...     opt.step()
        ...     rec = mon.step()
        >>> sorted(k for k in rec.to_dict() if k.startswith("lyapunov_spectrum"))
        ['lyapunov_spectrum/max', 'lyapunov_spectrum_layers/top1/_root_', 'lyapunov_spectrum_layers/top2/_root_']
    """

    family = "lyapunov_spectrum"
    default_every = 500

    class Options(CollectorOptions):
        top_k: int = Field(default=3, ge=1)
        steps: int = Field(default=60, ge=2)
        warmup: int = Field(default=20, ge=0)
        batch: int = Field(default=4, ge=1)
        qr_every: int = Field(default=1, ge=1)
        modules: tuple[str, ...] = ()
        probe: Any = None
        seed: int = 0

    top_k: int
    steps: int
    warmup: int
    batch: int
    qr_every: int
    modules: tuple[str, ...]
    probe: Any
    seed: int

    def __init__(self, every: Any = 500, **options: Any) -> None:
        super().__init__(every, **options)
        if self.probe is not None and (not isinstance(self.probe, torch.Tensor) or self.probe.ndim != 3):
            got = tuple(self.probe.shape) if isinstance(self.probe, torch.Tensor) else type(self.probe).__name__
            raise ConfigError(
                f"LyapunovSpectrumCollector.probe: expected a [batch, time, input_size] tensor, got {got}"
            )
        length = self.steps if self.probe is None else int(self.probe.shape[1])
        if self.warmup >= length:
            raise ConfigError(
                f"LyapunovSpectrumCollector.warmup: must be < the probe length ({length} steps), got {self.warmup}"
            )
        self._targets: list[tuple[str, nn.Module]] = []
        self._probes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def setup(self, ctx: MonitorContext) -> None:
        found = {
            name or "(root)": m
            for name, m in ctx.model.named_modules()
            if isinstance(m, nn.RNN | nn.LSTM | nn.GRU) and not m.bidirectional and not getattr(m, "proj_size", 0)
        }
        if self.modules:
            missing = [m for m in self.modules if m not in found]
            if missing:
                raise ConfigError(
                    f"LyapunovSpectrumCollector.modules: {missing} are not unidirectional nn.RNN/LSTM/GRU modules "
                    f"of the model; found {sorted(found)}"
                )
            self._targets = [(m, found[m]) for m in self.modules]
        else:
            self._targets = sorted(found.items())
        if self.probe is not None:
            bad = [(n, m.input_size) for n, m in self._targets if m.input_size != self.probe.shape[-1]]
            if bad:
                raise ConfigError(
                    f"LyapunovSpectrumCollector.probe: last dimension {self.probe.shape[-1]} does not match the "
                    f"input sizes of {bad}"
                )
        self._probes = {}

    def teardown(self) -> None:
        self._targets = []
        self._probes = {}

    def _probe(self, name: str, input_size: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed ``(inputs [T, B, d], frame [B, n, k])`` of a module, drawn on first use.

        The generator is seeded with ``seed + sum(map(ord, name))``; the frame is drawn first, as
        `stabwatch.analysis.lyapunov_spectrum` draws it with that ``seed``, so both give the same numbers.
        """
        if name not in self._probes:
            gen = torch.Generator().manual_seed(self.seed + sum(map(ord, name)))
            b = self.batch if self.probe is None else int(self.probe.shape[0])
            frame = random_frame(gen, (b, n, k), torch.float64, torch.device("cpu"))
            if self.probe is None:
                xs = torch.randn((self.steps, b, input_size), generator=gen, dtype=torch.float64)
            else:
                xs = self.probe.detach().transpose(0, 1)
            self._probes[name] = (xs, frame)
        return self._probes[name]

    def collect(self, step: int, readout: Readout, loss: torch.Tensor | None, batch: Any) -> None:
        tops: list[torch.Tensor] = []
        for name, module in self._targets:
            try:
                params = recurrent_params(module)
                w = params.layers[0][0]
                k = min(self.top_k, params.state_dim)
                xs, frame = self._probe(name, params.input_size, k, params.state_dim)
                xs = xs.to(device=w.device, dtype=w.dtype)
                state = torch.zeros(xs.shape[1], params.state_dim, device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    out = qr_lyapunov(
                        recurrent_step(params),
                        state,
                        xs,
                        frame.to(device=w.device, dtype=w.dtype),
                        warmup=self.warmup,
                        qr_every=self.qr_every,
                    )
                lam = (out.log_r / out.steps).sort(dim=-1, descending=True).values.mean(0)
            except Exception as exc:  # noqa: BLE001 - a failing metric never kills training
                self.fail(f"Lyapunov spectrum of {name}", exc)
                continue
            for i, value in enumerate(lam.unbind()):
                readout.add_extra(f"lyapunov_spectrum/top{i + 1}", value, layer=name)
            tops.append(lam[0])
        if tops:
            readout.add_extra("lyapunov_spectrum/max", torch.stack(tops).max())
