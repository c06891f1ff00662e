"""The attention family: every number against a manual ``softmax(q·kᵀ/√d)`` written independently here
(float64, explicit loops over masks), the fused (SDPA) path against an unfused one, ``nn.MultiheadAttention``
against the module's own attention weights, Hugging Face models built from a config (nothing downloaded)
against their eager attention probabilities, and training unchanged bit for bit with the family on."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import stabwatch as sw
from stabwatch.collectors import FAMILIES, AttentionCollector
from stabwatch.collectors.attention import AttentionInputs
from stabwatch.errors import ConfigError, InputError
from stabwatch.functional import attention as fa
from stabwatch.functional.attention import attention_statistics, log_partition_statistics


# references ----------------------------------------------------------------------------------------
def manual(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, bias: torch.Tensor | None = None, scale=None):
    """Per head [max logit, mean entropy, mean |q|, mean |k|], float64, row by row."""
    q, k = q.detach().double(), k.detach().double()
    b, h, lq, d = q.shape
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = []
    for hh in range(h):
        best, ents = -math.inf, []
        for bb in range(b):
            for i in range(lq):
                keys = [j for j in range(k.shape[2]) if allowed[bb, hh, i, j]]
                if not keys:
                    continue
                s = torch.stack([scale * torch.dot(q[bb, hh, i], k[bb, hh, j]) for j in keys])
                best = max(best, float(s.max().detach()))
                z = s + (torch.stack([bias[bb, hh, i, j].double() for j in keys]) if bias is not None else 0)
                p = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
                ents.append(float(-(p[p > 0] * p[p > 0].log()).sum()))
        qn = float(q[:, hh].norm(dim=-1).mean())
        kn = float(k[:, hh].norm(dim=-1).mean())
        out.append([best, sum(ents) / len(ents), qn, kn])
    return torch.tensor(out, dtype=torch.float64)


def _every_off() -> dict[str, Any]:
    return {f: None for f in FAMILIES}


def records(model: nn.Module, batches: list[Any], loss_fn, collector: AttentionCollector, lr: float = 0.01):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = []
    with sw.Monitor(model, opt, preset="cheap", every=_every_off(), collectors=[collector], alerts=False) as mon:
        for batch in batches:
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            out.append(mon.step(loss=loss))
    return out


# the pure functions --------------------------------------------------------------------------------
def test_statistics_match_manual_softmax_with_bool_float_causal_masks_and_gqa() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g) * 3
    k = torch.randn(2, 2, 6, 8, generator=g) * 3  # grouped-query: 2 key heads for 4 query heads
    k_rep = k.repeat_interleave(2, dim=1)
    full = torch.ones(2, 4, 5, 6, dtype=torch.bool)
    torch.testing.assert_close(attention_statistics(q, k).double(), manual(q, k_rep, full), rtol=1e-5, atol=1e-5)

    causal = torch.ones(5, 6, dtype=torch.bool).tril().expand(2, 4, 5, 6)
    got = attention_statistics(q, k, is_causal=True, scale=0.5).double()
    torch.testing.assert_close(got, manual(q, k_rep, causal, scale=0.5), rtol=1e-5, atol=1e-5)

    allowed = torch.rand(2, 1, 5, 6, generator=g) > 0.4
    allowed[0, 0, 1] = False  # a query row that attends nowhere is left out of the entropy
    got = attention_statistics(q, k, attn_mask=allowed).double()
    torch.testing.assert_close(got, manual(q, k_rep, allowed.expand(2, 4, 5, 6)), rtol=1e-5, atol=1e-5)

    # a float mask: -inf and dtype-minimum entries are masked, the rest is a bias the max logit leaves out
    bias = torch.randn(2, 4, 5, 6, generator=g)
    bias[..., 0] = -math.inf
    bias[..., 1] = torch.finfo(torch.float32).min
    ok = torch.ones(2, 4, 5, 6, dtype=torch.bool)
    ok[..., :2] = False
    got = attention_statistics(q, k, attn_mask=bias).double()
    torch.testing.assert_close(got, manual(q, k_rep, ok, bias=bias), rtol=1e-5, atol=1e-5)


def test_analytic_values_uniform_and_one_hot_attention() -> None:
    q = torch.zeros(1, 1, 3, 4)
    k = torch.randn(1, 1, 7, 4)
    stats = attention_statistics(q, k)  # all logits 0: uniform over 7 keys
    assert stats[0, 0] == 0.0
    assert stats[0, 1].item() == pytest.approx(math.log(7), rel=1e-6)
    one_hot = attention_statistics(torch.full((1, 1, 1, 1), 100.0), torch.tensor([[[[1.0], [-1.0]]]]), scale=1.0)
    assert one_hot[0, 0].item() == 100.0 and one_hot[0, 1].item() == pytest.approx(0.0, abs=1e-30)


def test_chunked_heads_equal_one_pass_and_3d_input_is_one_head(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 6, 9, 4, generator=g), torch.randn(2, 6, 9, 4, generator=g)
    whole = attention_statistics(q, k, is_causal=True)
    monkeypatch.setattr(fa, "_CHUNK", 2 * 9 * 9)  # one head per chunk
    torch.testing.assert_close(attention_statistics(q, k, is_causal=True), whole)
    three = attention_statistics(q[:, 0], k[:, 0])
    torch.testing.assert_close(three, attention_statistics(q[:, :1], k[:, :1]))


def test_bad_shapes_raise_input_errors_naming_them() -> None:
    with pytest.raises(InputError, match=r"\(2, 3\)"):
        attention_statistics(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(InputError, match="multiple of the key heads"):
        attention_statistics(torch.randn(1, 3, 2, 4), torch.randn(1, 2, 2, 4))
    with pytest.raises(InputError, match="does not broadcast"):
        attention_statistics(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), attn_mask=torch.ones(5, 5))
    with pytest.raises(InputError, match="classes"):
        log_partition_statistics(torch.zeros(3, 0))


def test_log_partition_matches_manual() -> None:
    y = torch.randn(3, 5, 11) * 4
    z = torch.tensor([[math.log(sum(math.exp(v) for v in row)) for row in b.tolist()] for b in y])
    got = log_partition_statistics(y)
    assert got[0].item() == pytest.approx(z.mean().item(), rel=1e-5)
    assert got[1].item() == pytest.approx(z.max().item(), rel=1e-5)


# a small decoder with a fused or an unfused attention ------------------------------------------------
class Attn(nn.Module):
    def __init__(self, d: int = 16, heads: int = 4, fused: bool = True) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.heads, self.fused = heads, fused

    def qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qk(x)
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # what the fused kernel computes, written out
            s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            t = x.shape[1]
            s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), -math.inf)
            y = s.softmax(-1) @ v
        b, t, d = x.shape
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Decoder(nn.Module):
    def __init__(self, fused: bool = True, vocab: int = 13) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        self.blocks = nn.ModuleList([Attn(fused=fused), Attn(fused=fused)])
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        for blk in self.blocks:
            h = h + blk(h)
        return self.lm_head(self.norm(h))


def _lm_loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx)
    return F.cross_entropy(logits.flatten(0, 1), idx.flatten())


def _tokens(n: int, batch: int = 3, t: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 13, (batch, t), generator=g) for _ in range(n)]


def _extractor(module: Attn, args: tuple[Any, ...], kwargs: dict[str, Any]) -> AttentionInputs:
    q, k, _ = module.qk(args[0])
    return AttentionInputs(q, k, is_causal=True)


def test_fused_path_matches_manual_softmax_on_the_sampled_sequences() -> None:
    torch.manual_seed(0)
    model = Decoder()
    seen: dict[str, torch.Tensor] = {}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(f"blocks.{i}", a[0].detach().clone()))
    batch = _tokens(1)
    outs: dict[str, torch.Tensor] = {}
    model.lm_head.register_forward_hook(lambda m, a, o: outs.__setitem__("y", o.detach().clone()))
    (rec,) = records(model, batch, _lm_loss, AttentionCollector(1, samples=2, per_head=True), lr=0.0)
    values = rec.to_dict()
    table = []
    for i in range(2):
        name = f"blocks.{i}"
        with torch.no_grad():
            q, k, _ = model.blocks[i].qk(seen[name][:2])  # lr 0: the weights are those of the forward
        causal = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 4, 6, 6)
        ref = manual(q, k, causal)
        table.append(ref)
        assert values[f"attention_layers/max_logit/{name}"] == pytest.approx(ref[:, 0].max().item(), rel=1e-5)
        assert values[f"attention_layers/entropy_min/{name}"] == pytest.approx(ref[:, 1].min().item(), rel=1e-5)
        assert values[f"attention_layers/entropy_mean/{name}"] == pytest.approx(ref[:, 1].mean().item(), rel=1e-5)
        assert values[f"attention_layers/q_norm/{name}"] == pytest.approx(ref[:, 2].max().item(), rel=1e-5)
        assert values[f"attention_layers/k_norm/{name}"] == pytest.approx(ref[:, 3].max().item(), rel=1e-5)
        for h in range(4):
            assert values[f"attention_layers/max_logit/{name}:h{h}"] == pytest.approx(ref[h, 0].item(), rel=1e-5)
            assert values[f"attention_layers/entropy_mean/{name}:h{h}"] == pytest.approx(ref[h, 1].item(), rel=1e-5)
    both = torch.cat(table)
    assert values["attention/max_logit"] == pytest.approx(both[:, 0].max().item(), rel=1e-5)
    assert values["attention/entropy_min"] == pytest.approx(both[:, 1].min().item(), rel=1e-5)
    assert values["attention/entropy_mean"] == pytest.approx(both[:, 1].mean().item(), rel=1e-5)
    z = torch.logsumexp(outs["y"][:2].double(), -1)
    assert values["attention/z_mean"] == pytest.approx(z.mean().item(), rel=1e-5)
    assert values["attention/z_max"] == pytest.approx(z.max().item(), rel=1e-5)


def test_fused_and_unfused_attention_give_the_same_record() -> None:
    torch.manual_seed(0)
    fused = Decoder(fused=True)
    unfused = Decoder(fused=False)
    unfused.load_state_dict(fused.state_dict())
    batches = _tokens(3)
    a = records(fused, batches, _lm_loss, AttentionCollector(1))
    extractors = {f"blocks.{i}": _extractor for i in range(2)}
    b = records(unfused, batches, _lm_loss, AttentionCollector(1, extractors=extractors))
    for ra, rb in zip(a, b, strict=True):
        da, db = ra.to_dict(), rb.to_dict()
        keys = {k for k in da if k.startswith("attention")}
        assert keys == {k for k in db if k.startswith("attention")} and len(keys) == 17
        for key in keys:
            assert da[key] == pytest.approx(db[key], rel=1e-4, abs=1e-6), key


def test_multihead_attention_against_its_own_weights() -> None:
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, add_bias_kv=True)
        x = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
        pad = torch.zeros(3, 5, dtype=torch.bool)
        pad[0, 3:] = True
        causal = torch.ones(5, 5, dtype=torch.bool).triu(1)  # nn.MultiheadAttention: True = blocked
        model = nn.ModuleDict({"attn": mha})
        weights: list[torch.Tensor] = []

        def loss_fn(m: nn.Module, _: Any, x=x, pad=pad, causal=causal, weights=weights) -> torch.Tensor:
            out, w = m["attn"](x, x, x, key_padding_mask=pad, attn_mask=causal, average_attn_weights=False)
            weights.append(w.detach())
            return out.square().mean()

        (rec,) = records(model, [None], loss_fn, AttentionCollector(1, samples=2, per_head=True), lr=0.0)
        values = rec.to_dict()
        p = weights[0][:2].double()  # [2, H, L, S + 1]: the module's own probabilities (bias_k appended)
        ent = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1).mean(dim=(0, 2))
        for h in range(2):
            assert values[f"attention_layers/entropy_mean/attn:h{h}"] == pytest.approx(ent[h].item(), rel=1e-5)
        # max logit and norms from the projection weights, written with einsum
        xb = (x if batch_first else x.transpose(0, 1))[:2].double()
        w, bias = mha.in_proj_weight.double(), mha.in_proj_bias.double()
        q = torch.einsum("ble,fe->blf", xb, w[:8]) + bias[:8]
        k = torch.einsum("ble,fe->blf", xb, w[8:16]) + bias[8:16]
        q, k = q.view(2, 5, 2, 4).transpose(1, 2), k.view(2, 5, 2, 4).transpose(1, 2)
        k = torch.cat([k, mha.bias_k.double().view(1, 2, 1, 4).expand(2, 2, 1, 4)], dim=2)
        allowed = torch.ones(2, 2, 5, 6, dtype=torch.bool)
        allowed[..., :5] &= ~causal
        allowed[0, :, :, 3:5] = False
        ref = manual(q, k, allowed)
        for h in range(2):
            assert values[f"attention_layers/max_logit/attn:h{h}"] == pytest.approx(ref[h, 0].item(), rel=1e-5)
            assert values[f"attention_layers/entropy_mean/attn:h{h}"] == pytest.approx(ref[h, 1].item(), rel=1e-5)
            assert values[f"attention_layers/q_norm/attn:h{h}"] == pytest.approx(ref[h, 2].item(), rel=1e-5)


def _hf_models() -> list[tuple[str, Any, str]]:
    tf = pytest.importorskip("transformers")
    small = dict(vocab_size=40, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=48)
    return [
        (
            "bert",
            lambda impl: tf.BertForMaskedLM(
                tf.BertConfig(
                    **small,
                    max_position_embeddings=16,
                    hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0,
                    attn_implementation=impl,
                )
            ),
            "bert.encoder.layer.{}.attention.self",
        ),
        (
            "gpt2",
            lambda impl: tf.GPT2LMHeadModel(
                tf.GPT2Config(
                    vocab_size=40,
                    n_embd=32,
                    n_head=4,
                    n_layer=2,
                    n_positions=16,
                    bos_token_id=0,
                    eos_token_id=0,
                    resid_pdrop=0.0,
                    embd_pdrop=0.0,
                    attn_pdrop=0.0,
                    attn_implementation=impl,
                )
            ),
            "transformer.h.{}.attn",
        ),
        (
            "llama",
            lambda impl: tf.LlamaForCausalLM(
                tf.LlamaConfig(**small, num_key_value_heads=2, max_position_embeddings=16, attn_implementation=impl)
            ),
            "model.layers.{}.self_attn",
        ),
    ]  # fmt: skip  (dropout off: the two models must see the same inputs)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("index", [0, 1, 2], ids=["bert", "gpt2", "llama"])
def test_hugging_face_attention_found_and_matches_its_eager_probabilities(index: int, impl: str) -> None:
    name, make, path = _hf_models()[index]
    torch.manual_seed(0)
    model = make(impl)
    eager = make("eager")
    eager.load_state_dict(model.state_dict())
    model.train()
    eager.train()
    ids = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0  # padding in the first (sampled) sequence

    def loss_fn(m: nn.Module, _: Any) -> torch.Tensor:
        return m(input_ids=ids, attention_mask=mask, labels=ids).loss

    (rec,) = records(model, [None], loss_fn, AttentionCollector(1, samples=2, per_head=True), lr=0.0)
    values = rec.to_dict()
    with torch.no_grad():
        out = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
    for layer in range(2):
        p = out.attentions[layer][:2].double()  # [2, H, L, L]
        live = p.sum(-1) > 0.5
        ent = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1)
        ent = torch.where(live, ent, torch.zeros_like(ent)).sum(dim=(0, 2)) / live.sum(dim=(0, 2))
        for h in range(4):
            got = values[f"attention_layers/entropy_mean/{path.format(layer)}:h{h}"]
            assert got == pytest.approx(ent[h].item(), rel=1e-4, abs=1e-5), (name, layer, h)
    logits = out.logits[:2].double()
    z = torch.logsumexp(logits, -1)
    assert values["attention/z_mean"] == pytest.approx(z.mean().item(), rel=1e-4)
    assert values["attention/max_logit"] > 0


def test_gpt2_max_logit_matches_manual_from_its_projection() -> None:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=40, n_embd=32, n_head=4, n_layer=1, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = tf.GPT2LMHeadModel(cfg)
    model.train()
    seen: list[torch.Tensor] = []
    model.transformer.h[0].attn.c_attn.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    ids = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(0))
    (rec,) = records(model, [None], lambda m, _: m(input_ids=ids, labels=ids).loss, AttentionCollector(1), lr=0.0)
    q, k, _ = seen[0][:2].split(32, dim=2)
    q, k = q.view(2, 9, 4, 8).transpose(1, 2), k.view(2, 9, 4, 8).transpose(1, 2)
    ref = manual(q, k, torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 4, 9, 9))
    assert rec.to_dict()["attention_layers/max_logit/transformer.h.0.attn"] == pytest.approx(
        ref[:, 0].max().item(), rel=1e-5
    )


def test_bert_without_a_head_has_no_z() -> None:
    tf = pytest.importorskip("transformers")
    cfg = tf.BertConfig(vocab_size=40, hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=48)
    model = tf.BertModel(cfg)
    model.train()
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(0))
    (rec,) = records(
        model, [None], lambda m, _: m(input_ids=ids).last_hidden_state.square().mean(), AttentionCollector(1)
    )
    keys = set(rec.to_dict())
    assert "attention_layers/max_logit/encoder.layer.0.attention.self" in keys
    assert not any("z_" in k for k in keys)


# lifecycle -----------------------------------------------------------------------------------------
def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_no_hook_on_a_model_without_attention_and_none_left_after_exit() -> None:
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    with sw.Monitor(plain, opt, preset="default", alerts=False):
        with_default = _hook_count(plain)
    with sw.Monitor(plain, opt, preset="default", every={"attention": None}, alerts=False):
        assert _hook_count(plain) == with_default  # the default preset's attention family adds nothing
    collector = AttentionCollector(1)
    with sw.Monitor(plain, opt, preset="cheap", every=_every_off(), collectors=[collector], alerts=False):
        assert _hook_count(plain) == 0
    model = Decoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _hook_count(model)
    with sw.Monitor(model, opt, preset="cheap", every=_every_off(), collectors=[AttentionCollector(1)], alerts=False):
        assert _hook_count(model) == before + 3  # the root's pre- and post-hook, the head
    assert _hook_count(model) == before


def test_the_function_mode_is_removed_when_the_forward_raises() -> None:
    from torch.overrides import _get_current_function_mode_stack

    class Boom(Decoder):
        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            super().forward(idx)
            raise RuntimeError("boom")

    model = Boom()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sw.Monitor(model, opt, preset="cheap", every=_every_off(), collectors=[AttentionCollector(1)], alerts=False):
        with pytest.raises(RuntimeError, match="boom"):
            model(_tokens(1)[0])
        assert _get_current_function_mode_stack() == []
    assert _get_current_function_mode_stack() == []


def test_weights_bit_identical_with_the_collector_on() -> None:
    def train(monitored: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = Decoder()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        on = [AttentionCollector(1, per_head=True)]
        ctx = (
            sw.Monitor(model, opt, preset="cheap", every=_every_off(), collectors=on, alerts=False)
            if monitored
            else None
        )
        if ctx is not None:
            ctx.start()
        for idx in _tokens(4):
            opt.zero_grad()
            loss = _lm_loss(model, idx)
            loss.backward()
            opt.step()
            if ctx is not None:
                ctx.step(loss=loss)
        if ctx is not None:
            ctx.close()
        return {k: v.clone() for k, v in model.state_dict().items()}

    a, b = train(False), train(True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_schedule_and_eval_forwards() -> None:
    model = Decoder()
    recs = records(model, _tokens(4), _lm_loss, AttentionCollector(2))
    assert [any(k.startswith("attention") for k in r.to_dict()) for r in recs] == [True, False, True, False]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sw.Monitor(
        model, opt, preset="cheap", every=_every_off(), collectors=[AttentionCollector(1)], alerts=False
    ) as mon:
        model.eval()
        with torch.no_grad():
            model(_tokens(1)[0])
        rec = mon.step()
    assert not any(k.startswith("attention") for k in rec.to_dict())


def test_bad_options_are_config_errors() -> None:
    model = Decoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bad_path = AttentionCollector(1, extractors={"nope": _extractor})
    with pytest.raises(ConfigError, match="no module 'nope'"), sw.Monitor(model, opt, collectors=[bad_path]):
        pass
    with (
        pytest.raises(ConfigError, match="logits='head'"),
        sw.Monitor(model, opt, collectors=[AttentionCollector(1, logits="head")]),
    ):
        pass
    with pytest.raises(ConfigError):
        AttentionCollector(1, samples=0)


def test_logits_handed_to_the_context_replace_the_heads() -> None:
    """``Monitor.step(logits=...)``: the logits the user passes win over the output head's."""
    torch.manual_seed(0)
    model = Decoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    collector = AttentionCollector(1)
    given = torch.randn(3, 6, 13) * 5
    with sw.Monitor(model, opt, preset="cheap", every=_every_off(), collectors=[collector], alerts=False) as mon:
        loss = _lm_loss(model, _tokens(1)[0])
        loss.backward()
        opt.step()
        rec = mon.step(loss=loss, logits=given)
        assert collector.ctx is not None and collector.ctx.logits is None  # cleared after the step
    z = torch.logsumexp(given[:2].double(), -1)
    assert rec.to_dict()["attention/z_mean"] == pytest.approx(z.mean().item(), rel=1e-5)
    assert rec.to_dict()["attention/z_max"] == pytest.approx(z.max().item(), rel=1e-5)


def _train_char_lm(lr: float, steps: int = 30) -> list[dict[str, float]]:
    """The tiny decoder (no qk-layernorm) on next-token prediction over a fixed random text, AdamW."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 13, (200,), generator=g)
    torch.manual_seed(0)
    model = Decoder()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    collector = AttentionCollector(10)
    with sw.Monitor(model, opt, preset="cheap", every=_every_off(), collectors=[collector], alerts=False) as mon:
        return [dict(rec.extra) for rec in lm_steps(model, opt, mon, text, g, steps) if rec.extra]


def lm_steps(
    model: nn.Module, opt: torch.optim.Optimizer, mon: sw.Monitor, text: torch.Tensor, g: torch.Generator, steps: int
) -> list[sw.StabilityMetrics]:
    """``steps`` monitored steps of next-token prediction on batches of 8 windows of 16 tokens drawn from
    ``text`` with ``g``; the records the monitor emitted."""
    records = []
    for _ in range(steps):
        starts = torch.randint(0, len(text) - 17, (8,), generator=g).tolist()
        idx = torch.stack([text[s : s + 16] for s in starts])
        opt.zero_grad()
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        opt.step()
        rec = mon.step(loss=loss)
        if rec is not None:
            records.append(rec)
    return records


def test_logit_growth_and_entropy_collapse_at_a_high_rate_not_at_a_moderate_one() -> None:
    healthy, unstable = _train_char_lm(3e-2), _train_char_lm(1e-1)
    assert len(healthy) == len(unstable) == 3
    assert max(r["attention/max_logit"] for r in healthy) < 50
    assert min(r["attention/entropy_min"] for r in healthy) > 0.5
    assert unstable[-1]["attention/max_logit"] > 100 > unstable[0]["attention/max_logit"]
    assert unstable[-1]["attention/entropy_min"] < 0.2
