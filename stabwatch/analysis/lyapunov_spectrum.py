"""The Lyapunov spectrum of a recurrent network driven by input sequences (QR method).

`lyapunov_spectrum` takes an ``nn.RNN`` (tanh or ReLU), ``nn.GRU``, ``nn.LSTM`` (any depth; the LSTM state
is (h, c), 2N exponents per layer), one of their ``*Cell`` modules, or any step function
``step(state, x) -> state``, and returns the k leading exponents of every sequence of a batch, with their
mean and spread over the batch. The math is `stabwatch.functional.recurrent.qr_lyapunov`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import vmap

from stabwatch.errors import ConfigError, InputError
from stabwatch.functional.recurrent import (
    entropy_rate,
    kaplan_yorke_dimension,
    qr_lyapunov,
    random_frame,
    recurrent_params,
    recurrent_step,
)

__all__ = ["LyapunovSpectrum", "lyapunov_spectrum"]

_MODULES = (nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell)


@dataclass(frozen=True)
class LyapunovSpectrum:
    """The k leading Lyapunov exponents of a driven recurrent map, per sequence and over the batch.

    Attributes:
        exponents: ``[batch, k]`` float64, per sequence, in descending order (the order QR gives; it is
            sorted), in ``unit`` per step.
        mean: ``[k]`` mean over the batch.
        std: ``[k]`` standard deviation over the batch (0 for a batch of one).
        unit: ``"nats"`` or ``"bits"`` (per step).
        state_dim: n, the dimension of the state (``L·N``; ``2·L·N`` for an LSTM).
        steps: time steps averaged over (after the warmup).
        warmup: steps discarded at the start (state and frame transients).
        qr_every: steps between re-orthonormalisations.
        logdet: ``[batch]`` time average of ``log|det J_t|`` (same unit), from Jacobians formed explicitly;
            set when the check ran (by default when k = n).
        zero_pivots: ``[batch]`` zero ``R_ii`` met (each makes an exponent ``-inf``: a direction was
            annihilated, e.g. by a ReLU unit that is off).

    Example:
        >>> rnn = torch.nn.RNN(2, 3, bias=False)
        >>> with torch.no_grad():
        ...     _ = rnn.weight_hh_l0.copy_(torch.diag(torch.tensor([0.9, 0.5, 0.2])))
        >>> spec = lyapunov_spectrum(rnn, torch.zeros(200, 1, 2), warmup=50, dtype=torch.float64)
        >>> [round(v, 4) for v in spec.mean.exp().tolist()]
        [0.9, 0.5, 0.2]
        >>> round(spec.sum_check, 12)
        0.0
    """

    exponents: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    unit: str
    state_dim: int
    steps: int
    warmup: int
    qr_every: int
    logdet: torch.Tensor | None
    zero_pivots: torch.Tensor

    @property
    def k(self) -> int:
        """How many exponents were computed."""
        return int(self.exponents.shape[1])

    @property
    def max(self) -> float:
        """The largest exponent, averaged over the batch (> 0: chaotic, nearby states separate)."""
        return float(self.mean[0])

    @property
    def kaplan_yorke(self) -> float:
        """Kaplan–Yorke dimension of the batch-mean spectrum, ``j + Σ_{i≤j} λ_i / |λ_{j+1}|``
        (a lower bound when k < n and all k partial sums are ≥ 0)."""
        return kaplan_yorke_dimension(self.mean)

    @property
    def entropy_rate(self) -> torch.Tensor:
        """``[batch]`` sum of the positive exponents per sequence (the Pesin bound on the entropy rate, in
        ``unit`` per step; with k < n it counts only the computed ones)."""
        return entropy_rate(self.exponents)

    @property
    def sum_check(self) -> float:
        """``max_b |Σ_i λ_i − mean_t log|det J_t||``: round-off when k = n; ``nan`` when not checked or k < n."""
        if self.logdet is None or self.k != self.state_dim:
            return math.nan
        return float((self.exponents.sum(-1) - self.logdet).abs().max())


def lyapunov_spectrum(
    model: nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    h0: Any = None,
    k: int | None = None,
    warmup: int | None = None,
    qr_every: int = 1,
    *,
    unit: str = "nats",
    check: bool | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    batched: bool = False,
) -> LyapunovSpectrum:
    """The k leading Lyapunov exponents of a recurrent network driven by ``inputs``.

    The map is s_{t+1} = F(s_t, x_t) with the network's full state s (an LSTM's (h, c)). An orthonormal
    frame Q (n×k, random start from ``seed``) is pushed forward with Q ← J_t·Q, J_t = ∂s_{t+1}/∂s_t, as k
    Jacobian-vector products per step (no Jacobian formed); a reduced QR every ``qr_every`` steps
    re-orthonormalises it and ``log|R_ii|`` is summed in float64:
    ``λ_i = (1/T) Σ_t log|R_ii(t)|`` over the T steps after the warmup.

    Args:
        model: ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (unidirectional, any depth), ``nn.RNNCell``/``LSTMCell``/
            ``GRUCell``, or a step function ``step(state, x) -> state`` (pure torch: it is differentiated
            with ``torch.func``).
        inputs: the drive. For a module: ``[T, B, d]``, or ``[B, T, d]`` when ``batch_first`` (cells:
            ``[B, T, d]``); a 2-D ``[T, d]`` is one sequence. For a step function: ``[B, T, ...]``.
        h0: the initial state. A module: ``[L, B, N]`` (or ``[L, N]``), an LSTM ``(h0, c0)``; a cell ``[B, N]``
            (``(h0, c0)``). ``None``: zeros. A step function: ``[B, n]`` or ``[n]`` (required).
        k: how many exponents (``None``: all n).
        warmup: steps discarded (``None``: a fifth of the sequence).
        qr_every: steps between re-orthonormalisations (keep ``qr_every·(λ_1 − λ_k)`` ≲ 16 in float64,
            ≲ 8 in float32).
        unit: ``"nats"`` or ``"bits"`` per step.
        check: also form each J_t and average ``log|det J_t|`` (``None``: when k = n); then
            `LyapunovSpectrum.sum_check` compares it with ``Σλ_i``.
        dtype: compute in this dtype (``None``: the weights' / state's; ``torch.float64`` for tight results).
        seed: seeds the start frame (a generator of its own; the global RNG is not touched).
        batched: the step function takes ``[B, n]``, ``[B, ...]`` (rows independent); default: it takes one
            sequence's ``[n]``, ``[...]`` and is vmapped.

    Returns:
        `LyapunovSpectrum`. A zero ``R_ii`` gives ``-inf`` and a `RuntimeWarning`.
    """
    if unit not in ("nats", "bits"):
        raise ConfigError(f"lyapunov_spectrum: unit must be 'nats' or 'bits', got {unit!r}")
    if isinstance(qr_every, bool) or not isinstance(qr_every, int) or qr_every < 1:
        raise ConfigError(f"lyapunov_spectrum: qr_every must be an int >= 1, got {qr_every!r}")
    if not isinstance(inputs, torch.Tensor):
        raise InputError(f"lyapunov_spectrum: inputs must be a tensor, got {type(inputs).__name__}")
    if isinstance(model, _MODULES):
        step, state, xs = _module_problem(model, inputs, h0, dtype)
    elif isinstance(model, nn.Module) and h0 is None:
        raise InputError(
            f"lyapunov_spectrum: {type(model).__name__} is not nn.RNN/LSTM/GRU or a *Cell; pass the recurrent "
            "module itself (e.g. model.lstm), or a step function step(state, x) -> state with its h0"
        )
    elif callable(model):
        step, state, xs = _step_problem(model, inputs, h0, dtype, batched)
    else:
        raise InputError(
            f"lyapunov_spectrum: model must be a recurrent module or a callable, got {type(model).__name__}"
        )
    n_steps, n = xs.shape[0], state.shape[1]
    k = n if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError(f"lyapunov_spectrum: k must be an int in [1, {n}] (the state dimension), got {k!r}")
    warmup = n_steps // 5 if warmup is None else warmup
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup < n_steps:
        raise ConfigError(
            f"lyapunov_spectrum: warmup must be an int in [0, {n_steps}) for {n_steps} time steps, got {warmup!r}"
        )
    check = (k == n) if check is None else bool(check)
    gen = torch.Generator().manual_seed(seed)
    frame = random_frame(gen, (state.shape[0], n, k), state.dtype, state.device)
    with torch.no_grad():
        out = qr_lyapunov(step, state, xs, frame, warmup=warmup, qr_every=qr_every, check=check)
    scale = 1.0 / math.log(2.0) if unit == "bits" else 1.0
    exps = (out.log_r / out.steps * scale).cpu()
    exps = exps.sort(dim=-1, descending=True).values
    zero = out.zero_pivots.cpu()
    if bool((zero > 0).any()):
        warnings.warn(
            f"lyapunov_spectrum: {int(zero.sum())} zero pivots R_ii (a tangent direction was annihilated, e.g. "
            "a saturated or switched-off unit): those exponents are -inf",
            RuntimeWarning,
            stacklevel=2,
        )
    std = exps.std(0) if exps.shape[0] > 1 else torch.zeros(k, dtype=torch.float64)
    logdet = None if out.logdet is None else (out.logdet / out.steps * scale).cpu()
    return LyapunovSpectrum(exps, exps.mean(0), std, unit, n, out.steps, warmup, qr_every, logdet, zero)


def _module_problem(
    module: nn.Module, inputs: torch.Tensor, h0: Any, dtype: torch.dtype | None
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor]:
    """(step, state [B, n], inputs [T, B, d]) for a torch recurrent module."""
    params = recurrent_params(module, dtype)
    w = params.layers[0][0]
    cell = isinstance(module, nn.RNNCell | nn.LSTMCell | nn.GRUCell)
    if inputs.ndim == 2:
        inputs = inputs.unsqueeze(0 if cell or module.batch_first else 1)
    if inputs.ndim != 3 or inputs.shape[-1] != params.input_size:
        layout = "[B, T, d]" if cell or module.batch_first else "[T, B, d]"
        raise InputError(
            f"lyapunov_spectrum: inputs for {type(module).__name__}(input_size={params.input_size}) must be "
            f"{layout} (or [T, d]), got shape {tuple(inputs.shape)}"
        )
    xs = inputs.transpose(0, 1) if cell or module.batch_first else inputs
    xs = xs.to(device=w.device, dtype=w.dtype)
    b = xs.shape[1]
    n_layers, hidden = len(params.layers), params.hidden
    lstm = params.kind == "lstm"
    expected = "[B, N]" if cell else "[L, B, N]"
    if h0 is None:
        state = torch.zeros(b, params.state_dim, dtype=w.dtype, device=w.device)
    else:
        parts = h0 if isinstance(h0, tuple | list) else (h0,)
        if len(parts) != (2 if lstm else 1):
            raise InputError(
                f"lyapunov_spectrum: h0 for {type(module).__name__} must be "
                f"{'(h0, c0), each ' if lstm else ''}{expected}, got {len(parts)} tensors"
            )
        flat = []
        for p in parts:
            p = p.detach().to(device=w.device, dtype=w.dtype)
            if cell:
                p = p.unsqueeze(0)  # [1, B, N]
            if p.ndim == 2:
                p = p.unsqueeze(1)
            if p.shape != (n_layers, b, hidden):
                raise InputError(
                    f"lyapunov_spectrum: h0 for {type(module).__name__} must be {expected} with L={n_layers}, "
                    f"B={b}, N={hidden}, got shape {tuple(p.shape)}"
                )
            flat.append(p.transpose(0, 1).reshape(b, n_layers * hidden))
        state = torch.cat(flat, dim=-1)
    return recurrent_step(params), state, xs


def _step_problem(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    h0: Any,
    dtype: torch.dtype | None,
    batched: bool,
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor]:
    """(step, state [B, n], inputs [T, B, ...]) for a user step function."""
    if not isinstance(h0, torch.Tensor) or h0.ndim not in (1, 2):
        raise InputError(
            "lyapunov_spectrum: a step function needs h0, the initial state, as a tensor [B, n] or [n]"
            + ("" if not isinstance(h0, torch.Tensor) else f"; got shape {tuple(h0.shape)}")
        )
    state = h0.detach()
    if dtype is not None:
        state = state.to(dtype)
    if state.ndim == 1:
        state = state.unsqueeze(0)
        if inputs.ndim < 2 or inputs.shape[0] != 1:
            inputs = inputs.unsqueeze(0)
    if inputs.ndim < 2 or inputs.shape[0] != state.shape[0]:
        raise InputError(
            f"lyapunov_spectrum: inputs for a step function must be [B, T, ...] with B={state.shape[0]} "
            f"(h0's batch), got shape {tuple(inputs.shape)}"
        )
    xs = inputs.transpose(0, 1).to(state.device)
    if xs.is_floating_point():
        xs = xs.to(state.dtype)
    step = fn if batched else vmap(fn)
    probe = step(state, xs[0])
    if not isinstance(probe, torch.Tensor) or probe.shape != state.shape:
        got = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
        raise InputError(
            f"lyapunov_spectrum: step(state, x) must return a state of the same shape; got {got} for a state of "
            f"shape {tuple(state.shape)} (batched={batched})"
        )
    return step, state, xs
