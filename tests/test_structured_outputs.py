"""Structured outputs on our engine, through the real stack: every reply to a JSON Schema parses
and validates, sampled at temperature 0.8 (the demo model would never write JSON by itself);
streamed or not, chat or text, on the OpenAI routes and POST /v1/generate. A schema no grammar
can enforce is a 400 naming the problem; a reply cut by max_tokens ends with `length`."""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from conftest import DEMO_MODEL, MODELS_FILE, stream_events, submit, token_text
from structured_helpers import SCHEMAS, PERSON, assert_follows, response_format

CHAT = [{"role": "user", "content": "Tulis data orang dalam JSON."}]
SAMPLED = {"temperature": 0.8, "top_p": 0.95}
SEEDS = (1, 2)


@pytest.fixture()
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.api_url + "/v1", api_key="x", max_retries=0)


def _chat(client: openai.OpenAI, name: str, schema: dict, seed: int, **extra):
    return client.chat.completions.create(
        model=DEMO_MODEL, messages=CHAT, seed=seed, response_format=response_format(name, schema),
        **{"max_tokens": 256, **SAMPLED, **extra})


def test_every_reply_to_every_schema_validates(client):
    cases = [(name, schema, seed) for name, schema in SCHEMAS for seed in SEEDS]
    with ThreadPoolExecutor(8) as pool:  # they share the engine's batch
        replies = list(pool.map(lambda case: _chat(client, *case), cases))
    assert len(SCHEMAS) >= 20
    for (name, schema, seed), reply in zip(cases, replies):
        [choice] = reply.choices
        assert choice.finish_reason == "stop", (name, seed, choice.message.content)
        assert_follows(choice.message.content, schema)


def test_a_seeded_structured_reply_repeats(client):
    first, second = (_chat(client, "person", PERSON, seed=7).choices[0].message.content
                     for _ in range(2))
    assert first == second
    assert_follows(first, PERSON)


def test_a_streamed_structured_reply_validates(client):
    for name, schema in SCHEMAS[:4]:
        chunks = list(_chat(client, name, schema, seed=3, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert_follows(text, schema)


def test_json_object_gives_a_json_object_on_chat_and_text_completions(client):
    chat = client.chat.completions.create(
        model=DEMO_MODEL, messages=CHAT, max_tokens=200, seed=5, temperature=0.3,
        response_format={"type": "json_object"})
    text = client.completions.create(
        model=DEMO_MODEL, prompt="Data:", max_tokens=200, seed=5, temperature=0.3,
        extra_body={"response_format": {"type": "json_object"}})
    for choice, content in ((chat.choices[0], chat.choices[0].message.content),
                            (text.choices[0], text.choices[0].text)):
        if choice.finish_reason == "stop":  # free keys may run past max_tokens: then `length`
            assert isinstance(json.loads(content), dict)
        assert content.startswith("{")


def test_a_text_completion_follows_its_schema_streamed(client):
    stream = client.completions.create(
        model=DEMO_MODEL, prompt="Pesanan:", max_tokens=200, seed=4, stream=True, **SAMPLED,
        extra_body={"response_format": response_format("order", SCHEMAS[13][1])})
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert_follows("".join(c.choices[0].text for c in chunks), SCHEMAS[13][1])


def test_generate_takes_response_format(api):
    job = submit(api, prompt="Halo", max_new_tokens=128, seed=9, **SAMPLED,
                 response_format=response_format("person", PERSON))
    events = stream_events(job["stream_url"])
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "stop"
    assert_follows(token_text(events), PERSON)


def test_max_tokens_cutting_the_json_short_ends_with_length(client):
    reply = _chat(client, "many-fields", SCHEMAS[-1][1], seed=1, max_tokens=6)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 6
    with pytest.raises(json.JSONDecodeError):
        json.loads(reply.choices[0].message.content)


def test_a_schema_only_the_compiler_can_refuse_is_a_400_naming_the_problem(client):
    bad = {"type": "object", "properties": {"id": {"type": "string", "minLength": 5,
                                                   "maxLength": 2}}}
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, "bad", bad, seed=1)
    error = caught.value.body
    assert (error["code"], error["param"]) == ("invalid_schema", "response_format")
    assert error["message"] == ("the JSON schema cannot be enforced: minLength 5 is greater "
                                "than maxLength 2")


def test_a_schema_refused_mid_stream_arrives_as_an_error_frame(client):
    bad = {"type": "integer", "minimum": 5, "maximum": 3}
    chunks = client.chat.completions.create(
        model=DEMO_MODEL, messages=CHAT, max_tokens=16, stream=True,
        response_format=response_format("bad", bad))
    with pytest.raises(openai.APIError, match="minimum greater than maximum"):
        list(chunks)


def test_the_api_refuses_schemas_it_knows_no_grammar_honours(client):
    for schema, problem in [({"type": "string", "pattern": "[a-"}, "regex"),
                            ({"type": "array", "uniqueItems": True}, "uniqueItems"),
                            ({"not": {"type": "string"}}, "`not`"),
                            ({"type": "string", "format": "date", "maxLength": 3}, "minLength"),
                            ({"$ref": "https://example.com/s.json"}, "must point inside")]:
        with pytest.raises(openai.BadRequestError, match=problem) as caught:
            _chat(client, "x", schema, seed=1)
        assert caught.value.body["code"] == "invalid_schema"


# --- the engine alone: a JSON reply that a new attempt continues stays valid ---

@pytest.fixture(scope="module")
def engine():
    from model_store.loader import load_model
    from model_store.registry import load_registry
    from tasks.engine.factory import EngineOptions, build_engine

    loaded = load_model(load_registry(MODELS_FILE).get(DEMO_MODEL))
    engine = build_engine(loaded, EngineOptions(max_batch_size=4))
    yield engine, loaded.tokenizer
    engine.close()


def test_a_resumed_json_reply_goes_on_within_its_grammar(engine):
    from tasks.engine.interface import iterate
    from tasks.jobs.contract import SamplingParams
    from tasks.worker.runner import remaining

    engine, tokenizer = engine
    schema = json.dumps(SCHEMAS[13][1])
    params = SamplingParams(max_new_tokens=120, temperature=0.8, top_p=0.95, seed=3,
                            json_schema=schema)
    prompt = tokenizer.encode_prompt("Pesanan:")
    first = [s.token_id for s in iterate(engine, prompt, params) if s.token_id is not None]
    written = first[:len(first) // 2]  # what a lost attempt delivered
    rest = remaining(params, written)
    assert rest.json_written_ids == tuple(written)
    for seed in range(3):
        steps = list(iterate(engine, prompt + written, rest.model_copy(update={"seed": seed})))
        ids = written + [s.token_id for s in steps if s.token_id is not None]
        assert steps[-1].finish.value == "stop"
        assert_follows(tokenizer.decode(ids), SCHEMAS[13][1])


def test_constrained_and_free_rows_share_a_batch(engine):
    from tasks.engine.interface import iterate
    from tasks.jobs.contract import SamplingParams

    engine, tokenizer = engine
    prompt = tokenizer.encode_prompt("Halo")
    free = SamplingParams(max_new_tokens=40, min_new_tokens=40, temperature=0.0, top_p=1.0)
    json_params = free.model_copy(update={"min_new_tokens": 0, "temperature": 0.8, "seed": 2,
                                          "json_schema": json.dumps(PERSON)})
    results = {}

    def run(key, params):
        results[key] = [s.token_id for s in iterate(engine, prompt, params)
                        if s.token_id is not None]

    threads = [threading.Thread(target=run, args=(k, p))
               for k, p in (("free", free), ("json", json_params), ("free2", free))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["free"] == results["free2"] and len(results["free"]) == 40
    assert_follows(tokenizer.decode(results["json"]), PERSON)


# --- the mask alone, on random logits: what the grammar allows, and never a token JSON refuses ---

@pytest.fixture(scope="module")
def grammars():
    from model_store.registry import load_registry
    from model_store.tokenizer import ChatTokenizer
    from tasks.engine.structured import Grammars

    spec = load_registry(MODELS_FILE).get(DEMO_MODEL)
    tokenizer = ChatTokenizer(spec.path)
    return Grammars(spec.path, tokenizer.vocab_size, tokenizer.eos_token_ids), tokenizer


@pytest.mark.parametrize("name,schema", SCHEMAS, ids=[name for name, _ in SCHEMAS])
def test_random_logits_under_the_mask_still_give_valid_json(grammars, name, schema):
    import torch

    from tasks.engine.sampling import Sampler, sample_batch
    from tasks.jobs.contract import SamplingParams

    grammars, tokenizer = grammars
    params = SamplingParams(max_new_tokens=400, temperature=1.0, top_p=1.0, seed=0,
                            json_schema=json.dumps(schema))
    noise = torch.Generator().manual_seed(0)
    for _ in range(3):
        sampler = Sampler(params, [1], tokenizer.eos_token_ids, torch.device("cpu"),
                          grammars.constraint(params))
        ids = []
        while (token := sample_batch([sampler], torch.randn((1, tokenizer.vocab_size),
                                                            generator=noise) * 3)[0]) \
                not in tokenizer.eos_token_ids:
            ids.append(token)
            assert len(ids) < 400, tokenizer.decode(ids)
        assert_follows(tokenizer.decode(ids), schema)


def test_special_and_control_tokens_never_pass_the_mask(grammars):
    import torch

    from tasks.engine.structured import constrain
    from tasks.jobs.contract import SamplingParams

    grammars, tokenizer = grammars
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1.0,
                            json_schema='{"type":"string","maxLength":5}')
    constraint = grammars.constraint(params)
    constraint.accept(tokenizer.encode('"')[0])  # inside the string: xgrammar allows \x00-\x1f
    free, masked = constrain([None, constraint], torch.zeros((2, tokenizer.vocab_size)))
    control = [i for i in range(tokenizer.vocab_size)
               if any(ord(c) < 0x20 for c in tokenizer.token_text(i))]
    special = [i for i in range(tokenizer.vocab_size)  # the decoder drops them
               if tokenizer.decode([i]) == "" != tokenizer.token_text(i)
               and i not in tokenizer.eos_token_ids]
    assert control and special and torch.isneginf(masked[control + special]).all()
    assert torch.isfinite(masked).sum() > 100 and (free == 0).all()
