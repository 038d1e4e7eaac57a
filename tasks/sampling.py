"""Choose next tokens from a batch of logits, each row by its own request's SamplingParams.

The processors match transformers' (repetition penalty, min new tokens, temperature, top-k,
top-p, in that order) but run once over the whole batch with per-row parameter tensors, so a
batch of 64 costs about as much as one row. One row alone goes through the same code, so a
request samples the same tokens alone or in a batch.
"""
from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from tasks.contract import SamplingParams


class Sampler:
    """One request's sampling state: its params, seeded generator and the tokens it has seen."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], eos_ids: frozenset[int],
                 device: torch.device):
        self.params, self.device = params, device
        self.greedy = params.temperature == 0.0
        self.eos_ids = sorted(eos_ids)
        self.produced = 0
        self._prompt_ids = prompt_ids
        self._seen: torch.Tensor | None = None  # (1, vocab) bool, made on first use
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def next_token(self, logits: torch.Tensor) -> int:
        """Choose the next token from logits (1, vocab) and record it."""
        return sample_batch([self], logits)[0]

    def seen(self, vocab_size: int) -> torch.Tensor:
        """Which vocabulary ids the prompt or the output hold so far, as a (1, vocab) mask."""
        if self._seen is None:
            self._seen = torch.zeros((1, vocab_size), dtype=torch.bool, device=self.device)
            self._seen[0, self._prompt_ids] = True
        return self._seen

    def record(self, token: int) -> None:
        """Count a chosen token and remember it for the repetition penalty."""
        self.produced += 1
        if self._seen is not None:
            self._seen[0, token] = True


def sample_batch(samplers: Sequence[Sampler], logits: torch.Tensor) -> list[int]:
    """Choose one token per row of logits (rows, vocab), each by its own sampler."""
    scores = _min_new_tokens(samplers, _repetition_penalty(samplers, logits.float()))
    if all(s.greedy for s in samplers):
        tokens = scores.argmax(dim=-1).tolist()
    else:
        tokens = _draw(samplers, _top_p(samplers, _top_k(samplers, _temperature(samplers, scores))))
    for sampler, token in zip(samplers, tokens):
        sampler.record(token)
    return tokens


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _repetition_penalty(samplers: Sequence[Sampler], scores: torch.Tensor) -> torch.Tensor:
    """Divide positive (multiply negative) scores of seen tokens by each row's penalty."""
    penalties = [s.params.repetition_penalty for s in samplers]
    if all(p == 1.0 for p in penalties):
        return scores
    seen = torch.cat([s.seen(scores.shape[-1]) for s in samplers])
    penalty = _column(penalties, scores.device)
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen & (penalty != 1.0), penalised, scores)


def _min_new_tokens(samplers: Sequence[Sampler], scores: torch.Tensor) -> torch.Tensor:
    """Forbid end-of-sequence tokens in rows that have not produced their minimum yet."""
    rows = [i for i, s in enumerate(samplers) if s.produced < s.params.min_new_tokens and s.eos_ids]
    if not rows:
        return scores
    scores = scores.clone()
    for i in rows:
        scores[i, samplers[i].eos_ids] = -float("inf")
    return scores


def _temperature(samplers: Sequence[Sampler], scores: torch.Tensor) -> torch.Tensor:
    """Scale sampled rows by their temperature; greedy rows are left as they are."""
    temperatures = [1.0 if s.greedy else s.params.temperature for s in samplers]
    if all(t == 1.0 for t in temperatures):
        return scores
    return scores / _column(temperatures, scores.device)


def _top_k(samplers: Sequence[Sampler], scores: torch.Tensor) -> torch.Tensor:
    """Keep each sampled row's k best scores (k = 0 keeps all)."""
    ks = [0 if s.greedy else min(s.params.top_k, scores.shape[-1]) for s in samplers]
    if max(ks) == 0:
        return scores
    best = torch.topk(scores, max(ks), dim=-1).values
    index = torch.tensor([[max(k, 1) - 1] for k in ks], device=scores.device)
    off = torch.tensor([[k == 0] for k in ks], device=scores.device)
    kth = best.gather(1, index).masked_fill(off, -float("inf"))
    return scores.masked_fill(scores < kth, -float("inf"))


def _top_p(samplers: Sequence[Sampler], scores: torch.Tensor) -> torch.Tensor:
    """Keep each sampled row's smallest set of tokens whose probability reaches top_p."""
    tails = [-1.0 if s.greedy or s.params.top_p >= 1.0 else 1 - s.params.top_p for s in samplers]
    if all(t < 0 for t in tails):
        return scores
    ordered, order = torch.sort(scores, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= _column(tails, scores.device)
    remove[..., -1:] = False  # always keep the best token
    return scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))


def _draw(samplers: Sequence[Sampler], scores: torch.Tensor) -> list[int]:
    """Sample each sampled row by inverting its CDF at a uniform draw from the row's own
    generator (one tiny call per row; the rest is batched); greedy rows take the argmax."""
    cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)
    uniform = torch.cat([torch.rand(1, generator=s.generator, device=scores.device)
                         for s in samplers]).unsqueeze(1)
    drawn = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)  # zero-probability ids never
    drawn = drawn.clamp(max=scores.shape[-1] - 1).squeeze(1).tolist()
    best = scores.argmax(dim=-1).tolist()
    return [best[i] if s.greedy else drawn[i] for i, s in enumerate(samplers)]
