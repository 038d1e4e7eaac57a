"""Structured outputs: a request's JSON Schema as an xgrammar grammar, applied inside sampling.

A model's `Grammars` compiles schemas for its tokenizer (the latest kept, by digest) and gives
each constrained request a `Constraint`, whose matcher follows the reply token by token. Each
step, `constrain()` fills one bitmask row per constrained row and masks those rows' logits;
rows without a constraint cost nothing. Once the JSON is complete the grammar allows only
end-of-sequence, so the reply ends there with finish reason `stop`.

JSON comes out compact (no whitespace between tokens, "," and ":" as separators), and with
properties in the schema's order. Besides the grammar, a JSON reply never takes the tokens that
`tokenizer_view()` leaves out: special tokens (our decoder drops them, so the text would not be
what the grammar saw) and tokens with raw control bytes (xgrammar 0.2.8's length-bounded
strings admit them, and JSON parsers refuse them). vLLM's backend (tasks/engine/vllm.py) uses
vLLM's own xgrammar backend, with the same mask.

xgrammar imports torch, so only engine processes import this module, and xgrammar only once a
request asks for a schema.
"""
from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from tasks.engine.interface import InvalidSchema
from tasks.jobs.contract import SamplingParams

GRAMMAR_CACHE_SIZE = 256  # compiled schemas a model keeps
JSON_SEPARATORS = (",", ":")  # compact JSON
_XGRAMMAR_SOURCE = re.compile(r"^\[[^\]]*\]\s+\S+:\d+:\s*")  # "[18:58:36] /project/x.cc:83: "


def tokenizer_view(tokenizer_dir: str, vocab_size: int, eos_ids: frozenset[int]):
    """xgrammar's view of a model's tokenizer (its tokens' bytes, where replies stop), and which
    token ids may appear in a compact JSON reply (a bool per id): all but special tokens and
    tokens holding raw control bytes, with end-of-sequence kept to end the reply."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                              stop_token_ids=sorted(eos_ids))
    writable = torch.zeros(vocab_size, dtype=torch.bool)
    writable[:len(info.decoded_vocab)] = torch.tensor(
        [not any(byte < 0x20 for byte in token) for token in info.decoded_vocab][:vocab_size])
    special = [i for i, token in tokenizer.added_tokens_decoder.items() if token.special]
    writable[[i for i in special if i < vocab_size]] = False
    writable[sorted(eos_ids)] = True
    return info, writable


def schema_error(exc: Exception) -> InvalidSchema:
    """xgrammar's complaint about a schema, without its source location."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return InvalidSchema(f"the JSON schema cannot be enforced: "
                         f"{_XGRAMMAR_SOURCE.sub('', first_line)}")


def check_schema(schema: str) -> None:
    """Raise InvalidSchema if the schema (its JSON text) cannot become a grammar; for an engine
    that compiles it itself (vLLM), so its refusal reads as ours does."""
    import xgrammar as xgr

    try:
        xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=JSON_SEPARATORS,
                                     strict_mode=True)
    except (RuntimeError, ValueError) as exc:
        raise schema_error(exc) from None


class Grammars:
    """A model's JSON-Schema grammars, compiled for its tokenizer on first use; thread-safe."""

    def __init__(self, tokenizer_dir: str, vocab_size: int, eos_ids: frozenset[int],
                 cache_size: int = GRAMMAR_CACHE_SIZE):
        self._source = (tokenizer_dir, vocab_size, eos_ids)
        self.vocab_size, self._cache_size = vocab_size, cache_size
        self._compiled: OrderedDict[str, object] = OrderedDict()  # LRU by schema digest
        self._compiler = None
        self._writable: torch.Tensor | None = None  # the writable mask, as one bitmask row
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, loaded) -> Grammars:
        """The grammars of a loaded model (model_store.loader.LoadedModel)."""
        return cls(loaded.spec.path, loaded.model.config.vocab_size,
                   loaded.tokenizer.eos_token_ids)

    def constraint(self, params: SamplingParams) -> Constraint | None:
        """The request's constraint (None without a schema), past the tokens an earlier attempt
        wrote; raises InvalidSchema if the schema cannot be compiled."""
        if params.json_schema is None:
            return None
        return Constraint(self, self.compile(params.json_schema), params.json_written_ids)

    def compile(self, schema: str):
        """The compiled grammar of a schema (its JSON text), from the cache when it is there."""
        digest = hashlib.sha256(schema.encode()).hexdigest()
        with self._lock:
            if digest in self._compiled:
                self._compiled.move_to_end(digest)
                return self._compiled[digest]
            try:
                compiled = self._compiler_now().compile_json_schema(
                    schema, any_whitespace=False, separators=JSON_SEPARATORS, strict_mode=True)
            except (RuntimeError, ValueError) as exc:  # xgrammar's C++ errors arrive as these
                raise schema_error(exc) from None
            self._compiled[digest] = compiled
            if len(self._compiled) > self._cache_size:
                self._compiled.popitem(last=False)
            return compiled

    def writable_row(self) -> torch.Tensor:
        """The writable tokens as a (1, words) bitmask row, to AND into grammar masks (made
        with the compiler, so before any constraint)."""
        return self._writable

    def _compiler_now(self):
        """xgrammar's compiler for the tokenizer, made on first use (under the lock)."""
        if self._compiler is None:
            import xgrammar as xgr

            info, writable = tokenizer_view(*self._source)
            self._writable = _bitmask_row(writable)
            # one cache: ours, keyed by digest
            self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        return self._compiler


class Constraint:
    """One reply's place in its grammar."""

    def __init__(self, grammars: Grammars, compiled, written_ids: Sequence[int] = ()):
        import xgrammar as xgr

        self.grammars = grammars
        self.matcher = xgr.GrammarMatcher(compiled)
        for token in written_ids:
            self.accept(token)

    def accept(self, token: int) -> None:
        """Advance past a sampled token (masking allowed only tokens the grammar accepts)."""
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"the grammar refused token {token}")


def constrain(constraints: Sequence[Constraint | None], scores: torch.Tensor) -> torch.Tensor:
    """The scores (rows, vocab) with each constrained row's disallowed tokens at -inf, as a copy
    (the model's logits stay as they were); the scores themselves when no row is constrained."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return scores
    import xgrammar as xgr

    grammars = constraints[rows[0]].grammars
    bitmask = xgr.allocate_token_bitmask(len(constraints), grammars.vocab_size)
    for row in rows:
        constraints[row].matcher.fill_next_token_bitmask(bitmask, row)
    bitmask[rows] &= grammars.writable_row()
    scores = scores.clone()
    xgr.apply_token_bitmask_inplace(scores, bitmask.to(scores.device, non_blocking=True),
                                    indices=rows)
    return scores


def _bitmask_row(allowed: torch.Tensor) -> torch.Tensor:
    """A bool per token as one row of xgrammar's bitmask: bit j of int32 word w is token
    32 w + j."""
    words = -(-len(allowed) // 32)
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[:len(allowed)] = allowed.to(torch.int64)
    packed = (bits.view(words, 32) << torch.arange(32)).sum(dim=1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # as signed int32
    return packed.to(torch.int32).unsqueeze(0)
