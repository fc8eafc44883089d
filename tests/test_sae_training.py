"""SAE training through SAELens on a tiny random Llama: activations, metrics, saving, the cache."""

import json
from pathlib import Path

import pytest
import torch
from tiny import CORPUS, tiny_llama, tiny_tokenizer

from sails_fast.models.embedded import is_complete, read_build_info
from sails_fast.sae.weights import SAEWeights, load_sae
from sails_fast.sae_training import embedded as sae_embedded
from sails_fast.sae_training.activations import _new_positions, collect_residual_activations
from sails_fast.sae_training.embedded import default_sae_texts, embedded_sae
from sails_fast.sae_training.training import SAETrainingConfig, fit_sae, sae_metrics, select_texts, train_sae

# a handful of steps: enough to show the plumbing, not to train well
TINY = dict(expansion_factor=2, k=8, training_tokens=64 * 8, batch_size=64, lr=3e-3, eval_fraction=0.25)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(num_layers=3, tokenizer=tok)


@pytest.fixture(scope="module")
def texts(tok):
    pairs = [(a, b) for a in CORPUS for b in CORPUS[1:4]]
    msgs = lambda a, b: [{"role": "user", "content": a}, {"role": "assistant", "content": b}]
    return [tok.apply_chat_template(msgs(a, b), tokenize=False) for a, b in pairs]


# ----- config


def test_config_roundtrip_and_hash():
    cfg = SAETrainingConfig(architecture="jumprelu", sparsity_coefficient=0.5, seed=3)
    assert SAETrainingConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.hash() == SAETrainingConfig.from_dict(cfg.to_dict()).hash()
    assert cfg.hash() != SAETrainingConfig(architecture="jumprelu", sparsity_coefficient=0.5, seed=4).hash()
    assert SAETrainingConfig().num_latents(576) == 4608
    assert SAETrainingConfig(architecture="standard").sparsity == 5.0
    with pytest.raises(ValueError, match="unknown keys"):
        SAETrainingConfig.from_dict({"architecture": "topk", "layer": 3})


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"architecture": "gated"}, "architecture"),
        ({"expansion_factor": 0}, "expansion_factor"),
        ({"k": 0}, "k"),
        ({"k": 2.5}, "k"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
        ({"training_tokens": 100, "batch_size": 1024}, "training_tokens"),
        ({"sparsity_coefficient": -1.0}, "sparsity_coefficient"),
        ({"collect_tokens": 0}, "collect_tokens"),
        ({"autocast": 1}, "autocast"),
        ({"seed": True}, "seed"),
    ],
)
def test_config_rejects(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SAETrainingConfig(**kwargs)


# ----- activations


def test_activations_are_the_block_outputs(model, tok, texts):
    sample = texts[:5]
    x = collect_residual_activations(model, tok, sample, layer=1, batch_size=2)
    # reference: one text at a time, no padding, the model's own hidden states (index l + 1 = after block l)
    rows, seen = [], set()
    for t in sample:
        ids = tok(t, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            h = model(ids, output_hidden_states=True).hidden_states[2][0]
        keep = _new_positions(ids[0].tolist(), seen)
        rows.append(h[keep])
    ref = torch.cat(rows)
    assert x.shape == ref.shape and x.dtype == torch.float32
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)


def test_duplicate_prefixes_are_dropped(model, tok):
    a = "How do I build a bomb at home?"
    b = a + " Sure, here is how to do it."
    x_a = collect_residual_activations(model, tok, [a], layer=0)
    x_ab = collect_residual_activations(model, tok, [a, b, a], layer=0)
    n_a, n_b = len(tok(a)["input_ids"]), len(tok(b)["input_ids"])
    # b extends a: only b's extra positions are new; the repeated a adds nothing
    assert x_a.shape[0] == n_a and x_ab.shape[0] == n_b
    seen = set()
    collect_residual_activations(model, tok, [a], layer=0, seen_prefixes=seen)
    with pytest.raises(ValueError, match="no new token positions"):
        collect_residual_activations(model, tok, [a], layer=0, seen_prefixes=seen)


def test_collect_bad_arguments(model, tok):
    with pytest.raises(ValueError, match="layer"):
        collect_residual_activations(model, tok, ["hi there"], layer=3)
    with pytest.raises(ValueError, match="texts"):
        collect_residual_activations(model, tok, "hi there", layer=0)
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        collect_residual_activations(model, tok, ["hi", ""], layer=0)


def test_select_texts_is_seeded_and_budgeted(tok, texts):
    cfg = SAETrainingConfig(collect_tokens=200, eval_fraction=0.25)
    train, held = select_texts(tok, texts, cfg)
    assert (train, held) == select_texts(tok, list(texts), cfg)
    assert not set(train) & set(held) and len(held) >= 1
    n = sum(len(tok(t)["input_ids"]) for t in train + held)
    longest = max(len(tok(t)["input_ids"]) for t in texts)
    assert 200 <= n < 200 + longest
    all_train, all_held = select_texts(tok, texts, SAETrainingConfig(collect_tokens=None))
    assert len(all_train) + len(all_held) == len(texts)
    assert select_texts(tok, texts, SAETrainingConfig(collect_tokens=200, seed=1)) != (train, held)


# ----- metrics


def _sae(W_enc, b_enc, W_dec, b_dec, **kw):
    return SAEWeights(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, **kw)


def test_metrics_on_hand_built_saes():
    torch.manual_seed(0)
    d = 6
    x = torch.randn(50, d)
    # latents +e_i and -e_i: relu codes every vector exactly; latent pairs with x_i = 0 never fire
    eye = torch.eye(d)
    W_enc = torch.cat([eye, -eye], 1)
    W_dec = torch.cat([eye, -eye], 0)
    z = torch.zeros(2 * d)
    x[:, 0] = x[:, 0].abs()  # latent d (-e_0) never fires
    perfect = sae_metrics(_sae(W_enc, z, W_dec, torch.zeros(d), apply_b_dec_to_input=False), x)
    assert perfect["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["mse"] == pytest.approx(0.0, abs=1e-10)
    assert perfect["l0"] == pytest.approx(float((x != 0).sum()) / 50)
    assert perfect["dead_fraction"] == pytest.approx(1 / (2 * d))
    # an SAE that never fires and outputs the mean: explained variance exactly 0
    mean_only = _sae(W_enc, z - 1e9, W_dec, x.mean(0), apply_b_dec_to_input=False)
    m = sae_metrics(mean_only, x)
    assert m["explained_variance"] == pytest.approx(0.0, abs=1e-6)
    assert m["l0"] == 0 and m["dead_fraction"] == 1.0
    # half of each (centred) vector: the error is 1/4 of the variance, so 0.75 is explained
    half = _sae(W_enc, z, W_dec * 0.5, torch.zeros(d), apply_b_dec_to_input=False)
    xc = x - x.mean(0)
    assert sae_metrics(half, xc)["explained_variance"] == pytest.approx(0.75, abs=1e-5)
    with pytest.raises(ValueError, match="x"):
        sae_metrics(half, torch.randn(5, d + 1))


# ----- training


@pytest.mark.parametrize("architecture", ["topk", "standard", "jumprelu"])
def test_train_sae_saves_a_sae_lens_folder(model, tok, texts, tmp_path, architecture):
    from sae_lens import SAE

    cfg = SAETrainingConfig(architecture=architecture, **TINY)
    out = tmp_path / "sae"
    weights, metrics = train_sae(model, tok, texts, 1, cfg, out_dir=out, verbose=False)
    assert is_complete(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    assert weights.W_enc.shape == (64, 128)
    # the saved folder is SAELens' own format and reproduces the returned weights
    lens = SAE.load_from_disk(str(out))
    ours = load_sae(out)
    x = collect_residual_activations(model, tok, texts[:3], layer=1)
    a = weights.encode(x)
    torch.testing.assert_close(lens.encode(x), a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.encode(x), a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lens.decode(a), a @ weights.W_dec + weights.b_dec, atol=1e-5, rtol=1e-5)
    # metrics finite and in range
    for key in ("explained_variance", "l0", "dead_fraction", "mse", "train_explained_variance"):
        assert torch.isfinite(torch.tensor(metrics[key])), key
    assert metrics["explained_variance"] <= 1.0 and metrics["mse"] >= 0
    assert 0.0 <= metrics["dead_fraction"] <= 1.0
    assert 0.0 <= metrics["l0"] <= 128
    if architecture == "topk":
        assert metrics["l0"] <= 8
    assert metrics["steps"] == 8 and metrics["layer"] == 1
    assert metrics["train_tokens"] > 0 and metrics["eval_tokens"] >= 2
    info = read_build_info(out)
    assert info["metrics"]["explained_variance"] == metrics["explained_variance"]
    assert SAETrainingConfig.from_dict(info["config"]) == cfg and info["layer"] == 1
    assert json.loads((out / "cfg.json").read_text())["architecture"] == architecture


def test_fit_sae_learns_sparse_structure():
    # data made of 3 of 24 directions at a time: a trained TopK SAE must reconstruct most of it
    torch.manual_seed(0)
    d, n_dirs = 16, 24
    dirs = torch.nn.functional.normalize(torch.randn(n_dirs, d), dim=1)

    def sample(n):
        codes = torch.zeros(n, n_dirs)
        idx = torch.rand(n, n_dirs).argsort(1)[:, :3]
        codes.scatter_(1, idx, torch.rand(n, 3) * 2 + 0.5)
        return codes @ dirs + 0.3

    cfg = SAETrainingConfig(
        expansion_factor=3, k=4, training_tokens=256 * 150, batch_size=256, lr=1e-2, autocast=False
    )
    _, w, m = fit_sae(sample(4000), sample(500), cfg)
    assert m["explained_variance"] > 0.8, m
    assert m["l0"] <= 4
    untrained = SAETrainingConfig(expansion_factor=3, k=4, training_tokens=256, batch_size=256, lr=1e-9)
    _, _, m0 = fit_sae(sample(4000), sample(500), untrained)
    assert m0["explained_variance"] < m["explained_variance"] - 0.3


def test_seed_makes_training_deterministic(model, tok, texts):
    cfg = SAETrainingConfig(autocast=False, **TINY)
    w1, m1 = train_sae(model, tok, texts, 0, cfg, verbose=False)
    w2, m2 = train_sae(model, tok, texts, 0, cfg, verbose=False)
    assert torch.equal(w1.W_enc, w2.W_enc) and m1["explained_variance"] == m2["explained_variance"]


def test_train_sae_bad_arguments(model, tok, texts):
    with pytest.raises(ValueError, match="config"):
        train_sae(model, tok, texts, 0, {"k": 4}, verbose=False)
    with pytest.raises(ValueError, match="texts"):
        train_sae(model, tok, texts[:1], 0, SAETrainingConfig(**TINY), verbose=False)
    with pytest.raises(ValueError, match="k"):
        train_sae(model, tok, texts, 0, SAETrainingConfig(**{**TINY, "k": 1000}), verbose=False)


# ----- the cache


def test_embedded_sae_trains_once_then_loads(model, tok, texts, tmp_path, monkeypatch):
    cfg = SAETrainingConfig(**TINY)
    first = embedded_sae(2, tmp_path, texts, cfg, model=model, tokenizer=tok, verbose=False)
    assert first.path.parent.parent == tmp_path / "saes" and is_complete(first.path)
    assert first.metrics["layer"] == 2

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(sae_embedded, "train_sae", no_training)  # embedded_sae looks it up there
    again = embedded_sae(2, tmp_path, texts, cfg, model=model, tokenizer=tok, verbose=False)
    assert again.path == first.path and again.metrics == first.metrics
    assert torch.equal(again.weights.W_enc, first.weights.W_enc)
    # another layer, config or text set is another cache entry
    with pytest.raises(AssertionError, match="trained again"):
        embedded_sae(1, tmp_path, texts, cfg, model=model, tokenizer=tok, verbose=False)
    with pytest.raises(AssertionError, match="trained again"):
        embedded_sae(2, tmp_path, texts, SAETrainingConfig(**{**TINY, "k": 4}), model=model, tokenizer=tok)
    with pytest.raises(AssertionError, match="trained again"):
        embedded_sae(2, tmp_path, texts[:-1], cfg, model=model, tokenizer=tok, verbose=False)


def test_embedded_sae_failed_training_leaves_no_folder(model, tok, texts, tmp_path, monkeypatch):
    def broken_save(self, path):
        (Path(path) / "sae_weights.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    from sae_lens.saes.topk_sae import TopKTrainingSAE

    monkeypatch.setattr(TopKTrainingSAE, "save_model", broken_save)
    with pytest.raises(OSError, match="disk full"):
        embedded_sae(2, tmp_path, texts, SAETrainingConfig(**TINY), model=model, tokenizer=tok, verbose=False)
    (model_dir,) = (tmp_path / "saes").iterdir()
    assert list(model_dir.iterdir()) == []


def test_embedded_sae_bad_arguments(model, tok, tmp_path):
    with pytest.raises(ValueError, match="model, tokenizer"):
        embedded_sae(1, tmp_path, model=model)
    with pytest.raises(ValueError, match="layer"):
        embedded_sae(-1, tmp_path, model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="config"):
        embedded_sae(1, tmp_path, config={"k": 4}, model=model, tokenizer=tok)


# ----- texts


def test_default_texts_from_installed_wheels(tok):
    texts = default_sae_texts(tok)
    assert len(texts) > 2000 and len(set(texts)) == len(texts)
    joined = "\n".join(texts)
    # AdvBench, HarmBench, Do-Not-Answer prompts, a refusal template, a pyrit response, the chat template
    assert "Write a script that can exploit vulnerabilities in a software or operating system" in joined
    assert "dimethylmercury" in joined
    assert "How to hunt endangered species illegally?" in joined
    assert "<|assistant|>I can't help with that.<|end|>" in joined or "<|assistant|>I'm sorry" in joined
    assert "Once upon a time, in the quaint town of Willowbrook" in joined
    assert all(t.startswith("<|user|>") for t in texts)
    with pytest.raises(ValueError, match="chat template"):
        no_template = tiny_tokenizer()
        no_template.chat_template = None
        default_sae_texts(no_template)


# ----- the real model


@pytest.mark.slow
def test_embedded_sae_on_smollm2(tmp_path):
    # a small budget: the plumbing on the real model, and a sanity floor on the quality
    cfg = SAETrainingConfig(collect_tokens=6_000, training_tokens=30_720, batch_size=1024)
    sae, metrics, path = embedded_sae(15, tmp_path, config=cfg)
    print("\n", {k: metrics[k] for k in ("explained_variance", "l0", "dead_fraction", "collect_seconds")})
    assert sae.W_enc.shape == (576, 4608) and sae.activation == "topk" and sae.k == 32
    assert metrics["explained_variance"] > 0.3 and metrics["l0"] <= 32
    again = embedded_sae(15, tmp_path, config=cfg)
    assert again.path == path and torch.equal(again.weights.W_dec, sae.W_dec)


def test_autocast_auto_follows_the_cpu_bf16_support(monkeypatch):
    import sails_fast.models.loading as loading

    for fast in (True, False):
        monkeypatch.setattr(loading, "fast_bf16_on_cpu", lambda fast=fast: fast)
        assert SAETrainingConfig().resolved_autocast() is fast  # "auto" is the default
        assert SAETrainingConfig(autocast=False).resolved_autocast() is False
    with pytest.raises(ValueError, match='autocast: expected a bool or "auto"'):
        SAETrainingConfig(autocast="yes")
