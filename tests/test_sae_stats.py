"""sae_feature_stats against SAELens (dense encode + torch reductions), both backends; streaming,
ties, the memory bound of the CPU backend, and bad input.

Weights and inputs lie on exact grids (see test_sae_weights.grid), so pre-activations are exact in fp32
whatever the summation order: counts, maxima and argmaxima are compared exactly, sums to a relative 1e-5.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from test_sae_weights import grid, make_sae_lens, make_x

from sails_fast import FeatureStats, SAEWeights, sae_feature_stats

BACKENDS = ["triton", "torch"]
ARCHS = ["standard", "jumprelu", "topk"]
# T = 37 tokens, d = 576 (SmolLM2), F = 600: not a multiple of any block, 3 classes
T, D, F, C = 37, 576, 600, 3


def make_labels(T: int, C: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, C, (T,), generator=g)
    labels[:C] = torch.arange(C)  # every class present
    return labels


def make_weights(T: int, seed: int = 3) -> torch.Tensor:
    return torch.rand(T, generator=torch.Generator().manual_seed(seed)) + 0.05


def oracle(acts: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, C: int) -> dict[str, torch.Tensor]:
    """Dense reductions of [T, F] activations in float64; argmax = first token reaching the max."""
    acts, w = acts.double(), w.double()
    F_ = acts.shape[1]
    res = {
        "weight_sum": torch.zeros(C, dtype=torch.float64),
        "token_count": torch.zeros(C, dtype=torch.int64),
        "act_sum": torch.zeros(C, F_, dtype=torch.float64),
        "act_sq_sum": torch.zeros(C, F_, dtype=torch.float64),
        "active_count": torch.zeros(C, F_, dtype=torch.int64),
        "act_max": torch.full((C, F_), float("-inf"), dtype=torch.float64),
        "act_argmax": torch.full((C, F_), -1, dtype=torch.int64),
    }
    for c in range(C):
        idx = torch.nonzero(labels == c).flatten()
        if idx.numel() == 0:
            continue
        a, wc = acts[idx], w[idx]
        res["weight_sum"][c] = wc.sum()
        res["token_count"][c] = idx.numel()
        res["act_sum"][c] = (wc[:, None] * a).sum(0)
        res["act_sq_sum"][c] = (wc[:, None] * a * a).sum(0)
        res["active_count"][c] = (a > 0).sum(0)
        mx = a.max(0).values
        res["act_max"][c] = mx
        pos = torch.where(a == mx, torch.arange(idx.numel())[:, None], idx.numel()).min(0).values
        res["act_argmax"][c] = idx[pos]
    return res


def check_stats(stats: FeatureStats, ref: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    for name in ("token_count", "active_count", "act_argmax"):
        got, want = getattr(stats, name).cpu(), ref[name]
        bad = torch.nonzero(got != want)
        assert bad.numel() == 0, f"{name}: {bad.shape[0]} mismatches, first {bad[:3].tolist()}"
    got, want = stats.act_max.cpu().double(), ref["act_max"]
    assert torch.equal(got, want), f"act_max: max diff {(got - want).abs().nan_to_num().max().item():.3e}"
    for name in ("weight_sum", "act_sum", "act_sq_sum"):
        got, want = getattr(stats, name).cpu().double(), ref[name]
        assert not torch.isnan(got).any(), f"{name}: NaN"
        err = (got - want).abs()
        bound = rtol * want.abs() + 1e-30
        rel = (err / want.abs().clamp_min(1e-30)).max().item()
        assert (err <= bound).all(), f"{name}: max rel err {rel:.3e}"


def sae_lens_oracle(sae_lens, x, labels, w, C):
    with torch.no_grad():
        acts = sae_lens.encode(x)
    return oracle(acts, labels, w, C)


def assert_no_topk_ties(sae_lens, x, k):
    # SAELens picks any k among ties at the cut, we keep all: the oracle needs none
    with torch.no_grad():
        pre = sae_lens.process_sae_in(x) @ sae_lens.W_enc + sae_lens.b_enc
    top = torch.topk(pre, k + 1, dim=1).values
    assert (top[:, k - 1] > top[:, k]).all(), "test data has a tie at the k-th pre-activation"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_sae_lens(arch, backend):
    # Gemma Scope style (no b_dec on the input) for JumpReLU, SAELens' default elsewhere
    sae_lens = make_sae_lens(arch, D, F, apply_b_dec=arch != "jumprelu", k=16)
    sae = SAEWeights.from_sae_lens(sae_lens)
    x, labels, w = make_x(T, D), make_labels(T, C), make_weights(T)
    if arch == "topk":
        assert_no_topk_ties(sae_lens, x, 16)
    stats = sae_feature_stats(x, sae, labels, token_weights=w, num_classes=C, backend=backend)
    ref = sae_lens_oracle(sae_lens, x, labels, w, C)
    assert (ref["active_count"] > 0).any() and (ref["active_count"] < ref["token_count"][:, None]).any()
    assert stats.tokens_seen == T
    check_stats(stats, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_inputs(dtype, backend):
    # SAELens casts x to the SAE's dtype (fp32) first; the grid is exact in fp16 and bf16
    sae_lens = make_sae_lens("jumprelu", D, F, apply_b_dec=True)
    sae = SAEWeights.from_sae_lens(sae_lens)
    x, labels, w = make_x(T, D).to(dtype), make_labels(T, C), make_weights(T)
    stats = sae_feature_stats(x, sae, labels, token_weights=w, num_classes=C, backend=backend)
    check_stats(stats, sae_lens_oracle(sae_lens, x, labels, w, C))


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_sae_triton_equals_reference(arch):
    # a bf16 SAE: both backends take bf16 operands with fp32 accumulation (SAELens would round the
    # bf16 matmul output, so it is no oracle here)
    sae = SAEWeights.from_sae_lens(make_sae_lens(arch, 64, 300, k=8)).to(dtype=torch.bfloat16)
    x, labels, w = make_x(50, 64).to(torch.bfloat16), make_labels(50, C), make_weights(50)
    ours = sae_feature_stats(x, sae, labels, token_weights=w, num_classes=C, backend="triton")
    ref = sae_feature_stats(x, sae, labels, token_weights=w, num_classes=C, backend="torch")
    check_stats(ours, {k: v.double() if v.is_floating_point() else v for k, v in ref.tensors().items()})


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_equals_one_batch(backend):
    sae_lens = make_sae_lens("topk", D, F, k=16)
    sae = SAEWeights.from_sae_lens(sae_lens)
    x, labels, w = make_x(T, D), make_labels(T, C), make_weights(T)
    whole = sae_feature_stats(x, sae, labels, token_weights=w, num_classes=C, backend=backend)
    stream = FeatureStats.empty(C, F)
    for lo, hi in [(0, 11), (11, 11), (11, 30), (30, T)]:  # includes an empty batch
        got = sae_feature_stats(
            x[lo:hi], sae, labels[lo:hi], token_weights=w[lo:hi], num_classes=C, out=stream, backend=backend
        )
        assert got is stream
    assert stream.tokens_seen == T
    check_stats(stream, {k: v.double() if v.is_floating_point() else v for k, v in whole.tensors().items()})
    check_stats(stream, sae_lens_oracle(sae_lens, x, labels, w, C))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_triton_token_splits_and_ties(arch, deterministic):
    """Several token splits per launch (cross-program atomics / partials) and exact ties across them:
    duplicated rows give equal maxima in different splits; the first token must win."""
    from sails_fast.kernels.sae_stats import sae_stats_accumulate

    Tn, d, Fn = 200, 64, 300
    sae_lens = make_sae_lens(arch, d, Fn, k=8)
    sae = SAEWeights.from_sae_lens(sae_lens)
    x, labels, w = make_x(Tn, d), make_labels(Tn, 2), make_weights(Tn)
    x[150] = x[70] = x[5]
    labels[150] = labels[70] = labels[5] = 1
    stats = FeatureStats.empty(2, Fn)
    # 128 rows per split, 64 per tile: rows 5 and 70 tie across tiles of one split, 150 in the next split
    sae_stats_accumulate(x, sae, labels, w, stats, deterministic=deterministic, rows_per_split=128)
    ref = sae_lens_oracle(sae_lens, x, labels, w, 2)
    assert (ref["act_argmax"][1] == 5).any()
    check_stats(stats, ref)


def test_default_weights_and_all_skipped_class():
    sae_lens = make_sae_lens("standard", 64, 100)
    sae = SAEWeights.from_sae_lens(sae_lens)
    x = make_x(20, 64)
    labels = torch.full((20,), -1)
    labels[3:9] = 0  # class 1 and class 2 get no tokens
    for backend in BACKENDS:
        stats = sae_feature_stats(x, sae, labels, num_classes=3, backend=backend)
        check_stats(stats, sae_lens_oracle(sae_lens, x, labels, torch.ones(20), 3))
        assert torch.equal(stats.act_max[1:], torch.full((2, 100), float("-inf")))
        assert (stats.act_argmax[1:] == -1).all() and stats.tokens_seen == 20


def test_memory_stays_bounded_cpu_backend():
    """T = 65536, d = 64, F = 32768 on the CPU backend: a dense fp32 [T, F] would be 8 GiB."""
    script = textwrap.dedent(
        """
        import time, torch
        from sails_fast import SAEWeights, sae_feature_stats
        torch.manual_seed(0)
        T, d, F = 65536, 64, 32768
        sae = SAEWeights(W_enc=torch.randn(d, F) / 8, b_enc=torch.randn(F) * 0.1 - 0.3,
                         W_dec=torch.randn(F, d), b_dec=torch.randn(d) * 0.1)
        x = torch.randn(T, d)
        labels = torch.randint(-1, 2, (T,))
        w = torch.rand(T)
        # warm up the allocator and kernels on a small batch, then take the baseline
        sae_feature_stats(x[:256], sae, labels[:256], token_weights=w[:256], backend="torch")
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1])  # KiB
        try:
            # reset the peak (VmHWM) to the current RSS, so the peak measures this call alone
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = status("VmRSS:")
        except OSError:
            # no reset: the lifetime peak minus the current RSS is an upper bound on the growth
            before = status("VmRSS:")
        t0 = time.time()
        stats = sae_feature_stats(x, sae, labels, token_weights=w, backend="torch")
        seconds = time.time() - t0
        peak = status("VmHWM:")
        # an independent dense check on 64 latents
        sub = torch.relu((x - sae.b_dec) @ sae.W_enc[:, :64] + sae.b_enc[:64])
        m = labels == 1
        dense_sum = (w[m, None] * sub[m]).sum(0)
        err = ((stats.act_sum[1, :64] - dense_sum).abs() / dense_sum.abs()).max().item()
        print(f"{(peak - before) / 1024:.1f} {seconds:.1f} {err:.3e} {int(stats.token_count.sum())}")
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    growth_mib, seconds, err, counted = res.stdout.split()[-4:]
    print(f"peak RSS growth {growth_mib} MiB, {seconds} s, act_sum rel err {err}")
    assert float(growth_mib) < 512, f"peak RSS grew by {growth_mib} MiB"
    assert float(err) < 1e-4
    assert int(counted) > 40000


@pytest.fixture(scope="module")
def small():
    sae = SAEWeights.from_sae_lens(make_sae_lens("standard", 32, 40))
    return sae, make_x(10, 32), make_labels(10, 2)


@pytest.mark.parametrize(
    ("change", "name"),
    [
        (dict(x=torch.zeros(10, 31)), "x"),
        (dict(x=torch.zeros(10, 32, dtype=torch.int64)), "x"),
        (dict(labels=torch.zeros(9, dtype=torch.int64)), "labels"),
        (dict(labels=torch.full((10,), 2)), "labels"),
        (dict(labels=torch.full((10,), -2)), "labels"),
        (dict(labels=torch.zeros(10)), "labels"),
        (dict(token_weights=-torch.ones(10)), "token_weights"),
        (dict(token_weights=torch.ones(11)), "token_weights"),
        (dict(token_weights=torch.full((10,), float("nan"))), "token_weights"),
        (dict(out=FeatureStats.empty(2, 41)), "out"),
        (dict(out=FeatureStats.empty(3, 40)), "out"),
        (dict(num_classes=0), "num_classes"),
        (dict(backend="cuda"), "backend"),
        (dict(sae="not an sae"), "sae"),
    ],
)
def test_bad_input_names_the_argument(small, change, name):
    sae, x, labels = small
    args = dict(x=x, sae=sae, labels=labels)
    args.update(change)
    x, sae, labels = args.pop("x"), args.pop("sae"), args.pop("labels")
    with pytest.raises(ValueError, match=f"^{name}:"):
        sae_feature_stats(x, sae, labels, **args)


def test_grid_helper_is_exact_in_low_precision():
    x = grid((100, 100), 2**-6, -2.0, 2.0, torch.Generator().manual_seed(0))
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(x.to(dtype).float(), x)
