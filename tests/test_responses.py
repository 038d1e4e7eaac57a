"""OpenAI's Responses API on the real stack, through the official client: whole, in the
background, streamed and resumed, chained, cancelled, deleted, unstored, refused, owned, and
across a worker's death."""
from __future__ import annotations

import httpx
import openai
import pytest

import test_tenancy as tenancy
import test_worker_faults as faults
from api import create_app
from conftest import DEMO_MODEL, MODELS_FILE, wait_until

keyed_url = tenancy.keyed_url  # fixture: an API process with alice's and bob's keys
pair, pair_redis = faults.pair, faults.pair_redis  # fixtures: two workers, short leases

ASK = "Halo! Masak apa hari ini?"
GREEDY = {"temperature": 0.0}
LONG = {"max_output_tokens": 300, "temperature": 0.0, "extra_body": {"min_tokens": 300}}
CLOSING = {"completed": "response.completed", "incomplete": "response.incomplete"}


def _client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture()
def client(stack) -> openai.OpenAI:
    return _client(stack.api_url)


def _until_done(client: openai.OpenAI, response_id: str, timeout: float = 120):
    """Poll a response until it leaves `queued` and `in_progress`; the last one read."""
    seen = []

    def ended() -> bool:
        seen.append(client.responses.retrieve(response_id))
        return seen[-1].status not in ("queued", "in_progress")

    wait_until(ended, timeout, f"response {response_id} to end", interval=0.2)
    return seen[-1]


def _tokens(api: httpx.Client, messages: list[dict]) -> int:
    """How many prompt tokens the model reads for these messages (POST /tokenize)."""
    return api.post("/tokenize", json={"model": DEMO_MODEL, "messages": messages}).json()["count"]


def test_a_response_is_its_jobs_reply(client, api):
    raw = client.responses.with_raw_response.create(model=DEMO_MODEL, input=ASK,
                                                    max_output_tokens=24, **GREEDY)
    response, job = raw.parse(), api.get(f"/v1/jobs/{raw.headers['X-Dawet-Job-Id']}").json()
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.model == DEMO_MODEL and job["state"] == "succeeded"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.status == response.status == "incomplete"
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert response.output_text == job["text"] != ""
    usage = job["usage"]
    assert (response.usage.input_tokens, response.usage.output_tokens,
            response.usage.total_tokens) == (usage["prompt_tokens"], usage["completion_tokens"],
                                             usage["total_tokens"])
    assert response.max_output_tokens == 24 and response.temperature == 0.0
    assert response.store is True and response.background is False and response.error is None
    assert client.responses.retrieve(response.id) == response


def test_max_output_tokens_cuts_an_incomplete_response(client):
    response = client.responses.create(model=DEMO_MODEL, input=ASK, max_output_tokens=3,
                                       extra_body={"min_tokens": 3})
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3 and response.output[0].status == "incomplete"


def test_instructions_replace_the_system_prompt(client, api):
    response = client.responses.create(
        model=DEMO_MODEL, input=[{"role": "user", "content": [{"type": "input_text",
                                                                "text": ASK}]}],
        instructions="Jawab singkat.", max_output_tokens=4, metadata={"topic": "masak"})
    assert response.usage.input_tokens == _tokens(api, [
        {"role": "system", "content": "Jawab singkat."}, {"role": "user", "content": ASK}])
    assert response.instructions == "Jawab singkat." and response.metadata == {"topic": "masak"}


def test_a_background_response_is_polled_until_it_ends(client):
    created = client.responses.create(model=DEMO_MODEL, input=ASK, background=True,
                                      max_output_tokens=32)
    assert created.status == "queued" and created.background and created.output == []
    done = _until_done(client, created.id)
    assert done.status == "incomplete" and done.usage.output_tokens == 32  # min 64 by default
    assert done.output_text and done.background


def test_a_streamed_response_sends_openais_events(client):
    events = list(client.responses.create(model=DEMO_MODEL, input=ASK, max_output_tokens=24,
                                          stream=True, **GREEDY))
    final = events[-1].response
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert types[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", CLOSING[final.status]]
    assert events[0].response.status == "queued" and events[1].response.status == "in_progress"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-4].text == final.output_text != ""
    assert events[-2].item == final.output[0] and events[2].item.status == "in_progress"
    assert client.responses.retrieve(final.id) == final


def test_a_background_stream_resumes_after_any_sequence_number(client):
    stream = client.responses.create(model=DEMO_MODEL, input=ASK, background=True, stream=True,
                                     **LONG)
    head = []
    for event in stream:
        head.append(event)
        if [e.type for e in head].count("response.output_text.delta") == 3:
            break
    stream.close()  # a dropped connection: a background response goes on
    response_id, cursor = head[0].response.id, head[-1].sequence_number
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=cursor))
    whole = list(client.responses.retrieve(response_id, stream=True))
    assert rest[0].sequence_number == cursor + 1
    assert [e.model_dump() for e in head + rest] == [e.model_dump() for e in whole]
    assert [e.sequence_number for e in whole] == list(range(len(whole)))
    assert whole[-1].response.usage.output_tokens == 300


def test_previous_response_id_continues_from_the_stored_chain(client, api):
    first = client.responses.create(model=DEMO_MODEL, input=ASK, instructions="Jawab singkat.",
                                    max_output_tokens=8, **GREEDY)
    second = client.responses.create(model=DEMO_MODEL, input="Terima kasih!",
                                     previous_response_id=first.id, max_output_tokens=8,
                                     **GREEDY)
    third = client.responses.create(model=DEMO_MODEL, input="Sampai jumpa.",
                                    previous_response_id=second.id, max_output_tokens=8,
                                    **GREEDY)
    seen = [{"role": "user", "content": ASK},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "Terima kasih!"},
            {"role": "assistant", "content": second.output_text},
            {"role": "user", "content": "Sampai jumpa."}]
    # What the model read: the chain, without the first response's instructions.
    assert second.usage.input_tokens == _tokens(api, seen[:3]) > first.usage.input_tokens
    assert third.usage.input_tokens == _tokens(api, seen)
    assert third.previous_response_id == second.id and third.instructions is None
    items = list(client.responses.input_items.list(third.id, order="asc", limit=2))  # 3 pages
    assert [(i.role, i.content[0].text) for i in items] == [(m["role"], m["content"])
                                                            for m in seen]
    assert [i.id for i in items][1::2] == [first.output[0].id, second.output[0].id]
    newest_first = client.responses.input_items.list(third.id)
    assert [i.id for i in newest_first.data] == [i.id for i in reversed(items)]


def test_an_unstored_response_is_answered_and_streamed_but_not_kept(client):
    whole = client.responses.create(model=DEMO_MODEL, input=ASK, store=False,
                                    max_output_tokens=8)
    events = list(client.responses.create(model=DEMO_MODEL, input=ASK, store=False,
                                          max_output_tokens=8, stream=True))
    assert whole.store is False and whole.output_text
    assert events[-1].response.output_text
    for response_id in (whole.id, events[-1].response.id):
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(response_id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=DEMO_MODEL, input="Lagi", previous_response_id=whole.id)


def test_a_background_response_is_cancelled(client):
    created = client.responses.create(model=DEMO_MODEL, input=ASK, background=True,
                                      max_output_tokens=500, extra_body={"min_tokens": 500})
    wait_until(lambda: client.responses.retrieve(created.id).output_text, 60,
               "the response's first text", interval=0.05)
    cancelled = client.responses.cancel(created.id)
    assert cancelled.status == "cancelled" and 0 < cancelled.usage.output_tokens < 500
    assert client.responses.cancel(created.id) == cancelled == \
        client.responses.retrieve(created.id)
    events = list(client.responses.retrieve(created.id, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response == cancelled


def test_only_a_running_background_response_can_be_cancelled(client):
    whole = client.responses.create(model=DEMO_MODEL, input=ASK, max_output_tokens=4)
    background = client.responses.create(model=DEMO_MODEL, input=ASK, background=True,
                                         max_output_tokens=4)
    _until_done(client, background.id)
    for response_id in (whole.id, background.id):
        with pytest.raises(openai.BadRequestError):
            client.responses.cancel(response_id)


def test_a_deleted_response_is_gone(client):
    response = client.responses.create(model=DEMO_MODEL, input=ASK, max_output_tokens=4)
    assert client.responses.delete(response.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)


@pytest.mark.parametrize("fields,param", [
    ({"input": []}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
     "input.0.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.content.0.type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role"),
    ({"temperature": 3}, "temperature"),
    ({"max_output_tokens": 100_000}, "max_output_tokens"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"text": {"format": {"type": "json_object"}}}, "text.format.type"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"background": True, "store": False}, None),
    ({"metadata": {f"k{n}": "v" for n in range(17)}}, "metadata"),
    ({"extra_body": {"frequency_penalty": 0.5}}, "frequency_penalty"),
])
def test_bad_input_gets_a_400_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(**{"model": DEMO_MODEL, "input": ASK, **fields})
    assert refused.value.body["param"] == param and refused.value.body["message"]


def test_unknown_ids_and_bad_cursors_are_refused(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model=DEMO_MODEL, input=ASK, previous_response_id="resp_nope")
    assert missing.value.body["param"] == "previous_response_id"
    assert missing.value.body["code"] == "response_not_found"
    for call in (client.responses.retrieve, client.responses.cancel, client.responses.delete,
                 client.responses.input_items.list):
        with pytest.raises(openai.NotFoundError):
            call("resp_nope")
    response = client.responses.create(model=DEMO_MODEL, input=ASK, max_output_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.responses.retrieve(response.id, stream=True, starting_after=-1)
    with pytest.raises(openai.BadRequestError):
        client.responses.input_items.list(response.id, after="msg_nope")


def test_a_response_belongs_to_its_key_and_outlives_the_api_process(keyed_url, stack):
    alice, bob = _client(keyed_url, tenancy.ALICE), _client(keyed_url, tenancy.BOB)
    mine = alice.responses.create(model=DEMO_MODEL, input=ASK, background=True,
                                  max_output_tokens=4)
    for call in (bob.responses.retrieve, bob.responses.cancel, bob.responses.delete,
                 bob.responses.input_items.list):
        with pytest.raises(openai.NotFoundError):
            call(mine.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.create(model=DEMO_MODEL, input=ASK, previous_response_id=mine.id)
    done = _until_done(alice, mine.id)
    # Kept in Redis, not in an API process: a new app on the same Redis serves it whole.
    fresh = create_app({"models_file": MODELS_FILE, "redis_url": stack.settings.redis_url})
    again = fresh.test_client().get(f"/v1/responses/{mine.id}").json
    assert again == done.model_dump(mode="json", exclude_unset=True)


def test_a_background_response_completes_once_across_a_workers_death(pair, pair_redis):
    faults._two_live_workers(pair, pair_redis)
    sdk = _client(pair.api_url)
    body = {"model": DEMO_MODEL, "input": "Ceritakan sebuah dongeng.", "max_output_tokens": 512,
            "temperature": 0.0, "extra_body": {"min_tokens": 300}}  # then it stops by itself
    reference = sdk.responses.create(**body)
    raw = sdk.responses.with_raw_response.create(**body, background=True)
    created, job_id = raw.parse(), raw.headers["X-Dawet-Job-Id"]
    with httpx.Client(base_url=pair.api_url, timeout=30) as api:
        faults._kill_the_runner_once_it_writes(pair, api, job_id)
    done = _until_done(sdk, created.id, timeout=180)
    assert "restarted" in faults._states(pair, job_id), "the kill landed after the job ended"
    assert done.status == reference.status == "completed" and done.error is None
    assert done.output_text == reference.output_text
    assert done.usage == reference.usage
