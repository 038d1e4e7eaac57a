"""Conversations: trimming to the context window, history in Redis, and the WS /v1/chat protocol."""
from __future__ import annotations

import json
import time
from contextlib import closing

import pytest
import websocket

from api.conversations import fit_history
from conftest import DEMO_MODEL, MODELS_FILE
from model_store.registry import load_registry
from model_store.tokenizer import ChatTokenizer, Message

SPEC = load_registry(MODELS_FILE).get(DEMO_MODEL)
GREEDY = {"temperature": 0.0, "min_new_tokens": 0}


@pytest.fixture(scope="module")
def tokenizer() -> ChatTokenizer:
    return ChatTokenizer(SPEC.path)


def _ids(tokenizer, messages, system=SPEC.system_prompt) -> list[int]:
    return tokenizer.encode(tokenizer.render(messages, system))


# ---- trimming (no stack) --------------------------------------------------------------------

PAIRS = [(Message("user", f"Pertanyaan nomor {i}: apa kabar hari ini?"),
          Message("assistant", f"Jawaban nomor {i}: kabar baik, terima kasih."))
         for i in range(4)]
NEW = Message("user", "Dan besok?")


def _prompt(start: int) -> list[Message]:
    return [m for pair in PAIRS[start:] for m in pair] + [NEW]


@pytest.mark.parametrize("budget_for,slack,kept", [
    (0, 0, 4), (0, 100, 4), (1, 0, 3), (2, 0, 2), (2, -1, 1), (3, 0, 1), (4, 0, 0), (4, 5, 0),
])
def test_fit_history_keeps_the_newest_turns_that_fit(tokenizer, budget_for, slack, kept):
    budget = len(_ids(tokenizer, _prompt(budget_for))) + slack
    ids, count = fit_history(PAIRS, NEW, lambda m: _ids(tokenizer, m), budget)
    assert count == kept
    assert ids == _ids(tokenizer, _prompt(len(PAIRS) - kept))
    assert len(ids) <= budget
    assert tokenizer.decode(ids).count(SPEC.system_prompt) == 1  # the system prompt always stays


def test_fit_history_gives_the_bare_prompt_when_even_that_is_too_long(tokenizer):
    bare = _ids(tokenizer, [NEW])
    ids, count = fit_history(PAIRS, NEW, lambda m: _ids(tokenizer, m), len(bare) - 1)
    assert (ids, count) == (bare, 0)


# ---- the stack -------------------------------------------------------------------------------

def _chat_url(stack) -> str:
    return stack.api_url.replace("http", "ws", 1) + "/v1/chat"


@pytest.fixture()
def chat(stack):
    ws = websocket.create_connection(_chat_url(stack), timeout=60)
    yield ws
    ws.close()


def _send(ws, **frame) -> None:
    ws.send(json.dumps(frame))


def _reply(ws) -> tuple[dict, list[dict]]:
    """Read a `turn` frame and then the reply's events up to its terminal one."""
    turn = json.loads(ws.recv())
    assert turn["type"] == "turn", turn
    events = []
    while not events or events[-1]["type"] not in ("done", "error"):
        events.append(json.loads(ws.recv()))
    return turn, events


def _say(ws, content: str, **fields) -> tuple[dict, list[dict]]:
    _send(ws, type="message", content=content, **{"max_new_tokens": 8, **GREEDY, **fields})
    return _reply(ws)


def _job_prompt_tokens(api, job_id: str) -> int:
    return api.get(f"/v1/jobs/{job_id}").json()["usage"]["prompt_tokens"]


def test_a_conversation_remembers_its_turns(api, chat, stack, redis_client, tokenizer):
    first, events = _say(chat, "Halo, siapa namamu?")
    assert events[-1]["type"] == "done" and first["context_turns"] == 0
    cid = first["conversation_id"]
    second, _ = _say(chat, "Apa makanan favoritmu?", conversation_id=cid)
    assert second["conversation_id"] == cid and second["context_turns"] == 1

    conversation = api.get(f"/v1/conversations/{cid}").json()
    turns = conversation["turns"]
    assert [t["user"] for t in turns] == ["Halo, siapa namamu?", "Apa makanan favoritmu?"]
    assert [t["state"] for t in turns] == ["succeeded", "succeeded"]
    for turn in turns:
        assert turn["assistant"] == api.get(f"/v1/jobs/{turn['job_id']}").json()["text"] != ""
    history = [Message("user", turns[0]["user"]), Message("assistant", turns[0]["assistant"]),
               Message("user", turns[1]["user"])]
    assert _job_prompt_tokens(api, second["job_id"]) == len(_ids(tokenizer, history))
    ttl = stack.settings.conversation_ttl_seconds
    assert ttl - 10 <= conversation["expires_in_seconds"] <= ttl
    assert ttl - 10 <= redis_client.ttl(f"dawet:conv:{{{cid}}}") <= ttl


def test_old_turns_are_dropped_to_fit_the_context_window(api, chat, tokenizer):
    words = ["saya", "makan", "nasi"]
    contents = [" ".join([word] * 700) for word in words]
    turn, _ = _say(chat, contents[0], max_new_tokens=4)
    cid = turn["conversation_id"]
    for content in contents[1:]:
        turn, _ = _say(chat, content, conversation_id=cid, max_new_tokens=4)
    turns = api.get(f"/v1/conversations/{cid}").json()["turns"]
    pairs = [(Message("user", t["user"]), Message("assistant", t["assistant"])) for t in turns[:2]]
    budget = SPEC.context_length - 4
    expected = next(start for start in range(3) if len(_ids(tokenizer, [
        m for pair in pairs[start:] for m in pair] + [Message("user", contents[2])])) <= budget)
    assert expected == 1  # the fixture's sizes: the first turn must go, the second fits
    assert turn["context_turns"] == 2 - expected
    assert _job_prompt_tokens(api, turn["job_id"]) == len(_ids(tokenizer, [
        *pairs[1], Message("user", contents[2])]))


def test_regenerate_replaces_the_last_reply(api, chat):
    first, _ = _say(chat, "Ceritakan tentang Jakarta.")
    cid = first["conversation_id"]
    _send(chat, type="regenerate", conversation_id=cid, max_new_tokens=6, temperature=0.0)
    again, events = _reply(chat)
    assert again["job_id"] != first["job_id"] and events[-1]["type"] == "done"
    turns = api.get(f"/v1/conversations/{cid}").json()["turns"]
    assert len(turns) == 1 and turns[0]["job_id"] == again["job_id"]
    assert turns[0]["user"] == "Ceritakan tentang Jakarta."
    assert turns[0]["usage"]["completion_tokens"] <= 6


def test_a_reply_is_saved_after_the_client_leaves_mid_reply(api, stack):
    ws = websocket.create_connection(_chat_url(stack), timeout=60)
    _send(ws, type="message", content="Halo!", max_new_tokens=48, **GREEDY)
    turn = json.loads(ws.recv())
    ws.close()
    deadline = time.monotonic() + 30
    while (saved := api.get(f"/v1/conversations/{turn['conversation_id']}").json()["turns"][0]
           )["state"] == "pending":
        assert time.monotonic() < deadline, "the reply was never saved"
        time.sleep(0.2)
    assert saved["state"] == "succeeded"
    assert saved["assistant"] == api.get(f"/v1/jobs/{turn['job_id']}").json()["text"] != ""


def test_cancel_stops_the_reply_and_a_busy_conversation_refuses_new_messages(api, chat, stack):
    _send(chat, type="message", content="Ceritakan sebuah dongeng panjang.",
          max_new_tokens=400, min_new_tokens=400)
    turn = json.loads(chat.recv())
    while json.loads(chat.recv())["type"] != "token":
        pass
    with closing(websocket.create_connection(_chat_url(stack), timeout=30)) as other:
        _send(other, type="message", content="Halo?", conversation_id=turn["conversation_id"])
        assert json.loads(other.recv())["error"]["code"] == "reply_in_progress"
    _send(chat, type="cancel")
    while (event := json.loads(chat.recv()))["type"] != "done":
        pass
    assert event["finish_reason"] == "cancelled" and event["usage"]["completion_tokens"] < 400
    saved = api.get(f"/v1/conversations/{turn['conversation_id']}").json()["turns"][0]
    assert saved["state"] == "cancelled" and saved["finish_reason"] == "cancelled"
    assert saved["assistant"] == api.get(f"/v1/jobs/{turn['job_id']}").json()["text"]


def test_get_and_delete_a_conversation(api, chat):
    turn, _ = _say(chat, "Sampai jumpa.", max_new_tokens=2)
    path = f"/v1/conversations/{turn['conversation_id']}"
    assert api.get(path).status_code == 200
    assert api.delete(path).json() == {"id": turn["conversation_id"], "deleted": True}
    for method in ("GET", "DELETE"):
        response = api.request(method, path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "conversation_not_found"


# (id, frame, code, param); a frame is a dict sent as JSON, or a raw string.
BAD_FRAMES = [
    ("not-json", "hello", "invalid_json", None),
    ("not-an-object", "[1, 2]", "invalid_request_error", None),
    ("no-type", {"content": "hi"}, "unknown_message_type", "type"),
    ("unknown-type", {"type": "shout", "content": "hi"}, "unknown_message_type", "type"),
    ("no-content", {"type": "message"}, "invalid_request_error", "content"),
    ("empty-content", {"type": "message", "content": ""}, "invalid_request_error", "content"),
    ("content-too-long", {"type": "message", "content": "x" * 16_001}, "invalid_request_error",
     "content"),
    ("unknown-field", {"type": "message", "content": "hi", "temprature": 1},
     "invalid_request_error", "temprature"),
    ("number-as-string", {"type": "message", "content": "hi", "max_new_tokens": "5"},
     "invalid_request_error", "max_new_tokens"),
    ("above-limit", {"type": "message", "content": "hi", "max_new_tokens": 513},
     "invalid_request_error", "max_new_tokens"),
    ("unknown-model", {"type": "message", "content": "hi", "model": "nope"}, "model_not_found",
     "model"),
    ("unknown-conversation", {"type": "message", "content": "hi", "conversation_id": "nope"},
     "conversation_not_found", "conversation_id"),
    ("bad-conversation-id", {"type": "message", "content": "hi", "conversation_id": "../x"},
     "invalid_request_error", "conversation_id"),
    ("longer-than-context", {"type": "message", "content": "saya " * 2100, "max_new_tokens": 4},
     "context_length_exceeded", "content"),
    ("oversized-frame", "x" * 40_000, "message_too_large", None),
    ("cancel-with-nothing-running", {"type": "cancel"}, "no_reply_running", None),
    ("regenerate-unknown", {"type": "regenerate", "conversation_id": "nope"},
     "conversation_not_found", "conversation_id"),
    ("resume-unknown-job", {"type": "resume", "job_id": "nope"}, "job_not_found", "job_id"),
    ("resume-negative-after", {"type": "resume", "job_id": "x", "after": -1},
     "invalid_request_error", "after"),
]


def _send_raw(ws, frame) -> dict:
    ws.send(frame if isinstance(frame, str) else json.dumps(frame))
    return json.loads(ws.recv())


@pytest.mark.parametrize("frame,code,param", [c[1:] for c in BAD_FRAMES],
                         ids=[c[0] for c in BAD_FRAMES])
def test_bad_frames_get_an_error_frame_in_the_envelope(chat, frame, code, param):
    reply = _send_raw(chat, frame)
    assert reply["type"] == "error" and "seq" not in reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert (reply["error"]["code"], reply["error"]["param"]) == (code, param)
    assert reply["error"]["message"]


def test_the_socket_keeps_serving_after_bad_frames(chat):
    for _, frame, *_ in BAD_FRAMES:
        assert _send_raw(chat, frame)["type"] == "error"
    turn, events = _say(chat, "Masih di sana?", max_new_tokens=2)
    assert turn["conversation_id"] and events[-1]["type"] == "done"


def test_the_page_and_the_model_list_are_served(api):
    page = api.get("/")
    assert page.status_code == 200 and "chat.js" in page.text
    assert api.get("/static/chat.js").status_code == 200
    models = api.get("/v1/chat/models").json()
    assert models["default"] == DEMO_MODEL
    demo = next(m for m in models["models"] if m["name"] == DEMO_MODEL)
    assert demo["system_prompt"] == SPEC.system_prompt
    assert demo["context_length"] == SPEC.context_length
