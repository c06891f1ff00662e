"""Attention logits, attention entropy and the output log-partition ``z``, per layer and head.

The signals of the transformer instabilities of Wortsman et al. (2023): the maximal pre-softmax attention
logit grows without bound, the attention entropy collapses, the output logits' log-partition drifts. On a
scheduled step, for the first ``samples`` sequences of the batch, the queries and keys of every attention
layer are read and `stabwatch.functional.attention.attention_statistics` computes per head the maximal
logit ``scale·q·kᵀ``, the mean entropy of ``softmax(scale·q·kᵀ + mask)`` and the mean query and key norms.
Where the attention is found:

* ``nn.MultiheadAttention`` (also inside ``nn.Transformer*`` layers): a forward pre-hook reads the
  inputs and projects the sampled sequences with the module's own ``in_proj`` weights (masks, ``bias_k``
  and ``add_zero_attn`` as the module applies them);
* ``torch.nn.functional.scaled_dot_product_attention`` called by any module (a fused attention: nanoGPT's
  ``CausalSelfAttention``; Hugging Face models with their default ``attn_implementation="sdpa"``, e.g.
  BERT, GPT-2, LLaMA, Mistral, Qwen): while the model's forward runs on a scheduled step, a
  `torch.overrides.TorchFunctionMode` sees the call's ``q``, ``k``, mask, ``is_causal`` and ``scale``, and
  the layer is the innermost module of the model on the call stack. It is installed only when the model
  has a module whose class name contains ``attn``/``attention`` (``sdpa="auto"``), on the root module's
  forward, and removed when that forward returns or raises;
* a custom attention that computes ``softmax(q·kᵀ)`` itself: ``extractors={"<module.path>": fn}``, where
  ``fn(module, args, kwargs)`` gets the module's forward inputs and returns an `AttentionInputs` (``q``,
  ``k``, and optionally ``attn_mask``, ``is_causal``, ``scale``).

Hugging Face models built with ``attn_implementation="eager"`` never call SDPA: the same mode reads the
arguments of their ``eager_attention_forward(module, query, key, value, attention_mask, scaling, ...)``
(transformers' attention-interface signature) at its first torch call. Forward calls in eval mode are
ignored (a validation pass inside a step is not training).

Output logits: ``z = logsumexp`` over the classes of the output head's output (sampled sequences), its
mean and max. The head (``logits="auto"``) is a Hugging Face model's ``get_output_embeddings()``, else a
module named ``lm_head``, else the last ``nn.Linear`` of the model (outside attention modules); looked for
only in models that have attention. A module path selects another head; ``None`` turns it off. A model
without any attention module gets no hook at all from this family.

Emits (per layer: ``attention_layers/<metric>/<module.path>``; with ``per_head=True`` also one entry per
head, ``<module.path>:h<i>``):

* ``attention/max_logit``, per layer ``max_logit``: the largest pre-softmax logit, over heads, sampled
  sequences, queries and attended keys;
* ``attention/entropy_min``, per layer ``entropy_min``: the smallest head entropy (nats, mean over the
  query rows of a head); ``attention/entropy_mean``, per layer ``entropy_mean``: the mean over heads;
* ``attention/q_norm_max``, ``attention/k_norm_max``, per layer ``q_norm``, ``k_norm``: the largest over
  heads of a head's mean query (key) vector norm;
* ``attention/z_mean``, ``attention/z_max``: mean and max of the output log-partition.

A layer called several times in a step (weights shared across depth) counts its calls together: max
logit and norms their maximum, entropies their mean.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.overrides import TorchFunctionMode

from stabwatch.collectors.base import Collector, CollectorOptions, MonitorContext, Readout
from stabwatch.collectors.nonfinite import first_tensor
from stabwatch.errors import ConfigError, InputError
from stabwatch.functional.attention import attention_statistics, log_partition_statistics

__all__ = ["AttentionCollector", "AttentionInputs"]

#: a module class whose name says it is an attention (the SDPA catcher is installed when one is present)
_ATTENTION_CLASS = re.compile(r"attn|attention", re.IGNORECASE)
#: how far up the call stack an SDPA call looks for the module that made it
_FRAMES = 16
_SDPA = F.scaled_dot_product_attention
#: the function Hugging Face models call for ``attn_implementation="eager"``; its arguments follow the
#: attention interface of transformers (``module, query, key, value, attention_mask, scaling, ...``)
_EAGER = "eager_attention_forward"
#: per-layer metric name -> global key and how layers (and ranks) combine into it
_GLOBALS = (
    ("max_logit", "attention/max_logit", "max"),
    ("entropy_min", "attention/entropy_min", "min"),
    ("entropy_mean", "attention/entropy_mean", "mean"),
    ("q_norm", "attention/q_norm_max", "max"),
    ("k_norm", "attention/k_norm_max", "max"),
)


class AttentionInputs(NamedTuple):
    """What an extractor returns: the queries and keys of one attention call, SDPA conventions.

    ``q`` is ``[batch, heads, queries, head_dim]``, ``k`` ``[batch, kv_heads, keys, head_dim]``; a boolean
    ``attn_mask`` is ``True`` where a query may attend, a float one is added to the logits; ``scale``
    ``None`` means ``1/sqrt(head_dim)``.
    """

    q: torch.Tensor
    k: torch.Tensor
    attn_mask: torch.Tensor | None = None
    is_causal: bool = False
    scale: float | None = None


class _Catcher(TorchFunctionMode):
    """Sees every ``scaled_dot_product_attention`` call while the model's forward runs, and the first torch
    call made by each Hugging Face ``eager_attention_forward`` (whose arguments it hands on)."""

    def __init__(
        self,
        on_call: Callable[[tuple[Any, ...], dict[str, Any]], None],
        on_eager: Callable[[dict[str, Any]], None],
    ) -> None:
        super().__init__()
        self.on_call = on_call
        self.on_eager = on_eager
        self.last: Any = None  # the eager frame already handed on (kept alive so its id is not reused)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA:
            self.on_call(args, kwargs)
        else:
            here = inspect.currentframe()
            caller = here.f_back if here is not None else None
            if caller is not None and caller.f_code.co_name == _EAGER and caller is not self.last:
                self.last = caller
                self.on_eager(caller.f_locals)
            del here, caller
        return func(*args, **kwargs)


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


class AttentionCollector(Collector):
    """Maximal attention logit, attention entropy, query/key norms per layer (and head), output ``z``.

    Example:
        >>> import stabwatch as sw
        >>> model = nn.Sequential(nn.Linear(8, 8))  # no attention: no hooks
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with sw.Monitor(model, opt, collectors=[AttentionCollector(1)], alerts=False) as mon:
        ...     pass
    """

    family = "attention"
    default_every = 5

    class Options(CollectorOptions):
        samples: int = Field(default=2, ge=1)
        per_head: bool = False
        sdpa: bool | Literal["auto"] = "auto"
        extractors: dict[str, Any] | None = None
        logits: str | None = "auto"

    samples: int
    per_head: bool
    sdpa: bool | Literal["auto"]
    extractors: dict[str, Any] | None
    logits: str | None

    # setup -----------------------------------------------------------------------------------------
    def setup(self, ctx: MonitorContext) -> None:
        model = ctx.model
        modules = dict(model.named_modules())
        self._names: dict[int, str] = {id(m): (n or "(root)") for n, m in modules.items()}
        self._reset()
        self._mode: _Catcher | None = None
        self._depth = 0
        skip: set[int] = set()
        for path, fn in (self.extractors or {}).items():
            if path not in modules:
                raise ConfigError(
                    f"AttentionCollector(extractors=...): the model has no module {path!r}; use a path from "
                    "model.named_modules(), e.g. 'blocks.0.attn'"
                )
            if not callable(fn):
                raise ConfigError(f"AttentionCollector(extractors=...): the value for {path!r} is not callable")
            module = modules[path]
            skip.add(id(module))
            self.add_hook(
                module.register_forward_pre_hook, self.guard(self._extractor_hook(path, fn)), with_kwargs=True
            )
        mha = [(n, m) for n, m in modules.items() if isinstance(m, nn.MultiheadAttention) and id(m) not in skip]
        for name, module in mha:
            skip.add(id(module))
            self.add_hook(module.register_forward_pre_hook, self.guard(self._mha_hook(name)), with_kwargs=True)
        self._skip = skip
        catch = self.sdpa is True or (
            self.sdpa == "auto"
            and any(_ATTENTION_CLASS.search(type(m).__name__) and id(m) not in skip for m in modules.values())
        )
        if catch:
            self.add_hook(model.register_forward_pre_hook, self.guard(self._enter))
            self.add_hook(model.register_forward_hook, self.guard(self._exit), always_call=True)
        self.head = self._find_head(model, modules, mha) if (skip or catch) else None
        if self.head is not None:
            self.add_hook(modules[self.head].register_forward_hook, self.guard(self._head_hook))

    def _find_head(self, model: nn.Module, modules: dict[str, nn.Module], mha: list[Any]) -> str | None:
        if self.logits is None:
            return None
        if self.logits != "auto":
            if self.logits not in modules:
                raise ConfigError(
                    f"AttentionCollector(logits={self.logits!r}): the model has no such module; give the path "
                    "of the output head (e.g. 'lm_head'), 'auto', or None (off)"
                )
            return self.logits
        get = getattr(model, "get_output_embeddings", None)
        if callable(get):  # a Hugging Face model: its own answer, also when it has no head (None)
            head = get()
            return self._names.get(id(head)) if isinstance(head, nn.Module) else None
        if "lm_head" in modules:
            return "lm_head"
        inside = tuple(f"{n}." for n, _ in mha)
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) and not n.startswith(inside)]
        return linears[-1] if linears else None

    def _reset(self) -> None:
        self._calls: dict[str, list[torch.Tensor]] = {}
        self._z: list[torch.Tensor] = []

    def _pop_mode(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            self._depth = 0
            mode.__exit__(None, None, None)

    def begin_step(self, step: int) -> None:
        self._reset()
        self._pop_mode()

    def teardown(self) -> None:
        self._pop_mode()
        self._reset()

    # hooks -----------------------------------------------------------------------------------------
    def _enter(self, module: nn.Module, args: Any) -> None:
        if not self.active or not module.training:
            return
        if self._depth == 0:
            mode = _Catcher(self._on_sdpa, self._on_eager)
            mode.__enter__()
            self._mode = mode
        self._depth += 1

    def _exit(self, module: nn.Module, args: Any, out: Any) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            self._pop_mode()

    def _owner(self) -> nn.Module | None:
        """The innermost module of the model on the call stack (the one that called SDPA)."""
        frame = inspect.currentframe()
        for _ in range(_FRAMES):
            if frame is None:
                return None
            local = frame.f_locals
            for key in ("self", "module"):
                obj = local.get(key)
                if isinstance(obj, nn.Module) and id(obj) in self._names:
                    return obj
            frame = frame.f_back
        return None

    def _on_sdpa(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            owner = self._owner()
            if owner is not None and id(owner) in self._skip:
                return  # measured by its own hook (nn.MultiheadAttention calls SDPA inside)
            name = self._names[id(owner)] if owner is not None else "sdpa"
            self._add(
                name,
                _arg(args, kwargs, 0, "query"),
                _arg(args, kwargs, 1, "key"),
                _arg(args, kwargs, 3, "attn_mask"),
                bool(_arg(args, kwargs, 5, "is_causal", False)),
                _arg(args, kwargs, 6, "scale"),
            )
        except Exception as exc:  # noqa: BLE001 - monitoring never kills training
            self.fail("attention (scaled_dot_product_attention)", exc)

    def _on_eager(self, local: dict[str, Any]) -> None:
        try:
            module, q, k = local.get("module"), local.get("query"), local.get("key")
            if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
                return
            if isinstance(module, nn.Module) and id(module) in self._skip:
                return
            name = self._names.get(id(module), "eager_attention")
            mask = local.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.shape[-1] > k.shape[-2]:
                mask = mask[..., : k.shape[-2]]
            scale = local.get("scaling")
            self._add(name, q, k, mask if isinstance(mask, torch.Tensor) else None, False, scale)
        except Exception as exc:  # noqa: BLE001 - monitoring never kills training
            self.fail("attention (eager_attention_forward)", exc)

    def _extractor_hook(self, name: str, fn: Callable[..., Any]) -> Any:
        def _hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            if not self.active or not module.training:
                return
            with torch.no_grad():
                got = fn(module, args, kwargs)
            if got is None:
                return
            inputs = AttentionInputs(*got) if not isinstance(got, AttentionInputs) else got
            self._add(name, inputs.q, inputs.k, inputs.attn_mask, inputs.is_causal, inputs.scale)

        return _hook

    def _mha_hook(self, name: str) -> Any:
        signature = inspect.signature(nn.MultiheadAttention.forward)

        def _hook(module: nn.MultiheadAttention, args: Any, kwargs: Any) -> None:
            if not self.active or not module.training:
                return
            bound = signature.bind(module, *args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            with torch.no_grad():
                q, k, bias = _mha_qk(module, a["query"], a["key"], a["key_padding_mask"], a["attn_mask"], self.samples)
            self._add(name, q, k, bias, False, None)

        return _hook

    def _head_hook(self, module: nn.Module, args: Any, out: Any) -> None:
        if not self.active or not module.training:
            return
        t = first_tensor(out)
        if t is not None and t.numel():
            with torch.no_grad():
                self._z.append(log_partition_statistics(t[: self.samples] if t.ndim > 1 else t))

    def _add(
        self,
        name: str,
        q: torch.Tensor,
        k: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        scale: float | None,
    ) -> None:
        if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
            raise InputError(f"attention layer {name!r}: q and k must be tensors, got {type(q)} and {type(k)}")
        n = self.samples
        with torch.no_grad():
            q, k = q.detach(), k.detach()
            if attn_mask is not None:
                attn_mask = attn_mask.detach()
                if q.ndim == 3 and attn_mask.ndim == 3:
                    attn_mask = attn_mask.unsqueeze(1)  # [N, L, S] -> [N, 1, L, S]
                if attn_mask.ndim == 4 and attn_mask.shape[0] > n:
                    attn_mask = attn_mask[:n]
            stats = attention_statistics(q[:n], k[:n], attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        self._calls.setdefault(name, []).append(stats)

    # readout ---------------------------------------------------------------------------------------
    def collect(self, step: int, readout: Readout, loss: torch.Tensor | None, batch: Any) -> None:
        calls, zs = self._calls, self._z
        self._reset()
        given = getattr(self.ctx, "logits", None)  # `Monitor.step(logits=...)` where the monitor passes them
        if isinstance(given, torch.Tensor) and given.numel():
            zs = [log_partition_statistics(given[: self.samples] if given.ndim > 1 else given)]
        if zs:
            z = torch.stack(zs)
            readout.add_extra("attention/z_mean", z[:, 0].mean(), reduce="mean")
            readout.add_extra("attention/z_max", z[:, 1].max(), reduce="max")
        if not calls:
            return
        layers: list[str] = []
        rows: list[torch.Tensor] = []  # per layer: [5] = max_logit, entropy_min, entropy_mean, q_norm, k_norm
        heads: list[tuple[str, torch.Tensor]] = []
        for name, stats in calls.items():
            per_head = _combine_calls(stats)  # [H, 4]
            ent = per_head[:, 1]
            rows.append(
                torch.stack(
                    [
                        per_head[:, 0].max(),
                        _nanmin(ent),
                        ent.nanmean(),
                        per_head[:, 2].max(),
                        per_head[:, 3].max(),
                    ]
                )
            )
            layers.append(name)
            if self.per_head:
                heads.append((name, per_head))
        table = torch.stack(rows)  # [L, 5]
        glob = torch.stack(
            [
                table[:, 0].max(),
                _nanmin(table[:, 1]),
                torch.cat([_combine_calls(s)[:, 1] for s in calls.values()]).nanmean(),
                table[:, 3].max(),
                table[:, 4].max(),
            ]
        )
        for j, (_, key, reduce) in enumerate(_GLOBALS):
            readout.add_extra(key, glob[j], reduce=reduce)
        if not (self.ctx is None or self.ctx.per_layer):
            return
        for j, (metric, _, reduce) in enumerate(_GLOBALS):
            for i, layer in enumerate(layers):
                readout.add_extra(f"attention/{metric}", table[i, j], layer=layer, reduce=reduce)
        for layer, per_head in heads:  # a head's own entropy is its ``entropy_mean`` (no ``entropy_min``)
            for j, (metric, _, reduce) in zip((0, 1, 2, 3), (_GLOBALS[0], *_GLOBALS[2:]), strict=True):
                for h in range(per_head.shape[0]):
                    readout.add_extra(f"attention/{metric}", per_head[h, j], layer=f"{layer}:h{h}", reduce=reduce)


def _nanmin(x: torch.Tensor) -> torch.Tensor:
    """The smallest non-NaN value (NaN if all are NaN)."""
    ok = ~torch.isnan(x)
    return (
        torch.where(ok, x, torch.full_like(x, float("inf"))).min().where(ok.any(), torch.full_like(x[0], float("nan")))
    )


def _combine_calls(stats: list[torch.Tensor]) -> torch.Tensor:
    """A layer's calls in one step, ``[H, 4]`` each: max logit and norms their max, entropy their mean."""
    if len(stats) == 1:
        return stats[0]
    s = torch.stack(stats)  # [C, H, 4]
    return torch.stack([s[:, :, 0].amax(0), s[:, :, 1].nanmean(0), s[:, :, 2].amax(0), s[:, :, 3].amax(0)], dim=1)


def _mha_qk(
    module: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    samples: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Queries and keys ``[n, H, L, d]`` of the first ``samples`` sequences, as the module computes them,
    and the additive mask (``-inf`` where not attended) it applies, ``[n or 1, H or 1, L, S]``."""
    e, h, d = module.embed_dim, module.num_heads, module.head_dim
    if query.dim() == 2:  # unbatched [L, E]
        query, key = query.unsqueeze(1), key.unsqueeze(1)
        key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
    elif module.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    b = query.shape[1]
    n = min(samples, b)
    query, key = query[:, :n].transpose(0, 1), key[:, :n].transpose(0, 1)  # [n, L, E], [n, S, E]
    if module._qkv_same_embed_dim:
        w = module.in_proj_weight
        wq, wk = w[:e], w[e : 2 * e]
    else:
        wq, wk = module.q_proj_weight, module.k_proj_weight
    bias = module.in_proj_bias
    bq, bk = (bias[:e], bias[e : 2 * e]) if bias is not None else (None, None)
    lq, s = query.shape[1], key.shape[1]
    q = F.linear(query, wq, bq).view(n, lq, h, d).transpose(1, 2)
    k = F.linear(key, wk, bk).view(n, s, h, d).transpose(1, 2)
    extra = 0
    if module.bias_k is not None:
        k = torch.cat([k, module.bias_k.reshape(1, h, 1, d).expand(n, h, 1, d)], dim=2)
        extra += 1
    if module.add_zero_attn:
        k = torch.cat([k, k.new_zeros(n, h, 1, d)], dim=2)
        extra += 1
    mask: torch.Tensor | None = None
    if attn_mask is not None:
        m = _additive(attn_mask, q.dtype)
        m = m.reshape(1, 1, lq, s) if m.dim() == 2 else m.reshape(b, h, lq, s)[:n]
        mask = m
    if key_padding_mask is not None:
        kp = _additive(key_padding_mask, q.dtype)[:n].reshape(n, 1, 1, s)
        mask = kp if mask is None else mask + kp
    if mask is not None and extra:
        mask = F.pad(mask, (0, extra))
    return q, k, mask


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An ``nn.MultiheadAttention`` mask as an additive float mask (its boolean masks are ``True`` = blocked)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)
