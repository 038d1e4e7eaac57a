"""Batched sampling against transformers' own logits processors, on random logits."""
from __future__ import annotations

import pytest
import torch
from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from tasks.jobs.contract import SamplingParams
from tasks.engine.sampling import Sampler, _repetition_penalty, sample_batch

VOCAB = 512
CPU = torch.device("cpu")
ROWS = [dict(temperature=0.7, top_p=0.95, top_k=0), dict(temperature=1.0, top_p=0.5, top_k=0),
        dict(temperature=1.3, top_p=1.0, top_k=40), dict(temperature=0.5, top_p=0.8, top_k=20),
        dict(temperature=1.0, top_p=0.9, top_k=1), dict(temperature=2.0, top_p=0.3, top_k=300)]


def _sampler(seed: int = 0, **params) -> Sampler:
    return Sampler(SamplingParams(max_new_tokens=8, seed=seed, **params), [3, 5, 7],
                   frozenset({2}), CPU)


def _transformers_kept(logits: torch.Tensor, temperature: float, top_p: float,
                       top_k: int) -> set[int]:
    """The tokens transformers' warpers leave a non-zero probability, in its order."""
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


def test_every_draw_lies_in_the_nucleus_transformers_keeps():
    logits = torch.randn((len(ROWS), VOCAB), generator=torch.Generator().manual_seed(0)) * 3
    samplers = [_sampler(seed=i, **row) for i, row in enumerate(ROWS)]
    drawn = [set() for _ in ROWS]
    for _ in range(300):
        for row, token in zip(drawn, sample_batch(samplers, logits)):
            row.add(token)
    for i, row in enumerate(ROWS):
        kept = _transformers_kept(logits[i:i + 1], **row)
        assert drawn[i] <= kept, row
        assert len(drawn[i]) > min(len(kept), 300) // 3, row  # and not just its top few tokens


def test_draws_follow_the_kept_tokens_renormalised_probabilities():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0]])
    params = dict(temperature=0.8, top_p=0.9, top_k=6)
    sampler = _sampler(seed=11, **params)
    expected = torch.full((8,), float("-inf"))
    kept = sorted(_transformers_kept(logits, **params))
    expected[kept] = logits[0, kept] / params["temperature"]
    expected = expected.softmax(dim=-1)
    draws = 20_000
    counts = torch.bincount(torch.tensor([sample_batch([sampler], logits)[0]
                                          for _ in range(draws)]), minlength=8)
    assert set(counts.nonzero().flatten().tolist()) <= set(kept)
    assert torch.allclose(counts / draws, expected, atol=0.015)


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    logits = torch.randn((4, VOCAB), generator=torch.Generator().manual_seed(3))
    samplers = [_sampler(temperature=0.0, top_p=1.0), _sampler(temperature=1.0, top_p=0.9),
                _sampler(temperature=0.0, top_p=0.5, top_k=3), _sampler(temperature=0.7, top_p=1.0)]
    tokens = sample_batch(samplers, logits)
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_the_repetition_penalty_matches_transformers(penalty):
    logits = torch.randn((1, VOCAB), generator=torch.Generator().manual_seed(5))
    sampler = _sampler(temperature=1.0, top_p=1.0, repetition_penalty=penalty)
    ours = _repetition_penalty([sampler], logits)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([[3, 5, 7]]), logits.clone())
    assert torch.allclose(ours, theirs)


def test_min_new_tokens_forbids_the_end_token_until_reached():
    logits = torch.full((1, 8), -5.0)
    logits[0, 2] = 10.0  # end-of-sequence is by far the likeliest
    sampler = Sampler(SamplingParams(max_new_tokens=8, min_new_tokens=2, temperature=0.0,
                                     top_p=1.0), [3], frozenset({2}), CPU)
    tokens = [sample_batch([sampler], logits)[0] for _ in range(3)]
    assert 2 not in tokens[:2] and tokens[2] == 2


@pytest.mark.parametrize("broken", [float("nan"), float("inf"), "all -inf"])
@pytest.mark.parametrize("greedy", [True, False])
def test_a_row_with_non_finite_scores_gets_none_and_the_others_their_tokens(broken, greedy):
    params = dict(temperature=0.0, top_p=1.0) if greedy else dict(temperature=0.8, top_p=0.9)
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(5))
    clean = sample_batch([_sampler(seed=i, **params) for i in range(3)], logits.clone())
    if broken == "all -inf":
        logits[1] = -float("inf")
    else:
        logits[1, 17] = broken
    samplers = [_sampler(seed=i, **params) for i in range(3)]
    tokens = sample_batch(samplers, logits)
    assert tokens[1] is None and samplers[1].produced == 0
    assert [tokens[0], tokens[2]] == [clean[0], clean[2]]
    with pytest.raises(ArithmeticError, match="not finite"):
        _sampler(**params).next_token(logits[1:2])
