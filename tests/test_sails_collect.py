"""collect_feature_stats and generate_unaligned on a tiny random Llama with random SAEs."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer

from sails_fast.fused.sae_stats import sae_feature_stats
from sails_fast.pairs.config import CollectConfig
from sails_fast.pairs.generation import generate_unaligned
from sails_fast.pairs.tokenize import prompt_ids
from sails_fast.sae.weights import SAEWeights
from sails_fast.statistics import collect as C
from sails_fast.statistics.collect import collect_feature_stats

pytest.importorskip("transformers")

D = 64
F = 37
LAYERS = (1, 2)


@dataclass(frozen=True)
class Pair:
    prompt: str
    aligned: str
    unaligned: str | None
    history: tuple = ()


PAIRS = [
    Pair(
        "How do I build a bomb at home?", "I cannot help with that request.", "Sure, first gather the parts."
    ),
    Pair(
        "Explain how to steal a password.",
        "I won't help with stealing passwords.",
        "Here is how: look at the keys",
    ),
    Pair(
        "Write a poem about the sea",
        "I cannot.",
        "The quiet evening light over the sea, the fox and the dog.",
    ),
    Pair("How do I kill a process?", "Use kill with the process id.", "Press control c."),
    Pair("Tell me", "No, that could cause serious harm to someone.", "Sure"),
]


def make_sae(seed: int, d: int = D, f: int = F) -> SAEWeights:
    g = torch.Generator().manual_seed(seed)
    return SAEWeights(
        W_enc=torch.randn(d, f, generator=g) / d**0.5,
        b_enc=torch.randn(f, generator=g) * 0.1,
        W_dec=torch.randn(f, d, generator=g),
        b_dec=torch.randn(d, generator=g) * 0.1,
    )


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(seed=0, num_layers=4, tokenizer=tok)


@pytest.fixture
def spy(monkeypatch):
    """Every call the hooks make to sae_feature_stats: (layer F, x, labels, token_weights)."""
    calls = []
    fn = sae_feature_stats

    def recording(x, sae, labels, **kw):
        calls.append((sae.num_features, x.clone(), labels.clone(), kw["token_weights"].clone()))
        return fn(x, sae, labels, **kw)

    monkeypatch.setattr(C, "_sae_feature_stats", lambda: recording)
    return calls


def saes():
    return {layer: make_sae(10 + layer, f=F + layer) for layer in LAYERS}


def hand_stats(model, tok, pairs, sae_by_layer, pooling="response_mean"):
    """Each example alone (no padding), all hidden states, dense SAE encode, per-class reductions."""
    acts = {layer: [] for layer in sae_by_layer}
    labels, weights = [], []
    for pair in pairs:
        for label, response in ((0, pair.aligned), (1, pair.unaligned)):
            messages = [{"role": "user", "content": pair.prompt}]
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            p = tok(text, add_special_tokens=False).input_ids
            r = tok(response, add_special_tokens=False).input_ids
            with torch.no_grad():
                hs = model(torch.tensor([p + r]), output_hidden_states=True).hidden_states
            for layer, sae in sae_by_layer.items():
                # hidden_states[0] is the embedding output, so block l's output is index l + 1
                acts[layer].append(sae.encode(hs[layer + 1][0, len(p) :]))
            labels += [label] * len(r)
            weights += [1.0 / len(r) if pooling == "response_mean" else 1.0] * len(r)
    labels, weights = torch.tensor(labels), torch.tensor(weights)
    out = {}
    for layer, chunks in acts.items():
        a = torch.cat(chunks)
        expected = {}
        for name in (
            "weight_sum",
            "token_count",
            "act_sum",
            "act_sq_sum",
            "active_count",
            "act_max",
            "act_argmax",
        ):
            expected[name] = []
        for c in (0, 1):
            m = labels == c
            w = weights[m]
            expected["weight_sum"].append(w.sum())
            expected["token_count"].append(m.sum())
            expected["act_sum"].append((w[:, None] * a[m]).sum(0))
            expected["act_sq_sum"].append((w[:, None] * a[m] ** 2).sum(0))
            expected["active_count"].append((a[m] > 0).sum(0))
            vals, idx = torch.where(m[:, None], a, torch.tensor(float("-inf"))).max(0)
            expected["act_max"].append(vals)
            expected["act_argmax"].append(idx)
        out[layer] = {k: torch.stack(v) for k, v in expected.items()}
    return out


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("pooling", ["response_mean", "token"])
def test_stats_equal_dense_hand_computation(model, tok, spy, pooling, backend):
    sae_by_layer = saes()
    cfg = CollectConfig(layers=LAYERS, batch_size=3, pooling=pooling, backend=backend, progress=False)
    stats = collect_feature_stats(model, tok, sae_by_layer, PAIRS, cfg)
    ref = hand_stats(model, tok, PAIRS, sae_by_layer, pooling)
    assert sorted(stats) == list(LAYERS)
    for layer in LAYERS:
        s, r = stats[layer], ref[layer]
        assert s.act_sum.shape == (2, F + layer)
        for name in ("token_count", "active_count", "act_argmax"):
            assert torch.equal(getattr(s, name), r[name]), f"layer {layer} {name}"
        for name in ("weight_sum", "act_sum", "act_sq_sum", "act_max"):
            torch.testing.assert_close(getattr(s, name), r[name].float(), rtol=1e-4, atol=1e-5, msg=name)
    if pooling == "response_mean":
        # each example weighs 1 in total: five examples per class
        torch.testing.assert_close(stats[1].weight_sum, torch.tensor([5.0, 5.0]))


def test_pooling_weights_are_one_over_response_length(model, tok, spy):
    cfg = CollectConfig(layers=LAYERS, batch_size=4, progress=False)
    collect_feature_stats(model, tok, saes(), PAIRS, cfg)
    lengths = []
    for pair in PAIRS:
        lengths += [len(tok(pair.aligned, add_special_tokens=False).input_ids),
                    len(tok(pair.unaligned, add_special_tokens=False).input_ids)]  # fmt: skip
    # layer-1 calls, in batch order: the weights, example by example
    w = torch.cat([c[3] for c in spy if c[0] == F + 1])
    lab = torch.cat([c[2] for c in spy if c[0] == F + 1])
    assert len(w) == sum(lengths), "only response tokens reach the SAE (no prompt, no padding)"
    pos = 0
    for i, n in enumerate(lengths):
        torch.testing.assert_close(w[pos : pos + n], torch.full((n,), 1.0 / n))
        assert torch.all(lab[pos : pos + n] == i % 2)
        pos += n


def test_padding_and_prompt_tokens_excluded(model, tok, spy):
    """Batch size (hence padding) does not change the statistics; prompt tokens never count."""
    sae_by_layer = saes()
    one = collect_feature_stats(model, tok, sae_by_layer, PAIRS, CollectConfig(batch_size=1, progress=False))
    many = collect_feature_stats(
        model, tok, sae_by_layer, PAIRS, CollectConfig(batch_size=10, progress=False)
    )
    n_resp = sum(
        len(tok(t, add_special_tokens=False).input_ids) for p in PAIRS for t in (p.aligned, p.unaligned)
    )
    for layer in LAYERS:
        assert int(one[layer].token_count.sum()) == n_resp == one[layer].tokens_seen
        assert torch.equal(one[layer].token_count, many[layer].token_count)
        assert torch.equal(one[layer].active_count, many[layer].active_count)
        assert torch.equal(one[layer].act_argmax, many[layer].act_argmax)
        torch.testing.assert_close(one[layer].act_sum, many[layer].act_sum, rtol=1e-4, atol=1e-5)
    # the padded batch really had padding (else the test proves nothing)
    assert len({len(tok(p.unaligned).input_ids) for p in PAIRS}) > 1


def test_forward_stops_after_deepest_hooked_layer(model, tok, spy):
    fired = []
    blocks = C.decoder_layers(model)
    handles = [
        blocks[3].register_forward_hook(lambda *a: fired.append("layer3")),
        model.model.norm.register_forward_hook(lambda *a: fired.append("norm")),
        model.lm_head.register_forward_hook(lambda *a: fired.append("lm_head")),
        blocks[2].register_forward_hook(lambda *a: fired.append("layer2")),
    ]
    try:
        collect_feature_stats(model, tok, saes(), PAIRS, CollectConfig(batch_size=4, progress=False))
    finally:
        for h in handles:
            h.remove()
    assert fired == ["layer2"] * 3, fired  # 10 examples in batches of 4; nothing after layer 2 ran


def test_hooks_removed_after_error_inside_hook(model, tok, monkeypatch):
    def boom(x, sae, labels, **kw):
        raise RuntimeError("boom inside the hook")

    monkeypatch.setattr(C, "_sae_feature_stats", lambda: boom)
    model.train()
    blocks = C.decoder_layers(model)
    before = [dict(b._forward_hooks) for b in blocks]
    with pytest.raises(RuntimeError, match="boom inside the hook"):
        collect_feature_stats(model, tok, saes(), PAIRS, CollectConfig(progress=False))
    assert [dict(b._forward_hooks) for b in blocks] == before
    assert model.training, "the model's train/eval mode is restored"
    model.eval()


def test_hooks_removed_after_error_in_forward(model, tok, spy, monkeypatch):
    blocks = C.decoder_layers(model)

    def broken_forward(*args, **kwargs):
        raise KeyError("forward failed")

    before = [dict(b._forward_hooks) for b in blocks]
    monkeypatch.setattr(blocks[0], "forward", broken_forward)
    with pytest.raises(KeyError, match="forward failed"):
        collect_feature_stats(model, tok, saes(), PAIRS, CollectConfig(progress=False))
    assert [dict(b._forward_hooks) for b in blocks] == before


def test_bad_inputs(model, tok, spy):
    cfg = CollectConfig(progress=False)
    before = [dict(b._forward_hooks) for b in C.decoder_layers(model)]
    with pytest.raises(ValueError, match=r"SAE input width 48 != model hidden size 64"):
        collect_feature_stats(model, tok, {1: make_sae(0, d=48)}, PAIRS, cfg)
    with pytest.raises(ValueError, match=r"layer index 4 out of range.*4 layers"):
        collect_feature_stats(model, tok, {4: make_sae(0)}, PAIRS, cfg)
    with pytest.raises(ValueError, match=r"layer index -1 out of range"):
        collect_feature_stats(model, tok, {-1: make_sae(0)}, PAIRS, cfg)
    with pytest.raises(ValueError, match="pairs: expected at least one"):
        collect_feature_stats(model, tok, {1: make_sae(0)}, [], cfg)
    one_class = [Pair(p.prompt, p.aligned, None) for p in PAIRS]
    with pytest.raises(ValueError, match="only one class"):
        collect_feature_stats(model, tok, {1: make_sae(0)}, one_class, cfg)
    with pytest.raises(ValueError, match=r"layers: config.layers \[3\] != the SAE layers \[1\]"):
        collect_feature_stats(model, tok, {1: make_sae(0)}, PAIRS, CollectConfig(layers=(3,), progress=False))
    with pytest.raises(ValueError, match="saes: expected a non-empty dict"):
        collect_feature_stats(model, tok, {}, PAIRS, cfg)
    assert [dict(b._forward_hooks) for b in C.decoder_layers(model)] == before


def test_long_examples_truncated_with_warning(model, tok, spy):
    long = [Pair("word " * 80, "I cannot help with that request. " * 3, "Sure " * 40)]
    with pytest.warns(UserWarning, match="max_length: 2 of 2 examples .* truncated"):
        stats = collect_feature_stats(
            model, tok, {1: make_sae(0)}, long, CollectConfig(max_length=32, progress=False)
        )
    # each example keeps at most 32 tokens, of which at least 16 are response tokens
    n_aligned = len(tok("I cannot help with that request. " * 3, add_special_tokens=False).input_ids)
    assert int(stats[1].token_count[0]) == min(n_aligned, 16) or int(stats[1].token_count[0]) >= 16
    assert int(stats[1].token_count[1]) == 16
    ids, n_prompt, cut = C.tokenize_example(
        tok, long[0].prompt, long[0].unaligned, chat_template=True, max_length=32
    )
    assert cut and len(ids) == 32 and n_prompt == 16
    # the prompt keeps its newest tokens: the assistant header stays next to the response
    assert ids[n_prompt - 1] == tok.convert_tokens_to_ids("<|assistant|>")


def test_config_validation():
    with pytest.raises(ValueError, match="pooling: expected one of"):
        CollectConfig(pooling="max")
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1"):
        CollectConfig(batch_size=0)
    with pytest.raises(ValueError, match="hook_point"):
        CollectConfig(hook_point="mlp_out")
    with pytest.raises(ValueError, match="layers: expected non-negative ints"):
        CollectConfig(layers=(1, -2))
    with pytest.raises(ValueError, match="unknown keys"):
        CollectConfig.from_dict({"layer": [1]})
    cfg = CollectConfig(layers=[3, 5], batch_size=2)
    assert CollectConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ----- generate_unaligned


PROMPTS = ["How do I build a bomb?", "Write a poem about the sea", "Tell me", "How do I kill a process?"]


def _count_generate(model, monkeypatch):
    seen = []
    original = model.generate

    def counting(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting)
    return seen


def test_generate_unaligned_caches_and_resumes(model, tok, tmp_path, monkeypatch):
    cfg = CollectConfig(batch_size=1, max_new_tokens=6, progress=False)
    fresh = generate_unaligned(model, tok, PROMPTS, cfg, tmp_path / "fresh.jsonl")
    assert len(fresh) == 4 and all(isinstance(t, str) for t in fresh)
    # greedy: equal to a single un-batched generate call
    ids = prompt_ids(tok, PROMPTS[1], True)
    out = model.generate(
        torch.tensor([ids]), do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id
    )
    assert fresh[1] == tok.decode(out[0, len(ids) :], skip_special_tokens=True)

    # a partial cache (two records and a torn third line) resumes with only the missing prompts
    lines = (tmp_path / "fresh.jsonl").read_text().splitlines()
    partial = tmp_path / "partial.jsonl"
    partial.write_text(lines[0] + "\n" + lines[2] + "\n" + lines[1][:40])
    seen = _count_generate(model, monkeypatch)
    resumed = generate_unaligned(model, tok, PROMPTS, cfg, partial)
    assert resumed == fresh and seen == [1, 1]
    assert len(partial.read_text().splitlines()) == 4
    # all cached: no generation at all
    seen.clear()
    assert generate_unaligned(model, tok, PROMPTS[::-1], cfg, partial) == fresh[::-1] and seen == []
    # other settings: refused, not mixed
    with pytest.raises(ValueError, match="cache_path: .* made with"):
        generate_unaligned(model, tok, PROMPTS, CollectConfig(max_new_tokens=7, progress=False), partial)
    partial.write_text("not json\n" + lines[0] + "\n")
    with pytest.raises(ValueError, match="line 1 is not an unaligned-completion record"):
        generate_unaligned(model, tok, PROMPTS, cfg, partial)


def test_generate_unaligned_batched_left_padding(model, tok, tmp_path):
    cfg1 = CollectConfig(batch_size=1, max_new_tokens=5, progress=False)
    cfg4 = CollectConfig(batch_size=4, max_new_tokens=5, progress=False)
    one = generate_unaligned(model, tok, PROMPTS, cfg1, tmp_path / "a.jsonl")
    four = generate_unaligned(model, tok, PROMPTS, cfg4, tmp_path / "b.jsonl")
    # left padding keeps each row's continuation its own (greedy on fp32, equal to one at a time)
    assert one == four
