"""Recurrent cells as pure functions, and the QR (Benettin/Shimada–Nagashima) Lyapunov-spectrum loop.

Pure: tensors in, tensors out; no hooks, no module state. `stabwatch.analysis.lyapunov_spectrum` and the
``lyapunov_spectrum`` collector call these.

Cells (PyTorch's gate layout and formulas, batched over the first dimension):

* ``nn.RNN``: ``h' = φ(W_ih x + b_ih + W_hh h + b_hh)``, φ = tanh or ReLU;
* ``nn.LSTM``: ``i, f, g, o`` from ``W_ih x + b_ih + W_hh h + b_hh``; ``c' = σ(f)·c + σ(i)·tanh(g)``,
  ``h' = σ(o)·tanh(c')``. The state is (h, c): 2N-dimensional — leaving c out drops the memory pathway;
* ``nn.GRU``: ``r, z`` = σ(…), ``n = tanh(W_in x + b_in + r·(W_hn h + b_hn))``, ``h' = (1 − z)·n + z·h``.

A stack of L layers feeds layer l the new ``h`` of layer l − 1 at the same time step. Its state is one flat
vector per sequence: ``[h_0, …, h_{L−1}]`` (RNN, GRU) or ``[h_0, …, h_{L−1}, c_0, …, c_{L−1}]`` (LSTM),
the layout of PyTorch's ``h_n`` / ``(h_n, c_n)`` flattened (`pack_state`, `unpack_state`).

The spectrum (`qr_lyapunov`). For a map s_{t+1} = F(s_t, x_t) with Jacobian J_t[i, j] = ∂s_{t+1,i}/∂s_{t,j},
push an orthonormal frame Q (n×k) forward with ``Q ← J_t·Q`` — one JVP per frame column, the k columns
batched with ``torch.func.vmap``, no Jacobian formed — and every ``m`` steps re-orthonormalise with a reduced
QR, ``Q R = Q``, adding ``log|R_ii|`` to float64 sums. After T steps ``λ_i = Σ log|R_ii| / T`` (nats per
step), λ_1 ≥ … ≥ λ_k up to the ordering QR gives. Keep ``m·(λ_1 − λ_k)`` ≲ 16 in float64 (≲ 8 in float32)
or the trailing exponents are lost to round-off. A zero ``R_ii`` (a fully saturated unit: the frame lost a
direction) gives ``−inf``, counted in `QRLyapunov.zero_pivots`, never skipped. Note ``Q ← Jᵀ·Q`` (as some
public code does) reverses the order of the product and biases driven networks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.func import jacfwd, jvp, vmap

from stabwatch.errors import InputError

__all__ = [
    "QRLyapunov",
    "RecurrentParams",
    "entropy_rate",
    "gru_cell",
    "kaplan_yorke_dimension",
    "lstm_cell",
    "qr_lyapunov",
    "random_frame",
    "recurrent_params",
    "recurrent_step",
    "rnn_cell",
]

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _affine(
    x: torch.Tensor,
    h: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
) -> torch.Tensor:
    """``W_ih x + b_ih + W_hh h + b_hh`` (a missing bias is zero), the pre-activation of the RNN and LSTM cells."""
    out = x @ w_ih.T + h @ w_hh.T
    if b_ih is not None:
        out = out + b_ih
    if b_hh is not None:
        out = out + b_hh
    return out


def rnn_cell(
    x: torch.Tensor,
    h: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None = None,
    b_hh: torch.Tensor | None = None,
    nonlinearity: str = "tanh",
) -> torch.Tensor:
    """One step of ``nn.RNN``'s cell: ``φ(W_ih x + b_ih + W_hh h + b_hh)``.

    Example:
        >>> w = torch.eye(2)
        >>> rnn_cell(torch.zeros(1, 2), torch.ones(1, 2), w, 0.5 * w, nonlinearity="relu")
        tensor([[0.5000, 0.5000]])
    """
    pre = _affine(x, h, w_ih, w_hh, b_ih, b_hh)
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)


def lstm_cell(
    x: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None = None,
    b_hh: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of ``nn.LSTM``'s cell (gates ``i, f, g, o`` in PyTorch's order): returns ``(h', c')``."""
    gates = _affine(x, h, w_ih, w_hh, b_ih, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


def gru_cell(
    x: torch.Tensor,
    h: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None = None,
    b_hh: torch.Tensor | None = None,
) -> torch.Tensor:
    """One step of ``nn.GRU``'s cell (gates ``r, z, n`` in PyTorch's order): returns ``h'``."""
    gi = x @ w_ih.T
    gh = h @ w_hh.T
    if b_ih is not None:
        gi = gi + b_ih
    if b_hh is not None:
        gh = gh + b_hh
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


class RecurrentParams(NamedTuple):
    """The weights of a recurrent module, as the pure step needs them.

    ``kind`` is ``"rnn_tanh"``, ``"rnn_relu"``, ``"lstm"`` or ``"gru"``; ``layers`` holds
    ``(w_ih, w_hh, b_ih, b_hh)`` per layer (biases ``None`` for ``bias=False``); ``hidden`` is N;
    ``state_dim`` is the flat state size n (``L·N``, or ``2·L·N`` for an LSTM); ``input_size`` is d.
    """

    kind: str
    layers: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], ...]
    hidden: int
    input_size: int

    @property
    def state_dim(self) -> int:
        return len(self.layers) * self.hidden * (2 if self.kind == "lstm" else 1)


_CELLS = (nn.RNNCell, nn.LSTMCell, nn.GRUCell)
_STACKS = (nn.RNN, nn.LSTM, nn.GRU)


def recurrent_params(module: nn.Module, dtype: torch.dtype | None = None) -> RecurrentParams:
    """Read (detached) the weights of an ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (any depth) or their ``*Cell``.

    Args:
        module: the recurrent module. Bidirectional modules and LSTMs with ``proj_size > 0`` are refused
            (`stabwatch.errors.InputError`): their state is not a forward-in-time map of itself.
        dtype: cast the weights to this dtype (``None``: keep theirs; float16/bfloat16 become float32).

    Dropout between layers is not applied: the spectrum is that of the deterministic map (eval mode).
    """
    if isinstance(module, nn.LSTM | nn.LSTMCell):
        kind = "lstm"
    elif isinstance(module, nn.GRU | nn.GRUCell):
        kind = "gru"
    elif isinstance(module, nn.RNN | nn.RNNCell):
        kind = "rnn_relu" if module.nonlinearity == "relu" else "rnn_tanh"
    else:
        raise InputError(
            f"recurrent_params: expected nn.RNN, nn.LSTM, nn.GRU or their *Cell, got {type(module).__name__}; "
            "for any other recurrence pass a step function step(state, x) -> state"
        )
    if getattr(module, "bidirectional", False):
        raise InputError(
            f"recurrent_params: {type(module).__name__}(bidirectional=True) reads the sequence backwards too; "
            "its state is not a forward map. Analyse a unidirectional module."
        )
    if getattr(module, "proj_size", 0):
        raise InputError(f"recurrent_params: LSTM(proj_size={module.proj_size}) is not supported; use proj_size=0")

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.detach()
        target = dtype if dtype is not None else t.dtype
        if target in (torch.float16, torch.bfloat16):
            target = torch.float32
        return t.to(target)

    def w(name: str) -> torch.Tensor:
        t = cast(getattr(module, name))
        assert t is not None
        return t

    layers: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], ...]
    if isinstance(module, _CELLS):
        bias = module.bias
        layers = (
            (
                w("weight_ih"),
                w("weight_hh"),
                cast(module.bias_ih if bias else None),
                cast(module.bias_hh if bias else None),
            ),
        )
    else:
        layers = tuple(
            (
                w(f"weight_ih_l{i}"),
                w(f"weight_hh_l{i}"),
                cast(getattr(module, f"bias_ih_l{i}") if module.bias else None),
                cast(getattr(module, f"bias_hh_l{i}") if module.bias else None),
            )
            for i in range(module.num_layers)
        )
    return RecurrentParams(kind, layers, int(module.hidden_size), int(module.input_size))


def recurrent_step(params: RecurrentParams) -> Step:
    """The pure map ``state [B, n], x [B, d] -> state' [B, n]`` of a recurrent stack (layout: module doc).

    Example:
        >>> rnn = torch.nn.RNN(3, 4, num_layers=2)
        >>> step = recurrent_step(recurrent_params(rnn))
        >>> x = torch.randn(5, 1, 3)
        >>> s = torch.zeros(1, 8)
        >>> for t in range(5):
        ...     s = step(s, x[t])
        >>> out, h_n = rnn(x)
        >>> torch.allclose(s, h_n.transpose(0, 1).reshape(1, 8), atol=1e-6)
        True
    """
    kind, layers, hidden = params.kind, params.layers, params.hidden
    n_layers = len(layers)

    def step(state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        hs = state[..., : n_layers * hidden].unflatten(-1, (n_layers, hidden))
        inp = x
        new_h: list[torch.Tensor] = []
        new_c: list[torch.Tensor] = []
        if kind == "lstm":
            cs = state[..., n_layers * hidden :].unflatten(-1, (n_layers, hidden))
        for i, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
            h = hs[..., i, :]
            if kind == "lstm":
                h, c = lstm_cell(inp, h, cs[..., i, :], w_ih, w_hh, b_ih, b_hh)
                new_c.append(c)
            elif kind == "gru":
                h = gru_cell(inp, h, w_ih, w_hh, b_ih, b_hh)
            else:
                h = rnn_cell(inp, h, w_ih, w_hh, b_ih, b_hh, "relu" if kind == "rnn_relu" else "tanh")
            new_h.append(h)
            inp = h
        return torch.cat(new_h + new_c, dim=-1)

    return step


class QRLyapunov(NamedTuple):
    """What `qr_lyapunov` returns (all float64 except ``state``).

    Attributes:
        log_r: ``[B, k]`` sums of ``log|R_ii|`` over the measured steps (``-inf`` after a zero pivot).
        steps: the number of measured steps T (exponents are ``log_r / steps``).
        zero_pivots: ``[B]`` how many zero ``R_ii`` each sequence hit while measured.
        logdet: ``[B]`` sum of ``log|det J_t|`` over the measured steps, from Jacobians formed explicitly
            (``check=True``), else ``None``.
        state: ``[B, n]`` the state after the last step.
        frame: ``[B, n, k]`` the orthonormal frame after the last step.
    """

    log_r: torch.Tensor
    steps: int
    zero_pivots: torch.Tensor
    logdet: torch.Tensor | None
    state: torch.Tensor
    frame: torch.Tensor


def qr_lyapunov(
    step: Step,
    state: torch.Tensor,
    inputs: torch.Tensor,
    frame: torch.Tensor,
    *,
    warmup: int = 0,
    qr_every: int = 1,
    check: bool = False,
) -> QRLyapunov:
    """Accumulate ``log|R_ii|`` of the QR method over a driven sequence (see the module docstring).

    Args:
        step: a batched map ``(state [B, n], x [B, ...]) -> state [B, n]`` that treats sequences
            independently (row b of the output depends on row b of the inputs only).
        state: ``[B, n]`` initial state.
        inputs: ``[T, B, ...]`` the drive, time first.
        frame: ``[B, n, k]`` initial tangent frame (orthonormalised here).
        warmup: the first ``warmup`` steps advance state and frame but add nothing (state and frame
            transients discarded).
        qr_every: re-orthonormalise every this many steps (and after the last one).
        check: also form each J_t (``k`` need not equal ``n``; costs n JVPs per step) and sum
            ``log|det J_t|`` over the measured steps — with k = n, ``Σλ_i`` equals its mean.

    Returns:
        `QRLyapunov`.

    Example:
        >>> a = torch.diag(torch.tensor([2.0, 0.5], dtype=torch.float64))
        >>> out = qr_lyapunov(lambda s, x: s @ a.T, torch.ones(1, 2, dtype=torch.float64),
        ...                   torch.zeros(10, 1, 1), torch.eye(2, dtype=torch.float64)[None])
        >>> (out.log_r / out.steps).exp()
        tensor([[2.0000, 0.5000]], dtype=torch.float64)
    """
    if state.ndim != 2:
        raise InputError(f"qr_lyapunov: state must be [batch, n], got shape {tuple(state.shape)}")
    b, n = state.shape
    if frame.ndim != 3 or frame.shape[0] != b or frame.shape[1] != n or not 1 <= frame.shape[2] <= n:
        raise InputError(
            f"qr_lyapunov: frame must be [batch={b}, n={n}, k] with 1 <= k <= n, got shape {tuple(frame.shape)}"
        )
    if inputs.ndim < 2 or inputs.shape[1] != b:
        raise InputError(f"qr_lyapunov: inputs must be [time, batch={b}, ...], got shape {tuple(inputs.shape)}")
    if qr_every < 1:
        raise InputError(f"qr_lyapunov: qr_every must be >= 1, got {qr_every}")
    n_steps = inputs.shape[0]
    if not 0 <= warmup < n_steps:
        raise InputError(f"qr_lyapunov: warmup must be in [0, {n_steps}) for {n_steps} input steps, got {warmup}")
    k = frame.shape[2]
    q = torch.linalg.qr(frame.to(state.dtype)).Q
    log_r = torch.zeros(b, k, dtype=torch.float64, device=state.device)
    zeros = torch.zeros(b, dtype=torch.float64, device=state.device)
    logdet = torch.zeros(b, dtype=torch.float64, device=state.device) if check else None
    since_qr = 0
    for t in range(n_steps):
        x = inputs[t]
        if logdet is not None and t >= warmup:
            logdet = logdet + _logabsdet(step, state, x)
        state, q = _push(step, state, x, q)
        since_qr += 1
        if since_qr == qr_every or t == n_steps - 1 or t + 1 == warmup:
            q, r = torch.linalg.qr(q)
            since_qr = 0
            if t >= warmup:
                d = r.diagonal(dim1=-2, dim2=-1).to(torch.float64).abs()
                zeros = zeros + (d == 0).sum(-1)
                log_r = log_r + d.log()
    return QRLyapunov(log_r, n_steps - warmup, zeros, logdet, state, q)


def _push(step: Step, state: torch.Tensor, x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F(s, x), J·Q)``: the k columns of Q as k JVPs batched by `vmap` (the primal is computed once)."""

    def f(s: torch.Tensor) -> torch.Tensor:
        return step(s, x)

    new_state, jq = vmap(lambda v: jvp(f, (state,), (v,)), in_dims=-1, out_dims=(None, -1))(q)  # type: ignore[arg-type,misc]
    return new_state, jq


def _logabsdet(step: Step, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[B]`` ``log|det J|`` from each sequence's Jacobian formed explicitly (``vmap(jacfwd)``), in float64."""
    jac = vmap(jacfwd(lambda s1, x1: step(s1[None], x1[None])[0]))(state, x)
    return torch.linalg.slogdet(jac.to(torch.float64)).logabsdet


def kaplan_yorke_dimension(exponents: torch.Tensor) -> float:
    """The Kaplan–Yorke (Lyapunov) dimension of a spectrum sorted in descending order.

    ``D = j + (λ_1 + … + λ_j) / |λ_{j+1}|``, j the largest index with ``λ_1 + … + λ_j ≥ 0``; 0 when
    λ_1 < 0. When every partial sum is ≥ 0 it is the number of exponents given: n for a complete spectrum,
    else a lower bound (compute more with a larger ``k``).

    Example:
        >>> round(kaplan_yorke_dimension(torch.tensor([0.5, -0.2, -1.0])), 6)
        2.3
    """
    lam = [float(v) for v in exponents.reshape(-1)]
    total = 0.0
    for j, value in enumerate(lam):
        if total + value < 0 or math.isnan(value):
            return j + total / abs(value) if j else 0.0
        total += value
    return float(len(lam))


def entropy_rate(exponents: torch.Tensor) -> torch.Tensor:
    """Sum of the positive exponents along the last dimension (the Pesin bound on the entropy rate).

    Example:
        >>> entropy_rate(torch.tensor([0.3, 0.1, -2.0]))
        tensor(0.4000)
    """
    return exponents.clamp_min(0).sum(-1)


def random_frame(
    generator: torch.Generator | None, shape: Sequence[int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A random ``[B, n, k]`` start frame drawn (on the CPU) from ``generator``, moved to ``device``."""
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
