"""Spiking-network diagnostics: firing rates, dead / saturated neurons and membrane statistics.

Spiking layers are found automatically through *adapters* (a `SpikingAdapter` says where a module's
spikes, membrane potential and threshold are, and which dim is time). Built in:

=================  ===========================================================  =========================
library            modules                                                      spikes / membrane / time
=================  ===========================================================  =========================
snntorch           ``SpikingNeuron`` subclasses (``Leaky``, ``Synaptic``,        output (or its first
                   ``Alpha``, ``RLeaky``, ``SLSTM`` ...), also ``init_hidden``   element) / ``module.mem``
                   layers                                                       / one call per step
snntorch           ``StateLeaky``, ``LinearLeaky`` (with ``output=True``)        ``out[0]`` / ``out[1]`` /
                                                                                ``[T, B, ...]``
snntorch           ``LeakyParallel``                                            output / none /
                                                                                ``[T, B, ...]``
spikingjelly       ``neuron.BaseNode``, ``neuron.SimpleBaseNode``               output / ``v_seq`` or
                                                                                ``v`` / ``step_mode``
norse              ``SNN``, ``SNNCell``, ``SNNRecurrent``, ``SNNRecurrentCell``  ``out[0]`` / ``state.v``
                   (``LIF``, ``LIFCell``, ``LSNN``, ``IAF`` ...; not the         / ``LIF`` ``[T, B, ...]``,
                   non-spiking ``LI`` family)                                   cells one step
=================  ===========================================================  =========================

Any other module is covered with a small adapter, per monitor (``Monitor(...,
collectors=[SpikingCollector(adapters=[...])])``) or for the process (`register_adapter`).

What is accumulated: on a scheduled step, each forward call of a spiking module in training mode adds,
on the device, its spikes (a time-major call summed over time first) and its membrane ``v`` and ``v^2``
elementwise into per-layer float32 running sums, and counts the threshold's elements; at the record the
sums are reduced to spike counts per neuron and membrane moments (``sum v``, ``sum v^2``,
``sum threshold``) and reach the host in the record's one copy. A per-step call ``[B, ...]`` counts
``B`` samples, a time-major call ``[T, B, ...]`` counts ``T * B`` (see `stabwatch.functional.spiking`
for the formulas). Calls in eval mode (``module.training`` false) are ignored unless
``training_only=False``.

Which membrane is read: the one the library exposes after the call. snntorch: ``mem`` before the
reset with the default ``reset_delay=True`` (after it otherwise). spikingjelly: ``v`` after the
reset; in ``step_mode='m'`` only the last step's ``v`` unless ``store_v_seq=True`` (then all steps).
norse: ``state.v`` after the reset; ``LIF`` returns the last step's state unless
``record_states=True``. snntorch's ``LeakyParallel`` exposes no membrane (membrane fields stay empty).

Emits, per layer in ``layers[<module path>]`` and globally (all neurons / membrane elements of all
spiking layers pooled, so a layer weighs by its size; the ``activation`` family's global values are
instead unweighted means over its layers):

* ``firing_rate_mean`` (``spiking/firing_rate_mean``): mean firing rate over neurons;
* ``firing_rate_std`` (``spiking/firing_rate_std``): its std over neurons;
* ``dead_neuron_frac`` (``spiking/dead_neuron_frac``): fraction of neurons with rate < ``dead_threshold``
  (0.01);
* ``saturated_neuron_frac`` (``spiking/saturated_neuron_frac``): fraction with rate >
  ``saturated_threshold`` (0.9);
* ``membrane_mean`` / ``membrane_std`` (``spiking/membrane_mean`` ...): over all membrane elements seen;
* ``membrane_threshold_distance`` (``spiking/membrane_threshold_distance``): mean of
  ``threshold - v`` (positive: below threshold);
* ``spiking/surrogate_grad`` (per layer ``spiking_layers/surrogate_grad/<layer>``, extra keys): the mean
  derivative of the layer's own surrogate spike function (the adapter's ``surrogate``: snntorch
  ``spike_grad``, spikingjelly ``surrogate_function``, norse ``threshold(u, p.method, p.alpha)``) at
  ``u = v - threshold`` over a sample of the step's membrane values (about ``surrogate_samples`` per
  layer: whole rows of 4 forward calls spread over the step), computed at the record with one autograd
  pass of its own (`stabwatch.functional.spiking.surrogate_statistics`); the global value pools the
  layers by neuron count. How much gradient the surrogate lets through: a too-steep surrogate reads
  low from step 0;
* ``spiking/near_threshold_frac`` (per layer ``spiking_layers/near_threshold_frac/<layer>``): the
  fraction of the sampled ``u`` inside the surrogate's half-maximum window; for a layer whose surrogate
  is not reachable, ``|u| <= surrogate_width`` when that option is set.

Schedule: every step for the first ``dense_steps`` (20) steps of the run, then every ``every`` steps
(`stabwatch.schedules.dense_start`). The hooks are on the modules only during scheduled steps.

Distributed (more than one process): the per-neuron spike counts, the sample counts and the membrane
sums (``sum v``, ``sum v^2``, ``sum threshold``, element counts) are summed across ranks in the record's
one all-gather before the statistics are computed, so every value is that of the combined batch (a
neuron's rate over all ranks' samples). The all-gather carries one number per neuron of each spiking layer.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from pydantic import Field, model_validator
from torch import nn

from stabwatch import distributed as _dist
from stabwatch.collectors.base import Collector, CollectorOptions, MonitorContext, Readout
from stabwatch.errors import StabwatchError
from stabwatch.functional.spiking import (
    layer_firing_statistics,
    near_threshold_fraction,
    pooled_membrane_statistics,
    sample_dims,
    surrogate_statistics,
)
from stabwatch.schedules import Schedule, dense_start

__all__ = [
    "ADAPTERS",
    "AdapterRegistry",
    "SpikeReading",
    "SpikingAdapter",
    "SpikingCollector",
    "builtin_adapters",
    "register_adapter",
]

log = logging.getLogger("stabwatch")

#: forward calls per layer and step whose membrane is sampled for the surrogate statistics
_SAMPLED_CALLS = 4
_SURROGATE_KEY = "spiking/surrogate_grad"
_NEAR_KEY = "spiking/near_threshold_frac"
_FIRING_FIELDS = ("firing_rate_mean", "firing_rate_std", "dead_neuron_frac", "saturated_neuron_frac")
_MEMBRANE_FIELDS = ("membrane_mean", "membrane_std", "membrane_threshold_distance")


class SpikeReading(NamedTuple):
    """What an adapter read from one forward call of a spiking module.

    Attributes:
        spikes: the spike tensor.
        time_dim: ``None`` (``[B, ...]``), ``0`` (``[T, B, ...]``) or ``1`` (``[B, T, ...]``).
        membrane: the membrane potential (any layout; all its elements are pooled) or ``None``.
        threshold: the firing threshold (float, or a tensor broadcasting to the membrane) or ``None``.
    """

    spikes: torch.Tensor
    time_dim: int | None
    membrane: torch.Tensor | None
    threshold: torch.Tensor | float | None


def _tensor(x: Any) -> torch.Tensor | None:
    return x if isinstance(x, torch.Tensor) else None


def _item(out: Any, index: int) -> Any:
    if isinstance(out, torch.Tensor):
        return out if index == 0 else None
    if isinstance(out, (tuple, list)) and -len(out) <= index < len(out):
        return out[index]
    return None


class SpikingAdapter:
    """Where a spiking module keeps its spikes, membrane and threshold, and which dim is time.

    Args:
        match: a module class, a tuple of classes, or a predicate ``module -> bool``.
        spikes: an index into the module's output tuple (a bare tensor output is index 0), or a
            callable ``(module, output) -> Tensor | None``. ``None`` from it skips the call.
        membrane: an index into the output tuple, the name of a module attribute read after the call
            (``"mem"``, ``"v"``), a callable ``(module, output) -> Tensor | None``, or ``None``.
        threshold: a number, the name of a module attribute, a callable ``module -> float | Tensor``,
            or ``None`` (then ``membrane_threshold_distance`` is not computed).
        time_dim: ``None`` (one call per time step, ``[B, ...]``), ``0`` (``[T, B, ...]``), ``1``
            (``[B, T, ...]``), or a callable ``(module, spikes) -> int | None``.
        surrogate: where the layer's surrogate spike function is (applied to ``membrane - threshold``,
            a step forward and the surrogate backward): the name of a module attribute
            (``"spike_grad"``), a callable ``module -> function | None``, or ``None`` (then the
            ``surrogate_grad`` key is not emitted for the layer; see `SpikingCollector`'s
            ``surrogate_width``).
        name: a label for logs and error messages.

    Raises:
        StabwatchError: an argument of the wrong kind (the message names it and the allowed kinds).

    Example:
        >>> import torch
        >>> class MyLIF(torch.nn.Module):  # returns spikes; keeps its membrane in `self.v`
        ...     def forward(self, x):
        ...         self.v = x
        ...         return (x > 1.0).float()
        >>> adapter = SpikingAdapter(MyLIF, spikes=0, membrane="v", threshold=1.0, time_dim=None)
        >>> m = MyLIF(); out = m(torch.tensor([[0.5, 2.0]]))
        >>> r = adapter.read(m, out)
        >>> r.spikes.tolist(), r.membrane.tolist(), r.threshold, r.time_dim
        ([[0.0, 1.0]], [[0.5, 2.0]], 1.0, None)
    """

    def __init__(
        self,
        match: type | tuple[type, ...] | Callable[[nn.Module], bool],
        *,
        spikes: int | Callable[[nn.Module, Any], torch.Tensor | None] = 0,
        membrane: int | str | Callable[[nn.Module, Any], torch.Tensor | None] | None = None,
        threshold: float | str | Callable[[nn.Module], Any] | None = None,
        time_dim: int | Callable[[nn.Module, torch.Tensor], int | None] | None = None,
        surrogate: str | Callable[[nn.Module], Any] | None = None,
        name: str | None = None,
    ) -> None:
        if isinstance(match, type) or (isinstance(match, tuple) and match and all(isinstance(m, type) for m in match)):
            types = match

            def _isinstance(module: nn.Module) -> bool:
                return isinstance(module, types)

            self._match: Callable[[nn.Module], bool] = _isinstance
            label = match.__name__ if isinstance(match, type) else "/".join(m.__name__ for m in match)
        elif callable(match):
            self._match = match
            label = getattr(match, "__name__", "predicate")
        else:
            raise StabwatchError(
                f"SpikingAdapter: match must be a module class, a tuple of classes or a callable "
                f"module -> bool, got {match!r}"
            )
        if not (callable(spikes) or (isinstance(spikes, int) and not isinstance(spikes, bool))):
            raise StabwatchError(
                f"SpikingAdapter({label}): spikes must be an output index (int) or a callable "
                f"(module, output) -> Tensor, got {spikes!r}"
            )
        if membrane is not None and not (
            callable(membrane)
            or isinstance(membrane, str)
            or (isinstance(membrane, int) and not isinstance(membrane, bool))
        ):
            raise StabwatchError(
                f"SpikingAdapter({label}): membrane must be None, an output index (int), a module attribute "
                f"name (str) or a callable (module, output) -> Tensor, got {membrane!r}"
            )
        if threshold is not None and not (
            callable(threshold)
            or isinstance(threshold, str)
            or (isinstance(threshold, (int, float)) and not isinstance(threshold, bool))
        ):
            raise StabwatchError(
                f"SpikingAdapter({label}): threshold must be None, a number, a module attribute name (str) or a "
                f"callable module -> float | Tensor, got {threshold!r}"
            )
        if not (time_dim is None or callable(time_dim) or (time_dim in (0, 1) and not isinstance(time_dim, bool))):
            raise StabwatchError(
                f"SpikingAdapter({label}): time_dim must be None (one call per step, [B, ...]), 0 ([T, B, ...]), "
                f"1 ([B, T, ...]) or a callable (module, spikes) -> int | None, got {time_dim!r}"
            )
        if surrogate is not None and not (callable(surrogate) or isinstance(surrogate, str)):
            raise StabwatchError(
                f"SpikingAdapter({label}): surrogate must be None, a module attribute name (str) or a callable "
                f"module -> spike function, got {surrogate!r}"
            )
        self.name = name or label
        self.surrogate = surrogate
        self.spikes = spikes
        self.membrane = membrane
        self.threshold = threshold
        self.time_dim = time_dim

    def matches(self, module: nn.Module) -> bool:
        """Whether this adapter handles ``module``."""
        return bool(self._match(module))

    def surrogate_fn(self, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The module's surrogate spike function (``u -> spikes``), or ``None`` when not reachable."""
        spec = self.surrogate
        if spec is None:
            return None
        fn = getattr(module, spec, None) if isinstance(spec, str) else spec(module)
        return fn if callable(fn) else None

    def read(self, module: nn.Module, output: Any) -> SpikeReading | None:
        """Read one forward call; ``None`` when the call carries no spike tensor."""
        spec = self.spikes
        spikes = _tensor(spec(module, output) if callable(spec) else _item(output, spec))
        if spikes is None:
            return None
        tdim = self.time_dim(module, spikes) if callable(self.time_dim) else self.time_dim
        mem_spec = self.membrane
        if mem_spec is None:
            membrane = None
        elif callable(mem_spec):
            membrane = _tensor(mem_spec(module, output))
        elif isinstance(mem_spec, str):
            membrane = _tensor(getattr(module, mem_spec, None))
        else:
            membrane = _tensor(_item(output, mem_spec))
        if membrane is not None and not membrane.is_floating_point():
            membrane = None
        th_spec = self.threshold
        threshold: torch.Tensor | float | None
        if th_spec is None:
            threshold = None
        elif callable(th_spec):
            threshold = th_spec(module)
        elif isinstance(th_spec, str):
            threshold = getattr(module, th_spec, None)
        else:
            threshold = float(th_spec)
        if not isinstance(threshold, (torch.Tensor, float, int)) or isinstance(threshold, bool):
            threshold = None
        return SpikeReading(spikes, tdim, membrane, threshold)

    def __repr__(self) -> str:
        return f"SpikingAdapter({self.name})"


# built-in adapters ----------------------------------------------------------------------------------
# Each matcher looks the library up in sys.modules: a model can only hold a library's modules when the
# library is imported, so stabwatch never imports snntorch / spikingjelly / norse itself.


def _classes(module_name: str, *names: str) -> tuple[type, ...]:
    lib = sys.modules.get(module_name)
    if lib is None:
        return ()
    return tuple(c for c in (getattr(lib, n, None) for n in names) if isinstance(c, type))


def _snntorch_step(module: nn.Module) -> bool:
    base = _classes("snntorch", "SpikingNeuron")
    return (
        bool(base)
        and isinstance(module, base)
        and not isinstance(module, _classes("snntorch", "StateLeaky", "AssociativeLeaky"))
    )


def _snntorch_state(module: nn.Module) -> bool:
    return isinstance(module, _classes("snntorch", "StateLeaky"))


def _snntorch_parallel(module: nn.Module) -> bool:
    return isinstance(module, _classes("snntorch", "LeakyParallel"))


def _spikingjelly(module: nn.Module) -> bool:
    return isinstance(module, _classes("spikingjelly.activation_based.neuron", "BaseNode", "SimpleBaseNode"))


_NORSE_SNN = "norse.torch.module.snn"


def _norse(module: nn.Module) -> bool:
    if not isinstance(module, _classes(_NORSE_SNN, "SNN", "SNNCell", "SNNRecurrent", "SNNRecurrentCell")):
        return False
    # leaky integrators are SNN modules whose output is a voltage, not spikes
    return not isinstance(module, _classes("norse.torch", "LI", "LICell", "LIBoxCell"))


def _first_or_self(module: nn.Module, out: Any) -> torch.Tensor | None:
    return _tensor(out if isinstance(out, torch.Tensor) else _item(out, 0))


def _state_first(module: nn.Module, out: Any) -> torch.Tensor | None:
    return _tensor(_item(out, 0)) if isinstance(out, (tuple, list)) else None


def _spikingjelly_membrane(module: nn.Module, out: Any) -> torch.Tensor | None:
    if getattr(module, "step_mode", "s") == "m" and getattr(module, "store_v_seq", False):
        v_seq = _tensor(getattr(module, "v_seq", None))
        if v_seq is not None:
            return v_seq
    return _tensor(getattr(module, "v", None))


def _spikingjelly_time(module: nn.Module, spikes: torch.Tensor) -> int | None:
    return 0 if getattr(module, "step_mode", "s") == "m" else None


def _norse_membrane(module: nn.Module, out: Any) -> torch.Tensor | None:
    state = _item(out, 1)
    for path in (("v",), ("lif", "v")):
        obj = state
        for attr in path:
            obj = getattr(obj, attr, None)
        if isinstance(obj, torch.Tensor):
            return obj
    return None


def _norse_threshold(module: nn.Module) -> Any:
    p = getattr(module, "p", None)
    th = getattr(p, "v_th", None)
    if th is None:
        th = getattr(getattr(p, "lif", None), "v_th", None)
    return th


def _norse_surrogate(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    p = getattr(module, "p", None)
    p = p if hasattr(p, "method") else getattr(p, "lif", None)
    method, alpha = getattr(p, "method", None), getattr(p, "alpha", None)
    fn = getattr(sys.modules.get("norse.torch.functional.threshold"), "threshold", None)
    if not isinstance(method, str) or alpha is None or fn is None:
        return None

    def _spike(u: torch.Tensor) -> torch.Tensor:
        return fn(u, method, alpha)  # type: ignore[no-any-return]

    return _spike


def _norse_time(module: nn.Module, spikes: torch.Tensor) -> int | None:
    seq = _classes(_NORSE_SNN, "SNN", "SNNRecurrent")
    return 0 if isinstance(module, seq) else None


def builtin_adapters() -> list[SpikingAdapter]:
    """Fresh instances of the built-in adapters (snntorch, spikingjelly, norse), in matching order."""
    return [
        SpikingAdapter(
            _snntorch_state,
            spikes=_state_first,
            membrane=1,
            threshold="threshold",
            time_dim=0,
            surrogate="spike_grad",
            name="snntorch.StateLeaky",
        ),
        SpikingAdapter(_snntorch_parallel, spikes=0, threshold="threshold", time_dim=0, name="snntorch.LeakyParallel"),
        SpikingAdapter(
            _snntorch_step,
            spikes=_first_or_self,
            membrane="mem",
            threshold="threshold",
            surrogate="spike_grad",
            name="snntorch.SpikingNeuron",
        ),
        SpikingAdapter(
            _spikingjelly,
            spikes=_first_or_self,
            membrane=_spikingjelly_membrane,
            threshold="v_threshold",
            time_dim=_spikingjelly_time,
            surrogate="surrogate_function",
            name="spikingjelly.BaseNode",
        ),
        SpikingAdapter(
            _norse,
            spikes=_state_first,
            membrane=_norse_membrane,
            threshold=_norse_threshold,
            time_dim=_norse_time,
            surrogate=_norse_surrogate,
            name="norse.SNN",
        ),
    ]


class AdapterRegistry:
    """An ordered list of adapters; the first one that matches a module handles it.

    Example:
        >>> reg = AdapterRegistry()
        >>> a = reg.register(SpikingAdapter(torch.nn.Identity, name="identity"))
        >>> reg.find(torch.nn.Identity()).name, reg.find(torch.nn.ReLU()) is None
        ('identity', True)
    """

    def __init__(self, adapters: Iterable[SpikingAdapter] = ()) -> None:
        self._adapters: list[SpikingAdapter] = []
        for a in adapters:
            self.register(a, first=False)

    def register(self, adapter: SpikingAdapter, *, first: bool = True) -> SpikingAdapter:
        """Add an adapter, by default ahead of the existing ones (so it can override a built-in)."""
        if not isinstance(adapter, SpikingAdapter):
            raise StabwatchError(f"register: expected a SpikingAdapter, got {type(adapter).__name__}")
        if first:
            self._adapters.insert(0, adapter)
        else:
            self._adapters.append(adapter)
        return adapter

    def unregister(self, adapter: SpikingAdapter) -> None:
        """Remove an adapter added with `register` (no error when absent)."""
        self._adapters = [a for a in self._adapters if a is not adapter]

    def find(self, module: nn.Module) -> SpikingAdapter | None:
        for adapter in self._adapters:
            if adapter.matches(module):
                return adapter
        return None

    def __iter__(self) -> Iterator[SpikingAdapter]:
        return iter(list(self._adapters))

    def __len__(self) -> int:
        return len(self._adapters)


#: The process-wide registry: `register_adapter` adds to it; every `SpikingCollector` consults it after
#: its own per-monitor adapters.
ADAPTERS = AdapterRegistry(builtin_adapters())


def register_adapter(adapter: SpikingAdapter) -> SpikingAdapter:
    """Register an adapter for every monitor of this process (ahead of the built-ins).

    Prefer ``Monitor(..., collectors=[SpikingCollector(adapters=[adapter])])`` for one monitor; undo with
    ``ADAPTERS.unregister(adapter)``.
    """
    return ADAPTERS.register(adapter)


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors have no version counter
        return None


class _ThresholdRun:
    """Calls in a row that used the same, unmodified threshold tensor for the same membrane shape."""

    __slots__ = ("n", "obj", "shape", "snapshot", "version")

    def __init__(self, obj: torch.Tensor, shape: torch.Size, n: int) -> None:
        self.obj = obj
        self.version = _version(obj)
        self.shape = shape
        self.snapshot = obj.detach().clone()  # a learnable threshold changes at optimizer.step()
        self.n = n


class _LayerSums:
    """Running on-device sums of one spiking layer during one step.

    Per call, the spikes (summed over time first for a ``[T, B, ...]`` call) and the membrane are added
    *elementwise* to float32 accumulators of the per-call shape (``add_`` / ``addcmul_``, a kernel each);
    the reductions over batch and elements run once, at the record. A threshold tensor is counted
    (elements it applied to) while it stays the same unmodified tensor, and summed on the device only
    when it changes or at the record.
    """

    __slots__ = (
        "calls",
        "gaps",
        "n_mem",
        "no_threshold",
        "samples",
        "spikes",
        "th_device",
        "th_host",
        "th_run",
        "v",
        "v2",
    )

    def __init__(self) -> None:
        self.spikes: dict[torch.Size, torch.Tensor] = {}  # [B, *features] -> running spike sum
        self.samples = 0  # (time step, sample) pairs added
        self.v: dict[torch.Size, torch.Tensor] = {}  # membrane shape -> running sum of v
        self.v2: dict[torch.Size, torch.Tensor] = {}  # ... and of v^2
        self.n_mem = 0  # membrane elements added
        self.th_host = 0.0  # sum of float thresholds over membrane elements
        self.th_device: list[torch.Tensor] = []  # folded sums of tensor thresholds (float64, 0-d)
        self.th_run: _ThresholdRun | None = None
        self.no_threshold = False
        self.calls = 0  # forward calls with a membrane seen in this step
        self.gaps: list[torch.Tensor] = []  # sampled (membrane - threshold) values, float32, 1-D

    def fold_threshold(self) -> None:
        run = self.th_run
        if run is not None:
            self.th_device.append(run.snapshot.sum(dtype=torch.float64) * (run.n // max(run.snapshot.numel(), 1)))
            self.th_run = None


class SpikingCollector(Collector):
    """Firing rates, dead / saturated neuron fractions and membrane statistics of spiking layers.

    See the module docstring for the layers found, what is accumulated and the keys emitted. Cost on
    a scheduled step: a few elementwise kernels per forward call of a spiking layer (their output's
    size), and one reduction per layer at the record; on other steps nothing: the hooks are on the
    modules only during scheduled steps.

    Args:
        every: schedule (a period, a callable ``step -> bool`` or ``None`` for off).
        adapters: extra adapters tried before the process registry `ADAPTERS`.
        dead_threshold: a neuron firing at a rate below this is dead.
        saturated_threshold: a neuron firing at a rate above this is saturated.
        training_only: ignore forward calls made in eval mode.
        dense_steps: measure every step for the first ``dense_steps`` steps of the run, then on
            ``every`` (`stabwatch.schedules.dense_start`), so a network that starts silent is seen at
            step 0; 0 turns it off. An ``every`` that is off stays off.
        surrogate_samples: about how many membrane values per layer and step are kept for the
            surrogate-gradient statistics: whole rows of a call's leading dim (batch, or time for a
            time-major call), from 4 forward calls spread over the step (a different row each); 0
            turns them off.
        surrogate_width: for a layer whose surrogate function the adapter cannot reach: the half-width
            (membrane units) of the window around the threshold counted in ``near_threshold_frac``;
            ``None``: no value for such a layer.

    Raises:
        StabwatchError: thresholds outside ``0 <= dead_threshold < saturated_threshold``, or an
            adapter that is not a `SpikingAdapter`.
    """

    family = "spiking"

    default_every = 10

    class Options(CollectorOptions):
        adapters: tuple[Any, ...] = ()
        dead_threshold: float = Field(default=0.01, ge=0.0)
        saturated_threshold: float = Field(default=0.9, gt=0.0)
        training_only: bool = True
        dense_steps: int = Field(default=20, ge=0)
        surrogate_samples: int = Field(default=2048, ge=0)
        surrogate_width: float | None = Field(default=None, gt=0.0)

        @model_validator(mode="after")
        def _check(self) -> SpikingCollector.Options:
            if not (self.dead_threshold < self.saturated_threshold):
                raise ValueError(
                    f"need dead_threshold < saturated_threshold, got dead_threshold={self.dead_threshold} "
                    f"and saturated_threshold={self.saturated_threshold}"
                )
            for i, a in enumerate(self.adapters):
                if not isinstance(a, SpikingAdapter):
                    raise ValueError(f"adapters[{i}] must be a stabwatch SpikingAdapter, got {type(a).__name__}")
            return self

    adapters: tuple[SpikingAdapter, ...]
    dead_threshold: float
    saturated_threshold: float
    training_only: bool
    dense_steps: int
    surrogate_samples: int
    surrogate_width: float | None

    def __init__(self, every: Any = 10, **options: Any) -> None:
        super().__init__(every, **options)
        self.schedule = self._dense(self.schedule)
        self.layers: list[str] = []
        self.layer_adapters: dict[str, str] = {}
        self._sums: list[_LayerSums] = []
        self._modules: list[tuple[nn.Module, SpikingAdapter]] = []
        self._sample_every: list[int] = []  # per layer: sample every n-th call (from the last step's calls)
        self._surrogate_failed = False

    def _dense(self, schedule: Schedule) -> Schedule:
        return dense_start(schedule, self.dense_steps)

    def reschedule(self, every: Any) -> None:
        super().reschedule(every)
        self.schedule = self._dense(self.schedule)

    def _find(self, module: nn.Module) -> SpikingAdapter | None:
        for adapter in self.adapters:
            if adapter.matches(module):
                return adapter
        return ADAPTERS.find(module)

    def setup(self, ctx: MonitorContext) -> None:
        self.layers, self.layer_adapters, self._modules = [], {}, []
        for name, module in ctx.model.named_modules():
            adapter = self._find(module)
            if adapter is None:
                continue
            index = len(self.layers)
            path = name or "(root)"
            self.layers.append(path)
            self.layer_adapters[path] = adapter.name
            self._modules.append((module, adapter))
            self.add_hook(module.register_forward_hook, self._make_hook(index, adapter))
        self._sums = [_LayerSums() for _ in self.layers]
        self._sample_every = [1 for _ in self.layers]
        if self.layers:
            log.debug("stabwatch: spiking layers %s", self.layer_adapters)

    def _make_hook(self, index: int, adapter: SpikingAdapter) -> Any:
        # registered only during scheduled steps (`begin_step`): unscheduled ones pay no hook dispatch
        def _observe(module: nn.Module, args: Any, out: Any) -> None:
            if not self.active or (self.training_only and not module.training):
                return
            reading = adapter.read(module, out)
            if reading is None:
                return
            with torch.no_grad():
                self._add(index, reading)

        return self.guard(_observe)

    def _add(self, index: int, r: SpikeReading) -> None:
        sums = self._sums[index]
        spikes = r.spikes.detach()
        dims = sample_dims(spikes.ndim, r.time_dim)  # validates the layout
        if len(dims) == 2:  # fold time first: [T, B, *f] or [B, T, *f] -> [B, *f]
            block = spikes.sum(dim=1 - r.time_dim, dtype=torch.float32)  # type: ignore[operator]
            n = spikes.shape[0] * spikes.shape[1]
        else:
            block = spikes
            n = spikes.shape[0]
        acc = sums.spikes.get(block.shape)
        if acc is not None:
            acc.add_(block)
        else:
            for shape in sums.spikes:
                if shape[1:] != block.shape[1:]:
                    raise StabwatchError(
                        f"spiking layer {self.layers[index]!r}: neurons {tuple(block.shape[1:])} differ from "
                        f"{tuple(shape[1:])} seen earlier in this step (spikes {tuple(spikes.shape)}, "
                        f"time_dim={r.time_dim}); check the adapter's time_dim"
                    )
            sums.spikes[block.shape] = block.to(torch.float32, copy=block is spikes)
        sums.samples += n
        if r.membrane is None:
            return
        v = r.membrane.detach()
        acc_v = sums.v.get(v.shape)
        if acc_v is not None:
            acc_v.add_(v)
            sums.v2[v.shape].addcmul_(v, v)
        else:
            sums.v[v.shape] = v.to(torch.float32, copy=True)
            sums.v2[v.shape] = v.float().square()
        sums.n_mem += v.numel()
        th = r.threshold
        if th is None:
            sums.no_threshold = True
            return
        if isinstance(th, torch.Tensor):
            run = sums.th_run
            if run is not None and run.obj is th and run.shape == v.shape and run.version == _version(th):
                run.n += v.numel()
            else:
                sums.fold_threshold()
                if th.numel() != 1 and _broadcast(th.shape, v.shape) != v.shape:
                    raise StabwatchError(
                        f"spiking layer {self.layers[index]!r}: threshold {tuple(th.shape)} does not broadcast "
                        f"to the membrane {tuple(v.shape)}"
                    )
                sums.th_run = _ThresholdRun(th, v.shape, v.numel())
            th = th.detach()
        else:
            sums.th_host += float(th) * v.numel()
        every = self._sample_every[index]
        if self.surrogate_samples and sums.calls % every == every // 2:  # mid-block: not always time step 0
            budget = -(-self.surrogate_samples // _SAMPLED_CALLS)
            sums.gaps.append(_gap_sample(v, th, budget, sums.calls // every))
        sums.calls += 1

    def begin_step(self, step: int) -> None:
        self._sums = [_LayerSums() for _ in self.layers]
        if self.active:  # hooks on the modules only while the step is scheduled
            self.resume_hooks()
        else:
            self.suspend_hooks()

    def teardown(self) -> None:
        self._sums = []
        self._modules = []

    def collect(self, step: int, readout: Readout, loss: torch.Tensor | None, batch: Any) -> None:
        sums, self._sums = self._sums, [_LayerSums() for _ in self.layers]
        for i, s in enumerate(sums):  # spread the next step's samples over as many calls as this one had
            if s.calls:
                self._sample_every[i] = -(-s.calls // _SAMPLED_CALLS)
        seen = [i for i, s in enumerate(sums) if s.spikes]
        if not seen:
            return
        counts = [sum(acc.sum(dim=0) for acc in sums[i].spikes.values()) for i in seen]
        names = [self.layers[i] for i in seen]
        samples = [sums[i].samples for i in seen]
        mem = [i for i in seen if sums[i].v]
        device = counts[0].device  # type: ignore[union-attr]
        table: torch.Tensor | None = None
        rows, n_mem, has_th = [], [], []
        for i in mem:
            s = sums[i]
            s.fold_threshold()
            s1 = sum(a.sum(dtype=torch.float64).to(device) for a in s.v.values())
            s2 = sum(a.sum(dtype=torch.float64).to(device) for a in s.v2.values())
            th = s.th_host + sum(t.to(device) for t in s.th_device)
            has_th.append(not s.no_threshold)
            th_t = torch.as_tensor(th if not s.no_threshold else float("nan"), dtype=torch.float64).to(device)
            rows.append(torch.stack([s1, s2, th_t.reshape(())]))  # type: ignore[list-item]
            n_mem.append(float(s.n_mem))
        if rows:
            table = torch.stack(rows)  # [L, 3]: sum v, sum v^2, sum threshold
        mem_names = [self.layers[i] for i in mem]
        self._add_surrogate(readout, sums, seen, counts)  # type: ignore[arg-type]
        if not readout.across_ranks:
            self._add_firing(readout, names, counts, samples)  # type: ignore[arg-type]
            if table is not None:
                n_t = torch.tensor(n_mem, dtype=torch.float64, device=device)
                self._add_membrane(readout, mem_names, table, n_t, has_th)
            return
        # more than one process: sum the raw counts and moments across ranks, then the same statistics
        sizes = [c.numel() for c in counts]  # type: ignore[union-attr]
        parts = [c.reshape(-1).double() for c in counts]  # type: ignore[union-attr]
        parts.append(torch.tensor(samples, dtype=torch.float64, device=device))
        if table is not None:
            parts += [
                table.reshape(-1),
                torch.tensor(n_mem, dtype=torch.float64, device=device),
                torch.tensor(has_th, dtype=torch.float64, device=device),
            ]
        shapes = [c.shape for c in counts]  # type: ignore[union-attr]
        n_seen, n_rows, ranks = len(seen), len(mem), _dist.world_size()

        def _combined(total: torch.Tensor) -> None:
            pieces = total.split([*sizes, n_seen, 3 * n_rows, n_rows, n_rows])
            summed = [p.reshape(shape) for p, shape in zip(pieces[: len(sizes)], shapes, strict=True)]
            self._add_firing(readout, names, summed, [int(n) for n in pieces[len(sizes)].tolist()])
            if n_rows:  # a layer's threshold distance needs a threshold on every rank
                tab, n_t, with_th = pieces[-3].reshape(n_rows, 3), pieces[-2], pieces[-1] == ranks
                self._add_membrane(readout, mem_names, tab, n_t, with_th.tolist())

        readout.add_reduced(torch.cat(parts), "sum", _combined, key=(tuple(names), tuple(mem_names)))

    def _add_surrogate(
        self, readout: Readout, sums: list[_LayerSums], seen: list[int], counts: list[torch.Tensor]
    ) -> None:
        """Per layer: mean surrogate derivative and window fraction over the sampled membrane gaps.

        Layers sharing one spike function (the usual case) are differentiated in one autograd pass.
        """
        neurons = {i: float(c.numel()) for i, c in zip(seen, counts, strict=True)}
        groups: dict[int, tuple[Callable[[torch.Tensor], torch.Tensor], list[int]]] = {}
        widths: list[int] = []
        for i in seen:
            if not sums[i].gaps:
                continue
            module, adapter = self._modules[i]
            try:
                fn = adapter.surrogate_fn(module)
            except Exception as exc:  # noqa: BLE001
                self._surrogate_failure(i, exc)
                continue
            if fn is not None:
                groups.setdefault(id(fn), (fn, []))[1].append(i)
            elif self.surrogate_width is not None:
                widths.append(i)
        stats: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        for fn, members in groups.values():
            gaps = [torch.cat(sums[i].gaps) for i in members]
            try:
                rows = surrogate_statistics(fn, torch.cat(gaps), [g.numel() for g in gaps])
            except Exception as exc:  # noqa: BLE001 - a surrogate we cannot differentiate loses only its keys
                self._surrogate_failure(members[0], exc)
                continue
            for k, i in enumerate(members):
                stats[i] = (rows[k, 0], rows[k, 1])
        for i in widths:
            stats[i] = (None, near_threshold_fraction(torch.cat(sums[i].gaps), self.surrogate_width))  # type: ignore[arg-type]
        grads, g_weights, fracs, f_weights = [], [], [], []
        for i in seen:
            if i not in stats:
                continue
            g, f = stats[i]
            name, n = self.layers[i], neurons[i]
            readout.add_extra(_NEAR_KEY, f, layer=name, reduce="mean")
            fracs.append(f * n)
            f_weights.append(n)
            if g is not None:
                readout.add_extra(_SURROGATE_KEY, g, layer=name, reduce="mean")
                grads.append(g * n)
                g_weights.append(n)
        if grads:  # pooled like the other globals: a layer weighs by its neuron count
            readout.add_extra(_SURROGATE_KEY, torch.stack(grads).sum() / sum(g_weights), reduce="mean")
        if fracs:
            readout.add_extra(_NEAR_KEY, torch.stack(fracs).sum() / sum(f_weights), reduce="mean")

    def _surrogate_failure(self, index: int, exc: BaseException) -> None:
        if not self._surrogate_failed:
            self._surrogate_failed = True
            log.warning(
                "stabwatch: the surrogate function of spiking layer %r could not be differentiated (%s: %s); "
                "its surrogate_grad is not reported. Further failures are not logged.",
                self.layers[index],
                type(exc).__name__,
                exc,
            )

    def _add_firing(self, readout: Readout, names: list[str], counts: list[torch.Tensor], samples: list[int]) -> None:
        per, pooled = layer_firing_statistics(counts, samples, self.dead_threshold, self.saturated_threshold)
        for j, field in enumerate(_FIRING_FIELDS):
            readout.add_layers(field, names, per[:, j])
            readout.add(field, pooled[j])

    def _add_membrane(
        self, readout: Readout, mem_names: list[str], table: torch.Tensor, n_t: torch.Tensor, has_th: list[bool]
    ) -> None:
        stats, pooled_mem = pooled_membrane_statistics(table, n_t, torch.tensor(has_th, device=table.device))
        for j, field in enumerate(_MEMBRANE_FIELDS[:2]):
            readout.add_layers(field, mem_names, stats[:, j])
            readout.add(field, pooled_mem[j])
        keep = [k for k, ok in enumerate(has_th) if ok]
        if keep:
            readout.add_layers(_MEMBRANE_FIELDS[2], [mem_names[k] for k in keep], stats[keep, 2])
            readout.add(_MEMBRANE_FIELDS[2], pooled_mem[2])


def _gap_sample(v: torch.Tensor, th: torch.Tensor | float, budget: int, call: int) -> torch.Tensor:
    """``v - th`` on about ``budget`` elements: whole rows of ``v``'s leading dim, evenly strided, the
    start shifted by the call's index so that successive calls sample different rows (a row larger
    than ``budget``, e.g. one sample's feature map, is thinned to every n-th element)."""
    if v.ndim == 0:
        v = v.reshape(1)
    rows = v.shape[0]
    per_row = max(v.numel() // max(rows, 1), 1)
    k = min(rows, max(1, -(-budget // per_row)))
    stride = max(rows // k, 1)
    start = call % stride
    row_th = th if isinstance(th, torch.Tensor) and th.ndim == v.ndim and rows > 1 else None
    if per_row > budget:  # one row, thinned
        if row_th is not None:
            th = row_th[start if row_th.shape[0] == rows else 0]
        return (v[start].float() - th).reshape(-1)[:: -(-per_row // budget)]
    vs = v[start::stride][:k]
    if row_th is not None and row_th.shape[0] == rows:
        th = row_th[start::stride][:k]
    return (vs.float() - th).reshape(-1)


def _broadcast(a: torch.Size, b: torch.Size) -> torch.Size | None:
    try:
        return torch.broadcast_shapes(a, b)
    except RuntimeError:
        return None
