"""Choose next tokens from a batch of logits, each row by its own request's SamplingParams.

The processors match transformers' (repetition penalty, min new tokens, temperature, top-k,
top-p, in that order) but run once over the whole batch with per-row parameter tensors, so a
batch of 64 costs about as much as one row. One row alone goes through the same code, so a
request samples the same tokens alone or in a batch.

A request with a JSON Schema has its row masked to what its grammar allows first
(tasks/engine/structured.py). Log-probabilities, for the rows that ask, come from that
distribution before penalties and temperature (vLLM's "raw_logprobs"): one log_softmax over
those rows only, so requests that do not ask pay nothing.
"""
from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from tasks.engine.interface import StepLogprobs
from tasks.engine.structured import Constraint, constrain
from tasks.jobs.contract import SamplingParams


class Sampler:
    """One request's sampling state: its params, seeded generator, the tokens it has seen, its
    grammar's constraint if it has a schema, and the log-probabilities of its last token if it
    asked for them."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], eos_ids: frozenset[int],
                 device: torch.device, constraint: Constraint | None = None):
        self.params, self.device, self.constraint = params, device, constraint
        self.logprobs: StepLogprobs | None = None  # the last chosen token's, when asked
        self.greedy = params.temperature == 0.0
        self.eos_ids = sorted(eos_ids)
        self.produced = 0
        self._prompt_ids = prompt_ids
        self._seen: torch.Tensor | None = None  # (1, vocab) bool, made on first use
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def next_token(self, logits: torch.Tensor) -> int:
        """Choose the next token from logits (1, vocab) and record it; raises NonFiniteLogits
        if they cannot be sampled."""
        token = sample_batch([self], logits)[0]
        if token is None:
            raise NonFiniteLogits()
        return token

    def seen(self, vocab_size: int) -> torch.Tensor:
        """Which vocabulary ids the prompt or the output hold so far, as a (1, vocab) mask."""
        if self._seen is None:
            self._seen = torch.zeros((1, vocab_size), dtype=torch.bool, device=self.device)
            self._seen[0, self._prompt_ids] = True
        return self._seen

    def record(self, token: int, logprobs: StepLogprobs | None = None) -> None:
        """Count a chosen token, remember it for the repetition penalty and advance the
        grammar past it."""
        self.produced += 1
        self.logprobs = logprobs
        if self._seen is not None:
            self._seen[0, token] = True
        if self.constraint is not None:
            self.constraint.accept(token)


class NonFiniteLogits(ArithmeticError):
    """The model gave a row NaN or infinite scores: nothing can be sampled from it."""

    def __init__(self):
        super().__init__("the model's scores for the next token are not finite")


def sample_batch(samplers: Sequence[Sampler], logits: torch.Tensor) -> list[int | None]:
    """Choose one token per row of logits (rows, vocab), each by its own sampler; None for a
    row whose logits are not finite (NaN, +inf, or all -inf: an fp16 overflow, say), which
    would make no sense to sample and made the draw loop forever."""
    scores, broken = _finite_rows(logits.float())
    allowed = constrain([s.constraint for s in samplers], scores)  # the grammars' masks
    scores = _min_new_tokens(samplers, _repetition_penalty(samplers, allowed))
    if all(s.greedy for s in samplers):
        tokens = scores.argmax(dim=-1).tolist()
    else:
        tokens = _draw(samplers, _temperature(samplers, scores))
    logprobs = _logprobs(samplers, allowed, tokens, broken)
    for index, (sampler, token) in enumerate(zip(samplers, tokens)):
        if index in broken:
            tokens[index] = None
        else:
            sampler.record(token, logprobs.get(index))
    return tokens


def _logprobs(samplers: Sequence[Sampler], scores: torch.Tensor, tokens: list[int],
              broken: set[int]) -> dict[int, StepLogprobs]:
    """The chosen token's log-probability and the likeliest alternatives, by row index, for the
    rows that asked: one log_softmax and one top-k over those rows only."""
    rows = [i for i, s in enumerate(samplers)
            if s.params.logprobs is not None and i not in broken]
    if not rows:
        return {}
    logprobs = scores[rows].log_softmax(dim=-1)
    picked = torch.tensor([[tokens[i]] for i in rows], device=logprobs.device)
    chosen = logprobs.gather(1, picked).flatten().tolist()
    best, ids = logprobs.topk(max(samplers[i].params.logprobs for i in rows), dim=-1)
    best, ids = best.tolist(), ids.tolist()
    wanted = [samplers[row].params.logprobs for row in rows]
    return {row: StepLogprobs(chosen[n], tuple(zip(ids[n], best[n]))[:wanted[n]])
            for n, row in enumerate(rows)}


def _finite_rows(scores: torch.Tensor) -> tuple[torch.Tensor, set[int]]:
    """The scores with every broken row zeroed (so sampling ends), and those rows' indexes."""
    broken = torch.isnan(scores).any(dim=-1) | torch.isposinf(scores).any(dim=-1) \
        | torch.isneginf(scores).all(dim=-1)
    if not bool(broken.any()):  # one host sync a step; a broken row is rare
        return scores, set()
    scores = torch.where(broken.unsqueeze(1), torch.zeros_like(scores), scores)
    return scores, set(broken.nonzero().flatten().tolist())


def _column(values: list[float], device: torch.device, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)


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
    cells = [(i, eos) for i, s in enumerate(samplers) if s.produced < s.params.min_new_tokens
             for eos in s.eos_ids]
    if not cells:
        return scores
    rows, columns = zip(*cells)
    scores = scores.clone()
    scores[list(rows), list(columns)] = -float("inf")
    return scores


def _temperature(samplers: Sequence[Sampler], scores: torch.Tensor) -> torch.Tensor:
    """Scale sampled rows by their temperature; greedy rows are left as they are."""
    temperatures = [1.0 if s.greedy else s.params.temperature for s in samplers]
    if all(t == 1.0 for t in temperatures):
        return scores
    return scores / _column(temperatures, scores.device)


def _draw(samplers: Sequence[Sampler], scores: torch.Tensor) -> list[int]:
    """Sample each sampled row from its top-k and top-p nucleus; greedy rows take the argmax.

    Rejection sampling, as FlashInfer does, instead of sorting the vocabulary (a sort of 16 x
    2048 scores took 2 ms on one CPU core): draw a candidate by inverting the CDF at a uniform
    number from the row's own generator, and accept it if the tokens likelier than it are fewer
    than top_k and hold less than top_p of the top-k mass, as transformers' TopK and TopP
    warpers keep. Otherwise no token as unlikely as it is kept either, so the row draws again
    among likelier tokens only. This samples the renormalised nucleus exactly; with top_p 0.95
    nearly every row accepts its first draw, and later rounds take only the rows that did not.
    """
    probs = scores.softmax(dim=-1)
    top_k, limit = _nucleus_bounds(samplers, probs)
    greedy = [s.greedy for s in samplers]
    tokens = scores.argmax(dim=-1).tolist() if any(greedy) else [0] * len(samplers)
    pending = [i for i, g in enumerate(greedy) if not g]
    floor = torch.full_like(limit, -1.0)  # each row draws among tokens likelier than this
    while pending:
        rows = torch.tensor(pending, device=probs.device)
        drawn, chosen, accepted = _draw_once(
            [samplers[i].generator for i in pending], probs[rows], floor[rows], top_k[rows],
            limit[rows])
        floor[rows] = chosen
        for i, token, ok in zip(pending, drawn, accepted):
            if ok:
                tokens[i] = token
        pending = [i for i, ok in zip(pending, accepted) if not ok]
    return tokens


def _nucleus_bounds(samplers: Sequence[Sampler], probs: torch.Tensor):
    """Per row (columns): top_k (the vocabulary size if off) and the probability mass that the
    tokens likelier than an accepted one must stay under (infinite when top_p is 1)."""
    vocab, device = probs.shape[-1], probs.device
    top_k = _column([min(s.params.top_k, vocab) or vocab for s in samplers], device, torch.long)
    mass = torch.ones_like(top_k, dtype=probs.dtype)
    if int(top_k.min()) < vocab:
        largest = int(top_k[top_k < vocab].max())
        best = probs.topk(largest, dim=-1).values.cumsum(dim=-1)
        within = best.gather(1, top_k.clamp(max=largest) - 1)
        mass = torch.where(top_k < vocab, within, mass)
    top_p = _column([s.params.top_p for s in samplers], device)
    return top_k, torch.where(top_p < 1.0, top_p * mass, torch.full_like(mass, float("inf")))


def _draw_once(generators: list[torch.Generator], probs: torch.Tensor, floor: torch.Tensor,
               top_k: torch.Tensor, limit: torch.Tensor):
    """One draw per row among its tokens likelier than `floor`: the tokens (a list), their
    probabilities (a column) and whether each lies in its row's nucleus (a list)."""
    candidates = torch.where(probs > floor, probs, torch.zeros_like(probs)).cumsum(dim=-1)
    uniform = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generators])
    drawn = torch.searchsorted(candidates, uniform.unsqueeze(1) * candidates[:, -1:], right=True)
    drawn = drawn.clamp_(max=probs.shape[-1] - 1)
    chosen = probs.gather(1, drawn)
    likelier = probs > chosen
    accepted = ((likelier.sum(dim=-1, keepdim=True) < top_k)
                & ((probs * likelier).sum(dim=-1, keepdim=True) < limit))
    return drawn.flatten().tolist(), chosen, accepted.flatten().tolist()
