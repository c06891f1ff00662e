"""Attention statistics: the maximal pre-softmax logit, the attention entropy and the query/key norms per
head, and the log-partition ``z`` of output logits.

These are the signals of the transformer instabilities of Wortsman et al. (2023, "Small-scale proxies
for large-scale Transformer training instabilities"): attention logits that grow without bound until the
softmax saturates (entropy collapse), and output logits whose log-partition drifts away from 0.
"""

from __future__ import annotations

import math

import torch

from stabwatch.errors import InputError

__all__ = ["attention_statistics", "log_partition_statistics"]

#: the columns of `attention_statistics`'s ``[H, 4]`` result, in order
ATTENTION_STATS = ("max_logit", "entropy", "q_norm", "k_norm")

#: largest number of logits materialised at once (heads are processed in chunks below it)
_CHUNK = 1 << 22


def _as_4d(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.ndim == 3:
        return t.unsqueeze(1)
    if t.ndim != 4:
        raise InputError(
            f"attention_statistics: {name} must be [batch, heads, length, head_dim] (or [batch, length, dim] "
            f"for one head), got shape {tuple(t.shape)}"
        )
    return t


def _allowed_and_bias(
    attn_mask: torch.Tensor | None, is_causal: bool, shape: tuple[int, int, int, int], device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(allowed ``bool``, additive ``float`` bias), each ``None`` or broadcastable to ``shape``."""
    lq, lk = shape[2], shape[3]
    allowed: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    if attn_mask is not None:
        if attn_mask.ndim > 4:
            raise InputError(
                f"attention_statistics: attn_mask must broadcast to {list(shape)} "
                f"([batch, heads, queries, keys]), got shape {tuple(attn_mask.shape)}"
            )
        try:
            mask = attn_mask.to(device).expand(shape)
        except RuntimeError:
            raise InputError(
                f"attention_statistics: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                f"[batch, heads, queries, keys] = {list(shape)}"
            ) from None
        if mask.dtype == torch.bool:
            allowed = mask
        else:
            bias = mask.float()
            # -inf, and the dtype-minimum masks of Hugging Face models, mean "not attended"
            allowed = bias > torch.finfo(mask.dtype).min / 2
    if is_causal:
        causal = torch.ones(lq, lk, dtype=torch.bool, device=device).tril()
        allowed = causal.expand(shape) if allowed is None else allowed & causal
    return allowed, bias


def attention_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    r"""Per head: the maximal pre-softmax logit, the mean attention entropy and the mean query/key norms.

    With the logits :math:`s_{bhij} = \text{scale}\cdot q_{bhi}\cdot k_{bhj}` (``scale`` defaults to
    :math:`1/\sqrt{d}`, ``d`` the head dimension) over the key positions :math:`j` the mask lets query
    :math:`i` attend to, and the attention :math:`p = \operatorname{softmax}_j(s + \text{bias})`:

    * ``max_logit`` :math:`= \max_{b,i,j} s_{bhij}` (the bias of a float mask is not included: it measures
      the growth of :math:`q\cdot k`);
    * ``entropy`` :math:`= \operatorname{mean}_{b,i}\big(-\sum_j p_{bhij}\log p_{bhij}\big)` in nats, over
      the query rows that attend to at least one key (``log(n_keys)`` for uniform attention, 0 when each
      query attends to one key; under a causal mask the first rows have few keys and pull it down);
    * ``q_norm``, ``k_norm``: the mean L2 norm of the query and key vectors, :math:`\operatorname{mean}_{b,i}
      \lVert q_{bhi}\rVert`.

    Masks follow `torch.nn.functional.scaled_dot_product_attention`: a boolean ``attn_mask`` is ``True``
    where a query may attend; a float one is added to the logits, and its ``-inf`` (or dtype-minimum, as
    Hugging Face writes them) entries are masked positions. ``is_causal`` masks keys after the query
    (top-left aligned, like SDPA). Keys with fewer heads than the queries (grouped-query attention) are
    shared by consecutive query heads, as SDPA's ``enable_gqa`` does. Computed in float32, ``heads`` in
    chunks so at most ~4 M logits are held at once.

    Args:
        q: queries ``[batch, heads, queries, head_dim]`` (``[batch, queries, dim]``: one head).
        k: keys ``[batch, kv_heads, keys, head_dim]``, ``heads`` a multiple of ``kv_heads``.
        attn_mask: broadcastable to ``[batch, heads, queries, keys]``.
        is_causal: mask keys after the query.
        scale: the logit scale (``None``: ``1/sqrt(head_dim)``).

    Returns:
        ``[heads, 4]`` float32: columns `ATTENTION_STATS` = max logit, entropy, q norm, k norm. A head with
        no attended position has max logit ``-inf`` and entropy NaN.

    Raises:
        InputError: shapes that do not fit together (the message shows them).

    Example:
        >>> q = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # one head, two queries
        >>> k = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
        >>> stats = attention_statistics(q, k, scale=1.0)
        >>> [round(v, 4) for v in stats[0].tolist()]  # max logit 2; rows: softmax([2, 0]), softmax([0, 0])
        [2.0, 0.5292, 1.0, 1.0]
    """
    q4, k4 = _as_4d(q.detach(), "q"), _as_4d(k.detach(), "k")
    b, h, lq, d = q4.shape
    kb, hk, lk, kd = k4.shape
    if kb != b and 1 in (b, kb):  # SDPA broadcasts the batch (learned queries with batch 1)
        b = max(b, kb)
        q4, k4 = q4.expand(b, -1, -1, -1), k4.expand(b, -1, -1, -1)
        kb = b
    if kb != b or kd != d or hk == 0 or h % hk:
        raise InputError(
            f"attention_statistics: q {tuple(q.shape)} and k {tuple(k.shape)} do not fit: the batch and the "
            "head dimension must agree, and the query heads be a multiple of the key heads"
        )
    if hk != h:
        k4 = k4.repeat_interleave(h // hk, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qf, kf = q4.float(), k4.float()
    shape = (b, h, lq, lk)
    allowed, bias = _allowed_and_bias(attn_mask, is_causal, shape, q4.device)
    step = max(1, _CHUNK // max(1, b * lq * lk))
    qn = torch.linalg.vector_norm(qf, dim=-1).mean(dim=(0, 2))
    kn = torch.linalg.vector_norm(kf, dim=-1).mean(dim=(0, 2))
    rows: list[torch.Tensor] = []
    for h0 in range(0, h, step):
        h1 = min(h, h0 + step)
        s = torch.matmul(qf[:, h0:h1] * scale, kf[:, h0:h1].transpose(-1, -2))  # [b, c, lq, lk]
        if allowed is not None:
            s = s.masked_fill(~allowed[:, h0:h1], -math.inf)
        max_logit = s.amax(dim=(0, 2, 3))
        z = s if bias is None else s + bias[:, h0:h1]
        p = torch.softmax(z, dim=-1)  # NaN on a row with no attended key
        ent = -torch.special.xlogy(p, p).sum(dim=-1)  # 0·log 0 = 0 at masked keys
        rows.append(torch.stack([max_logit, ent.nanmean(dim=(0, 2))], dim=1))
    return torch.cat([torch.cat(rows), qn[:, None], kn[:, None]], dim=1)


def log_partition_statistics(logits: torch.Tensor) -> torch.Tensor:
    r"""Mean and max of the log-partition :math:`z = \log\sum_v e^{y_v}` of output logits ``[..., classes]``.

    ``z`` is what a z-loss (:math:`10^{-4} z^2`, PaLM) keeps near 0; its drift away from 0 is the
    output-logit divergence of Wortsman et al. (2023). Computed in float32 over the last dimension, then
    the mean and the max over all other positions (batch, sequence).

    Returns:
        A float32 vector ``[z_mean, z_max]`` on ``logits``' device.

    Example:
        >>> log_partition_statistics(torch.zeros(2, 4)).tolist()  # log(4)
        [1.3862943649291992, 1.3862943649291992]
    """
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise InputError(f"log_partition_statistics: logits must be [..., classes], got shape {tuple(logits.shape)}")
    z = torch.logsumexp(logits.detach().float(), dim=-1).reshape(-1)
    return torch.stack([z.mean(), z.max()])
