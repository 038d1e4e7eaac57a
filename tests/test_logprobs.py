"""Log-probabilities: the model's raw distribution (as vLLM's raw_logprobs), computed only for
the rows that ask; in OpenAI's shapes on chat and text completions, streamed or not, and in
token events. The reported tokens spell the reply exactly, and a token held back by a stop
sequence is never reported."""
from __future__ import annotations

import math

import openai
import pytest
import torch

from conftest import DEMO_MODEL, stream_events, submit, token_text
from structured_helpers import PERSON, assert_follows, response_format
from tasks.engine.interface import StepLogprobs
from tasks.engine.sampling import Sampler, sample_batch
from tasks.jobs.contract import SamplingParams
from tasks.worker.runner import LogprobStream
from tasks.worker.textstream import SpelledTokens, StopMatcher

CHAT = [{"role": "user", "content": "Hello, what should I cook today?"}]
GREEDY = {"temperature": 0.0, "extra_body": {"repetition_penalty": 1.0, "min_tokens": 0}}
CPU = torch.device("cpu")


@pytest.fixture()
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.api_url + "/v1", api_key="x", max_retries=0)


# --- sampling: which distribution, and for which rows ---

def _sampler(logprobs: int | None, **params) -> Sampler:
    values = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "seed": 0} | params
    return Sampler(SamplingParams(logprobs=logprobs, **values), [3], frozenset({0}), CPU)


def test_logprobs_are_the_raw_distribution_whatever_the_sampling():
    logits = torch.randn((3, 64), generator=torch.Generator().manual_seed(0)) * 2
    samplers = [_sampler(3, temperature=1.7, repetition_penalty=1.5), _sampler(None),
                _sampler(0, temperature=0.0)]
    tokens = sample_batch(samplers, logits)
    raw = logits.log_softmax(dim=-1)
    first, third = samplers[0].logprobs, samplers[2].logprobs
    assert first.logprob == pytest.approx(raw[0, tokens[0]].item(), abs=1e-5)
    best = raw[0].topk(3)
    assert [i for i, _ in first.top] == best.indices.tolist()
    assert [lp for _, lp in first.top] == pytest.approx(best.values.tolist(), abs=1e-5)
    assert samplers[1].logprobs is None  # it did not ask
    assert third.top == () and third.logprob == pytest.approx(raw[2].max().item(), abs=1e-5)


def test_a_greedy_token_is_the_top_one():
    logits = torch.randn((1, 64), generator=torch.Generator().manual_seed(1))
    sampler = _sampler(5, temperature=0.0)
    [token] = sample_batch([sampler], logits)
    assert sampler.logprobs.top[0] == (token, pytest.approx(sampler.logprobs.logprob))


# --- the runner: log-probabilities released with the text that spells their tokens ---

def test_spelled_tokens_wait_for_all_their_text_and_a_stop_withholds_the_rest():
    tokens, stops = SpelledTokens(), StopMatcher(["cd"])
    out = []
    for text, name in [("ab", "t1"), ("c", "t2"), ("", "t3"), ("de", "t4")]:
        tokens.add(text, name)
        released, hit = stops.feed(text)
        out += tokens.cut(len(released)) if hit else tokens.release(len(released))
    # "abc" arrives whole, but "c" may begin "cd"; "cd" then stops the reply after "ab"
    assert out == [("ab", "t1")]


def test_a_token_cut_by_a_stop_is_reported_with_the_part_that_went_out():
    tokens = SpelledTokens()
    tokens.add("xy", 1)
    tokens.add("zS", 2)
    tokens.add("TOP", 3)
    assert tokens.cut(3) == [("xy", 1), ("z", 2)]
    assert tokens.rest() == []


def test_a_textless_token_goes_out_once_text_after_it_does():
    tokens = SpelledTokens()
    tokens.add("", "first-byte")
    assert tokens.release(0) == []
    tokens.add("é", "second-byte")
    assert tokens.release(1) == [("", "first-byte"), ("é", "second-byte")]


def test_logprob_stream_names_alternatives_and_floors_minus_infinity():
    stream = LogprobStream(token_text=lambda token: f"<{token}>")
    stream.add("Halo", StepLogprobs(-0.5, ((7, -0.5), (9, -math.inf))))
    stream.add(" dunia", None)  # replayed from an earlier attempt: nothing to report
    [entry] = stream.released(10, stopped=False)
    assert entry.to_dict() == {"token": "Halo", "logprob": -0.5, "top_logprobs": [
        {"token": "<7>", "logprob": -0.5}, {"token": "<9>", "logprob": -9999.0}]}


# --- the OpenAI routes and the job API ---

def test_chat_logprobs_spell_the_reply_and_greedy_tokens_are_the_top_ones(client):
    reply = client.chat.completions.create(model=DEMO_MODEL, messages=CHAT, max_tokens=24,
                                           logprobs=True, top_logprobs=3, **GREEDY)
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content != ""
    assert len(content) == reply.usage.completion_tokens
    for token in content:
        assert len(token.top_logprobs) == 3 and token.bytes == list(token.token.encode())
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob)
        assert token.logprob <= 0 and token.top_logprobs[0].logprob >= token.top_logprobs[2].logprob


def test_streamed_chat_chunks_carry_their_own_tokens_logprobs(client):
    whole = client.chat.completions.create(model=DEMO_MODEL, messages=CHAT, max_tokens=24,
                                           logprobs=True, top_logprobs=2, **GREEDY)
    chunks = list(client.chat.completions.create(
        model=DEMO_MODEL, messages=CHAT, max_tokens=24, logprobs=True, top_logprobs=2,
        stream=True, **GREEDY))
    pieces = [c.choices[0] for c in chunks if c.choices and c.choices[0].delta.content]
    streamed = [t for piece in pieces for t in piece.logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == \
        [(t.token, t.logprob) for t in whole.choices[0].logprobs.content]
    assert "".join(p.delta.content for p in pieces) == whole.choices[0].message.content


def test_chat_without_logprobs_reports_none(client):
    reply = client.chat.completions.create(model=DEMO_MODEL, messages=CHAT, max_tokens=4,
                                           logprobs=False)
    assert reply.choices[0].logprobs is None


def test_text_completion_logprobs_in_the_legacy_shape(client):
    reply = client.completions.create(model=DEMO_MODEL, prompt="Nasi goreng adalah",
                                      max_tokens=16, logprobs=2, **GREEDY)
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text != ""
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i]))
                                    for i in range(len(logprobs.tokens))]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs,
                                   logprobs.top_logprobs):
        assert 2 <= len(top) <= 3 and top[token] == logprob  # the token itself is among them
        assert logprob == pytest.approx(max(top.values()))


def test_streamed_text_completion_offsets_run_on_across_chunks(client):
    chunks = list(client.completions.create(model=DEMO_MODEL, prompt="Nasi goreng adalah",
                                            max_tokens=16, logprobs=1, stream=True, **GREEDY))
    tokens, offsets = [], []
    for chunk in chunks:
        if chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
    text = "".join(c.choices[0].text for c in chunks)
    assert "".join(tokens) == text
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]


def test_tokens_held_back_by_a_stop_sequence_are_not_reported(client):
    free = client.completions.create(model=DEMO_MODEL, prompt="Nasi goreng adalah",
                                     max_tokens=24, **GREEDY).choices[0].text
    stop = free[len(free) // 2: len(free) // 2 + 3]
    reply = client.completions.create(model=DEMO_MODEL, prompt="Nasi goreng adalah",
                                      max_tokens=24, stop=stop, logprobs=0, **GREEDY)
    choice = reply.choices[0]
    assert choice.text == free[:free.index(stop)]
    assert "".join(choice.logprobs.tokens) == choice.text


def test_structured_reply_logprobs_come_from_the_grammars_distribution(client):
    reply = client.chat.completions.create(
        model=DEMO_MODEL, messages=CHAT, max_tokens=128, logprobs=True, top_logprobs=2,
        response_format=response_format("person", PERSON), **GREEDY)
    choice = reply.choices[0]
    assert_follows(choice.message.content, PERSON)
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)
    assert content[0].token == "{" and content[0].logprob == pytest.approx(0.0, abs=1e-6)


def test_generate_token_events_carry_logprobs(api):
    job = submit(api, prompt="Halo", max_new_tokens=12, min_new_tokens=12, temperature=0.0,
                 repetition_penalty=1.0, logprobs=1)
    events = stream_events(job["stream_url"])
    tokens = [e for e in events if e["type"] == "token"]
    entries = [entry for e in tokens for entry in e["logprobs"]]
    assert "".join(entry["token"] for entry in entries) == token_text(events)
    assert all(len(entry["top_logprobs"]) == 1 for entry in entries)
    plain = stream_events(submit(api, prompt="Halo", max_new_tokens=2)["stream_url"])
    assert all("logprobs" not in e for e in plain)
