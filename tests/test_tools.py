"""Tool calling on chat completions, through the real stack and the official openai client:
`required` and a named function always give a call whose arguments validate against the
function's parameters (sampled at temperature 0.8, streamed or not: the demo model never calls
tools by itself); the client's whole flow, with a `tool` message, gets an answer; `none` and
`auto` answer in text. The parsers of each template family, the schema that forces a call,
the demo chat template's rendering of tools, and bad input are checked too."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from api.json_schema import check_enforceable
from api.tool_calls import PARSERS, ToolPlan, parser_for
from conftest import DEMO_MODEL, MODELS_FILE
from model_store.registry import load_registry
from model_store.tokenizer import ChatTokenizer, Message, ToolCall
from test_batches import chat_line, result_lines, start_batch, wait_for_end
from tool_helpers import CLOCK, TOOLS, WEATHER, assert_valid_call, parameters, streamed_calls

CHAT = [{"role": "user", "content": "Bagaimana cuaca di Jakarta?"}]
SAMPLED = {"temperature": 0.8, "top_p": 0.95, "max_tokens": 200}
GREEDY = {"temperature": 0.0, "extra_body": {"repetition_penalty": 1.0, "min_tokens": 0}}


@pytest.fixture()
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.api_url + "/v1", api_key="x", max_retries=0)


def named(tool: dict) -> dict:
    return {"type": "function", "function": {"name": tool["function"]["name"]}}


# --- required and named: structured outputs force a valid call ---

@pytest.mark.parametrize("choice,names", [
    ("required", {t["function"]["name"] for t in TOOLS}),
    *[(named(tool), {tool["function"]["name"]}) for tool in TOOLS]],
    ids=["required", "named-weather", "named-recipe", "named-clock"])
def test_a_forced_call_validates_against_its_functions_parameters(client, choice, names):
    for seed in (1, 2, 3):
        reply = client.chat.completions.create(model=DEMO_MODEL, messages=CHAT, tools=TOOLS,
                                               tool_choice=choice, seed=seed, **SAMPLED)
        [choice_] = reply.choices
        assert choice_.finish_reason == "tool_calls"
        assert choice_.message.content is None and len(choice_.message.tool_calls) == 1
        assert_valid_call(choice_.message.tool_calls[0], names)


def test_a_streamed_call_reassembles_into_the_call_a_whole_reply_gives(client):
    # Greedy: a seeded sampled reply may change with what the engine's prefix cache holds.
    request = {"model": DEMO_MODEL, "messages": CHAT, "tools": TOOLS, "max_tokens": 200,
               "tool_choice": "required", **GREEDY}
    whole = client.chat.completions.create(**request).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(stream=True, **request))
    [call] = streamed_calls(chunks)
    assert (call["name"], call["arguments"]) == (whole.function.name, whole.function.arguments)
    assert call["id"].startswith("call_")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_named_call_streams_with_usage_and_logprobs(client):
    chunks = list(client.chat.completions.create(
        model=DEMO_MODEL, messages=CHAT, tools=TOOLS, tool_choice=named(WEATHER), seed=4,
        stream=True, stream_options={"include_usage": True}, logprobs=True, **SAMPLED))
    [call] = streamed_calls(chunks)
    jsonschema.validate(json.loads(call["arguments"]), parameters("get_weather"))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.content]
    assert len(tokens) == chunks[-1].usage.completion_tokens > 0


# --- the client's whole flow ---

def test_the_client_flow_with_a_tool_message_gets_an_answer(client):
    messages = list(CHAT)
    first = client.chat.completions.create(model=DEMO_MODEL, messages=messages, tools=TOOLS,
                                           tool_choice=named(WEATHER), seed=5, **SAMPLED)
    assistant = first.choices[0].message
    messages.append(assistant)  # the client's own message object goes back, as in its docs
    for call in assistant.tool_calls:
        arguments = assert_valid_call(call, {"get_weather"})
        messages.append({"role": "tool", "tool_call_id": call.id,
                         "content": json.dumps({"city": arguments["city"], "celsius": 31})})
    final = client.chat.completions.create(model=DEMO_MODEL, messages=messages, tools=TOOLS,
                                           max_tokens=24, **GREEDY)
    answer = final.choices[0]
    assert answer.message.role == "assistant" and answer.message.content
    assert answer.finish_reason in ("stop", "length") and not answer.message.tool_calls
    assert final.usage.prompt_tokens > first.usage.prompt_tokens  # the call and result in it


def test_tool_choice_none_answers_in_text(client):
    reply = client.chat.completions.create(model=DEMO_MODEL, messages=CHAT, tools=TOOLS,
                                           tool_choice="none", max_tokens=16, **GREEDY)
    [choice] = reply.choices
    assert choice.message.content and choice.message.tool_calls is None
    assert choice.finish_reason in ("stop", "length")


def test_auto_streams_a_text_answer_as_the_whole_reply_gives_it(client):
    request = {"model": DEMO_MODEL, "messages": CHAT, "tools": TOOLS, "max_tokens": 24,
               **GREEDY}
    whole = client.chat.completions.create(**request).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **request))
    assert whole.message.content and whole.message.tool_calls is None  # tiny: no call
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert streamed_calls(chunks) == []
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason != "tool_calls"


def test_a_batch_line_with_a_forced_call_gets_tool_calls(client):
    line = chat_line("weather", tokens=200, tools=TOOLS, tool_choice="required",
                     messages=CHAT, temperature=0.8, seed=3)
    del line["body"]["min_tokens"]
    batch = wait_for_end(client, start_batch(client, [line]).id)
    body = result_lines(client, batch)["weather"]["response"]["body"]
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]),
                        parameters(call["function"]["name"]))


# --- bad input ---

BAD_TOOLS = [
    ("tools-not-a-list", {"tools": WEATHER}, "tools"),
    ("tools-empty", {"tools": []}, "tools"),
    ("tool-without-name", {"tools": [{"type": "function", "function": {}}]},
     "tools.0.function.name"),
    ("tool-bad-name", {"tools": [{"type": "function", "function": {"name": "get weather"}}]},
     "tools.0.function.name"),
    ("tool-not-a-function", {"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ("tool-invalid-parameters", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "thing"}}}]}, "tools.0.function.parameters"),
    ("tool-unenforceable-parameters", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "not": {}}}}]},
     "tools.0.function.parameters"),
    ("tool-defined-twice", {"tools": [WEATHER, WEATHER]}, "tools"),
    ("tool-choice-without-tools", {"tool_choice": "required"}, "tool_choice"),
    ("tool-choice-unknown-mode", {"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ("tool-choice-unknown-function", {"tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "order_food"}}}, "tool_choice"),
    ("tool-choice-without-a-name", {"tools": TOOLS, "tool_choice": {"type": "function"}},
     "tool_choice"),
    ("forced-call-and-json-format", {"tools": TOOLS, "tool_choice": "required",
                                     "response_format": {"type": "json_object"}}, "tool_choice"),
    ("forced-call-and-min-tokens", {"tools": TOOLS, "tool_choice": "required",
                                    "min_tokens": 4}, "tool_choice"),
    ("parallel-not-a-bool", {"tools": TOOLS, "parallel_tool_calls": "yes"},
     "parallel_tool_calls"),
    ("tool-message-without-id", {"messages": [{"role": "tool", "content": "31"}]},
     "messages.0.tool_call_id"),
    ("tool-message-without-content", {"messages": [{"role": "tool", "tool_call_id": "c"}]},
     "messages.0.content"),
    ("assistant-without-content-or-calls", {"messages": [{"role": "assistant"}]},
     "messages.0.tool_calls"),
    ("user-with-tool-calls", {"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages.0.tool_calls"),
    ("call-arguments-not-an-object", {"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "31"}}]}]},
     "messages.0.tool_calls.0.function.arguments"),
]


@pytest.mark.parametrize("body,param", [case[1:] for case in BAD_TOOLS],
                         ids=[case[0] for case in BAD_TOOLS])
def test_bad_tool_input_is_a_400_naming_the_param(api, body, param):
    response = api.post("/v1/chat/completions", json={
        "model": DEMO_MODEL, "messages": CHAT, "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert param in error["message"], error


# --- parsers ---

HERMES, LLAMA = PARSERS["hermes"], PARSERS["llama3_json"]


def calls_of(parsed) -> tuple[str | None, list[tuple[str, dict]]]:
    content, calls = parsed
    assert all(call.id.startswith("call_") for call in calls)
    return content, [(call.name, json.loads(call.arguments)) for call in calls]


def test_hermes_reads_tagged_calls_and_the_text_before_them():
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bogor"}}\n</tool_call>'
    assert calls_of(HERMES.parse(one)) == (None, [("get_weather", {"city": "Bogor"})])
    several = ('Let me check.\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
               '<tool_call>{"name": "b", "arguments": {"n": [1, 2]}}')  # the last one unclosed
    assert calls_of(HERMES.parse(several)) == ("Let me check.\n", [("a", {}), ("b", {"n": [1, 2]})])


@pytest.mark.parametrize("text", [
    "Cerah, 31 derajat.",
    '<tool_call>{"name": "a", "arguments": {"x": 1</tool_call>',  # cut short
    '<tool_call>{"name": "a"}</tool_call>',  # no arguments
    '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>not json</tool_call>',
    '<tool_call>["a", {}]</tool_call>'])
def test_hermes_leaves_text_without_a_whole_call_as_content(text):
    assert HERMES.parse(text) == (text, [])


def test_llama3_json_reads_calls_with_or_without_the_python_tag():
    assert calls_of(LLAMA.parse('{"name": "a", "parameters": {"x": 1}}')) == (
        None, [("a", {"x": 1})])
    tagged = '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"y": 2}}'
    assert calls_of(LLAMA.parse(tagged)) == (None, [("a", {}), ("b", {"y": 2})])


@pytest.mark.parametrize("text", [
    "Cuacanya cerah.", 'Here: {"name": "a", "parameters": {}}', '{"name": "a"}',
    '{"name": "a", "parameters": {}} and more', '{"name": "a", "parameters": {"x": '])
def test_llama3_json_leaves_anything_but_calls_as_content(text):
    assert LLAMA.parse(text) == (text, [])


@pytest.mark.parametrize("parser,text,ready", [
    (HERMES, "Sebentar", 8), (HERMES, "Sebentar <tool", 9), (HERMES, "Sebentar <tool_call>{", 9),
    (HERMES, "a < b", 5), (LLAMA, "", 0), (LLAMA, "  {", 0), (LLAMA, "<|python", 0),
    (LLAMA, "Cerah", 5)])
def test_a_stream_holds_back_what_may_begin_a_call(parser, text, ready):
    assert parser.holdback(text) == ready


def test_a_plan_forces_one_call_and_parallel_false_keeps_the_first():
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call>' * 2
    assert len(ToolPlan(HERMES).parse(text)[1]) == 2
    assert calls_of(ToolPlan(HERMES, parallel=False).parse(text)) == (None, [("a", {})])
    forced = ToolPlan(HERMES, forced=(("a", {"type": "object"}),))
    assert forced.holdback("{") == 0
    assert calls_of(forced.parse('{"name": "a", "arguments": {"k": true}}')) == (
        None, [("a", {"k": True})])
    assert forced.parse('{"name": "a", "argu') == ('{"name": "a", "argu', [])  # cut short


@pytest.mark.parametrize("parser", [HERMES, LLAMA], ids=["hermes", "llama3_json"])
def test_the_forced_call_schema_accepts_exactly_the_familys_calls(parser):
    functions = [(t["function"]["name"], t["function"].get("parameters")) for t in TOOLS]
    schema = json.loads(ToolPlan(parser, forced=tuple(functions)).json_schema())
    check_enforceable(schema)
    key = parser.arguments_key
    for call in ({"name": "get_weather", key: {"city": "Solo", "unit": "celsius"}},
                 {"name": "find_recipe", key: {"dish": "soto", "servings": 2}},
                 {"name": "current_time", key: {}}):
        jsonschema.validate(call, schema)
        assert parser.parse_call(json.dumps(call)).name == call["name"]
    for wrong in ({"name": "get_weather", key: {"city": "Solo"}},
                  {"name": "find_recipe", key: {"dish": "soto", "servings": 9}},
                  {"name": "order_food", key: {}}, {"name": "current_time", key: {"x": 1}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)


def test_the_parser_comes_from_the_registry_or_the_chat_template():
    llama = ('{{ "<|start_header_id|>" }}{% if tools is not none %}{{ tools | tojson }}'
             '{% endif %}')
    assert parser_for(None, "{{ '<tool_call>' }}") is HERMES
    assert parser_for(None, llama) is LLAMA
    assert parser_for(None, "{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert parser_for("llama3_json", "{{ '<tool_call>' }}") is LLAMA


# --- the demo chat template ---

@pytest.fixture(scope="module")
def tokenizer() -> ChatTokenizer:
    return ChatTokenizer(load_registry(MODELS_FILE).default.path)


def test_the_demo_template_renders_tools_calls_and_results_in_hermes_style(tokenizer):
    assert parser_for(None, tokenizer.chat_template) is HERMES
    call = ToolCall("call_1", "get_weather", '{"city": "Bogor", "unit": "celsius"}')
    prompt = tokenizer.render([
        Message("user", "Cuaca di Bogor?"), Message("assistant", None, (call,)),
        Message("tool", '{"celsius": 24}', tool_call_id="call_1")], "Be brief.", [WEATHER])
    assert prompt.startswith("<|begin_of_text|><|im_start|>system\nBe brief.\n\n# Tools\n")
    assert f"<tools>\n{json.dumps(WEATHER)}\n</tools>" in prompt  # tojson: "<now>" unescaped
    assert prompt.endswith(
        "<|im_start|>user\nCuaca di Bogor?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Bogor", "unit": "celsius"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"celsius": 24}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n")
    assert prompt.count("<|im_start|>system") == 1


def test_the_demo_template_renders_as_before_without_tools(tokenizer):
    messages = [Message("system", "Own"), Message("user", "Halo"), Message("assistant", "Hai")]
    expected = ("<|begin_of_text|><|im_start|>system\nOwn<|im_end|>\n<|im_start|>user\nHalo"
                "<|im_end|>\n<|im_start|>assistant\nHai<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.render(messages) == tokenizer.render(messages, tools=[]) == expected
    with_tools = tokenizer.render(messages, tools=[CLOCK])
    assert with_tools.startswith("<|begin_of_text|><|im_start|>system\nOwn\n\n# Tools")
    assert with_tools.endswith(expected.removeprefix("<|begin_of_text|><|im_start|>system\nOwn"
                                                     "<|im_end|>\n"))
