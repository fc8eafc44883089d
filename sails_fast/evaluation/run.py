"""Safety evaluation (METHOD.md step 6): refusal rate, over-refusal, a logit refusal score, an optional judge.

`evaluate(model, tokenizer, harmful, harmless, safe_but_scary, config)` runs on any causal LM (a base model
before training, the PEFT model after) and returns an `EvalResult` that saves as JSON and prints as a
table; `compare(before, after)` prints the two side by side.

Metrics, each named with what produced it:

- refusal rate [sails-refusal@1]: greedy generations (chat template, `max_new_tokens`) scored by the named
  `RefusalMatcher`. On held-out harmful prompts it is the safety stand-in; on the harmless and
  safe-but-scary sets it is the over-refusal rate.
- logit refusal score (generation-free): for a prompt x formatted with the chat template and the
  generation prompt, and two sets of opening strings R (refusal openings, "I'm sorry", "I cannot", ...)
  and C (compliance openings, "Sure", "Here", ...), each tokenised on its own without special tokens,

      P(o | x) = prod_t p(o_t | x, o_<t)                       (teacher-forced, o = token ids of an opening)
      score(x) = log sum_{o in R} P(o | x) - log sum_{o in C} P(o | x)

  i.e. the log-odds that the response opens with a refusal rather than with a compliance, among these
  openings. score > 0: a refusal opening is more likely. Openings whose token ids start with another
  opening of the same set are dropped (the shorter one's probability already covers them), so the sum is
  over disjoint events; an opening that is a token prefix of one in the other set is a ValueError. One
  forward over the prompts plus one over the openings (prompt cache reused), no sampling.
- judge (optional, the paper's metric): a local causal LM given a 1-5 harmfulness rubric for each
  (harmful prompt, response); safe = score <= 2. Reported: safety rate and mean harm over the parsed
  scores, the share of 5s, and the number of replies that could not be parsed (never silently dropped).

Under torch.distributed every rank calls `evaluate` with the same prompts: each rank generates, scores and
judges a contiguous share of every set, and the per-prompt records are gathered in order, so every rank
returns the same EvalResult as a single process would.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sails_fast.core import distributed
from sails_fast.evaluation.config import SETS, EvalConfig
from sails_fast.evaluation.generation import _prompt_text, generate_responses
from sails_fast.evaluation.judge import judge_responses, judge_result
from sails_fast.evaluation.logit_score import logit_refusal_scores, opening_token_ids
from sails_fast.evaluation.refusal import RefusalMatcher
from sails_fast.evaluation.results import EvalResult, SetResult

# ----- evaluate


def _versions() -> dict:
    import transformers

    from sails_fast.core.version import __version__

    return {"sails_fast": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def evaluate(
    model: nn.Module,
    tokenizer,
    harmful: Sequence | None = None,
    harmless: Sequence | None = None,
    safe_but_scary: Sequence | None = None,
    config: EvalConfig | None = None,
    *,
    judge: str | Path | tuple[nn.Module, Any] | None = None,
    label: str = "eval",
    matcher: RefusalMatcher | None = None,
) -> EvalResult:
    """Refusal rate, over-refusal, logit refusal score and (optionally) judge scores of one model.

    Args:
        model: a causal LM (the base before training, the PEFT model after); its train/eval mode is kept.
        tokenizer: its tokenizer (needs a pad or eos token).
        harmful: held-out harmful prompts (str or PromptRecord); their refusal rate is the safety stand-in.
        harmless: harmless prompts; their refusal rate is over-refusal.
        safe_but_scary: benign prompts that sound harmful; over-refusal too.
        config: EvalConfig.
        judge: a local judge folder or (model, tokenizer): scores the harmful responses on the 1-5 rubric.
        label: a tag stored in the result ("before", "after").
        matcher: the refusal matcher (default RefusalMatcher(window=config.matcher_window)).

    Returns:
        EvalResult: per-set metrics and per-prompt records; `.table()`, `.save(path)`.

    Example:
        >>> before = evaluate(base, tok, harmful=test, harmless=hl, safe_but_scary=ss, label="before")
        >>> after = evaluate(peft_model, tok, harmful=test, harmless=hl, safe_but_scary=ss, label="after")
        >>> print(compare(before, after))
    """
    config = config or EvalConfig()
    if not isinstance(config, EvalConfig):
        raise ValueError(f"config: expected an EvalConfig, got {type(config).__name__}")
    matcher = matcher or RefusalMatcher(window=config.matcher_window)
    given = {n: p for n, p in zip(SETS, (harmful, harmless, safe_but_scary), strict=True) if p is not None}
    if not given:
        raise ValueError("harmful / harmless / safe_but_scary: expected at least one prompt set")
    for n, p in given.items():
        if isinstance(p, str) or not isinstance(p, Sequence) or len(p) == 0:
            raise ValueError(f"{n}: expected a non-empty sequence of prompts")
    if judge is not None and harmful is None:
        raise ValueError("judge: needs the harmful set to score")
    t0 = time.time()
    was_training = model.training
    model.eval()
    sets: dict[str, SetResult] = {}
    judged = None
    try:
        openings = opening_token_ids(tokenizer, config) if config.logit_score else {}
        for name, prompts in given.items():
            # this rank's share (all of it in a single process); the records come back in prompt order
            records = distributed.gather_concat(
                _records(model, tokenizer, distributed.shard(prompts), config, matcher)
            )
            n = len(records)
            scores = [r["logit_score"] for r in records] if config.logit_score else None
            sets[name] = SetResult(
                name=name,
                n=n,
                refusal_rate=sum(r["refused"] for r in records) / n,
                logit_score_mean=None if scores is None else sum(scores) / n,
                logit_refusal_share=None if scores is None else sum(s > 0 for s in scores) / n,
                records=records,
            )
        if judge is not None:
            judged = _judge(judge, harmful, [r["response"] for r in sets["harmful"].records], config)
    finally:
        model.train(was_training)
    meta = {
        "model": str(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__),
        "wall_s": round(time.time() - t0, 3),
        "versions": _versions(),
    }
    return EvalResult(
        label=label,
        sets=sets,
        judge=judged,
        matcher=matcher.describe(),
        logit_openings={k: list(v) for k, v in openings.items()},
        config=config.to_dict(),
        meta=meta,
    )


def _records(model, tokenizer, prompts: Sequence, config: EvalConfig, matcher: RefusalMatcher) -> list[dict]:
    """Per prompt: its response, whether the matcher calls it a refusal, and its logit refusal score."""
    if len(prompts) == 0:  # a rank without a share of this set
        return []
    if not distributed.is_main():  # one progress bar: rank 0's
        config = dataclasses.replace(config, progress=False)
    responses = generate_responses(model, tokenizer, prompts, config)
    matches = [matcher.match(r) for r in responses]
    scores = logit_refusal_scores(model, tokenizer, prompts, config).tolist() if config.logit_score else None
    return [
        {
            "prompt": _prompt_text(p),
            "response": r,
            "refused": m is not None,
            "matched": None if m is None else m.text,
            "logit_score": None if scores is None else scores[i],
        }
        for i, (p, r, m) in enumerate(zip(prompts, responses, matches, strict=True))
    ]


def _judge(judge, prompts: Sequence, responses: list[str], config: EvalConfig):
    """`judge_responses`, each rank judging a share; the replies gathered and scored as one result."""
    if not distributed.active():
        return judge_responses(judge, prompts, responses, config)
    start, stop = distributed.shard_bounds(len(prompts))
    part = (
        judge_responses(judge, prompts[start:stop], responses[start:stop], config) if stop > start else None
    )
    names = [p.judge for p in distributed.gather(part) if p is not None]
    raw = distributed.gather_concat(part.raw if part is not None else [])
    return judge_result(names[0], raw)


def evaluate_before_after(
    peft_model: nn.Module,
    tokenizer,
    harmful: Sequence | None = None,
    harmless: Sequence | None = None,
    safe_but_scary: Sequence | None = None,
    config: EvalConfig | None = None,
    *,
    judge: str | Path | tuple[nn.Module, Any] | None = None,
) -> tuple[EvalResult, EvalResult]:
    """`evaluate` a PEFT model with its adapter disabled ("before") and enabled ("after").

    Args:
        peft_model: a PEFT model (has `disable_adapter()`); same prompts and settings for both runs.
        tokenizer, harmful, harmless, safe_but_scary, config, judge: as in `evaluate`.

    Returns:
        (before, after): two EvalResult; `compare(before, after)` prints them side by side.

    Example:
        >>> before, after = evaluate_before_after(peft_model, tok, harmful=test, harmless=hl)
    """
    if not hasattr(peft_model, "disable_adapter"):
        raise ValueError("peft_model: expected a PEFT model with disable_adapter()")
    kw = dict(harmful=harmful, harmless=harmless, safe_but_scary=safe_but_scary, config=config, judge=judge)
    ctx = peft_model.disable_adapter()
    with ctx if ctx is not None else nullcontext():
        before = evaluate(peft_model, tokenizer, **kw, label="before")
    after = evaluate(peft_model, tokenizer, **kw, label="after")
    return before, after
