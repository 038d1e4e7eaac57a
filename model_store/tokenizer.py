"""A model's tokenizer and chat template without transformers, shared by the API and workers.

This is the one place a chat template is applied: the API renders and encodes the prompt
here (so it can reject prompts longer than the context before queueing), and workers
decode generated tokens with the same files.
"""
from __future__ import annotations

import json
from datetime import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class ChatTemplateError(ValueError):
    """The chat template refused the messages."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


@dataclass(frozen=True)
class ToolCall:
    """A function call an assistant message made (or a reply makes): `arguments` is JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Message:
    role: str
    content: str | None  # None: an assistant message that only calls tools
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # on a `tool` message: the call it answers


class ChatTokenizer:
    """Render chat prompts, encode and decode, from a model directory's tokenizer files."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = _read_json(model_dir / "tokenizer_config.json")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.eos_token_ids = self._eos_ids(model_dir)
        self.chat_template = _chat_template(model_dir, config)
        self._template = _compile_template(self.chat_template)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def render(self, messages: list[Message], system_prompt: str | None = None,
               tools: list[dict[str, Any]] | None = None) -> str:
        """Apply the chat template, adding the system prompt unless one is given. `tools`:
        OpenAI's tool objects, which the template receives as transformers passes them."""
        turns = [_turn(m) for m in messages]
        if system_prompt and not any(t["role"] == "system" for t in turns):
            turns.insert(0, {"role": "system", "content": system_prompt})
        try:
            return self._template.render(
                messages=turns, tools=tools or None, add_generation_prompt=True,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            )
        except (TemplateError, TypeError) as exc:  # TypeError: e.g. a null content added up
            raise ChatTemplateError(str(exc)) from exc

    def encode(self, text: str) -> list[int]:
        """Token ids for text; special tokens only where the text spells them.

        Through `encode_batch`, which releases the GIL while it works (`encode` holds it): a
        megabyte prompt tokenized on a thread then no longer stalls the API's other requests."""
        return self._tokenizer.encode_batch([text], add_special_tokens=False)[0].ids

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids for a raw (not chat) prompt: the BOS token, if the model has one, then
        the text."""
        return self.encode((self.bos_token or "") + text)

    def decode(self, ids: list[int]) -> str:
        """Text for token ids, without special tokens."""
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token's text decoded alone, special tokens included (a log-probability's
        alternative token, out of its context)."""
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def _eos_ids(self, model_dir: Path) -> frozenset[int]:
        """End-of-sequence ids from generation_config.json, else the tokenizer's eos token."""
        configured = _read_json(model_dir / "generation_config.json").get("eos_token_id")
        if configured is None and self.eos_token:
            configured = self._tokenizer.token_to_id(self.eos_token)
        ids = configured if isinstance(configured, list) else [configured]
        return frozenset(i for i in ids if i is not None)


def _turn(message: Message) -> dict[str, Any]:
    """A message as templates read it; tool fields only where set, so that templates without
    tool support render what they always did. Call arguments are objects, not JSON text, as
    transformers and vLLM hand them to templates (which write them with `tojson`)."""
    turn: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        turn["tool_calls"] = [{"id": call.id, "type": "function", "function": {
            "name": call.name, "arguments": json.loads(call.arguments)}}
            for call in message.tool_calls]
    if message.tool_call_id is not None:
        turn["tool_call_id"] = message.tool_call_id
    return turn


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' `tojson`: plain JSON, where Jinja's own escapes HTML characters."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _token_text(token: str | dict | None) -> str | None:
    """Special tokens appear as plain strings or as AddedToken dicts in tokenizer_config."""
    return token.get("content") if isinstance(token, dict) else token


def _chat_template(model_dir: Path, config: dict) -> str:
    """Find the template: chat_template.jinja, else tokenizer_config.json."""
    jinja_file = model_dir / "chat_template.jinja"
    template = jinja_file.read_text() if jinja_file.exists() else config.get("chat_template")
    if not template:
        raise ValueError(f"{model_dir} has no chat template")
    return template


def _compile_template(source: str):
    """Compile like transformers does: sandboxed, trimmed blocks, raise_exception available."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # Llama 3.x uses it
    return env.from_string(source)
