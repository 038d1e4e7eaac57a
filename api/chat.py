"""The chat page at `/`, conversations (GET/DELETE) and the interactive chat socket WS /v1/chat.

Replies are saved by the API, never by workers: a turn's reply is copied from its job's event
log when the socket relays the job's last event, or at the next read or turn of the
conversation (see api/conversations.py), so a reply survives a browser that leaves mid-reply.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Blueprint, current_app, g, render_template
from simple_websocket import ConnectionClosed

from api.auth import principal, require_api_key_under_v1
from api.conversations import Conversation, Turn, fit_history
from api.errors import APIError, as_api_error, invalid
from api.extensions import sock
from api.jobs import relay_events
from api.keys import Principal
from api.schemas import (ChatCancel, ChatFrame, ChatRegenerate, ChatResume, ChatSend,
                         SamplingFields, parse_chat_frame)
from api.services import Services, check_context, services
from model_store.tokenizer import Message
from tasks.jobs.contract import ErrorEvent, is_terminal

logger = logging.getLogger(__name__)
bp = Blueprint("chat", __name__)
bp.before_request(require_api_key_under_v1)  # the page at / stays open; its API calls do not
RELAY_FINISH_SECONDS = 10.0  # how long a new frame waits for a finished reply to be saved


@bp.get("/")
def page():
    """Serve the chat page."""
    return render_template("chat.html")


@bp.get("/v1/chat/models")
def chat_models():
    """List the models the key may use with the limits and system prompt the chat page needs."""
    svc = services()
    models = [{"name": spec.name, "context_length": spec.context_length,
               "max_new_tokens_limit": spec.max_new_tokens_limit,
               "system_prompt": spec.system_prompt, "defaults": spec.defaults.model_dump()}
              for spec in svc.usable_models(principal())]
    return {"default": svc.registry.default_name, "models": models}


@bp.get("/v1/conversations/<conversation_id>")
def get_conversation(conversation_id: str):
    """Return a conversation's turns, with the replies of finished jobs saved."""
    svc = services()
    conversation = settled(svc, conversation_id)
    expires_in = svc.conversations.expires_in(conversation_id)
    return {**conversation.model_dump(), "expires_in_seconds": expires_in}


@bp.delete("/v1/conversations/<conversation_id>")
def delete_conversation(conversation_id: str):
    """Delete a conversation and cancel its running reply, if any."""
    svc = services()
    conversation = _existing(svc, conversation_id)
    for turn in conversation.turns:
        if turn.state == "pending":
            svc.store.cancel(turn.job_id)
    svc.conversations.delete(conversation_id)
    return {"id": conversation_id, "deleted": True}


@sock.route("/v1/chat", bp=bp)
def chat_socket(ws):
    """Take chat frames from the client; stream each reply's job events back."""
    ChatSession(ws, services()).run()


@contextmanager
def editing(svc: Services, conversation_id: str | None,
            model: str | None = None) -> Iterator[Conversation]:
    """Lock, load and settle a conversation (a new one for None); save it if all went well."""
    if conversation_id is None:
        conversation = Conversation(model=svc.model(model).name, owner=principal().name)
        yield conversation
        svc.conversations.save(conversation)
        return
    with svc.conversations.lock(conversation_id):
        conversation = _existing(svc, conversation_id)
        loaded = conversation.model_dump()
        conversation.settle(svc.store)
        yield conversation
        if conversation.model_dump() != loaded:
            svc.conversations.save(conversation)


def settled(svc: Services, conversation_id: str) -> Conversation:
    """Load a conversation and save the replies of its finished jobs."""
    with editing(svc, conversation_id) as conversation:
        return conversation


def send(svc: Services, frame: ChatSend) -> tuple[Conversation, Turn]:
    """Append the user's message to its conversation and queue the reply."""
    with editing(svc, frame.conversation_id, frame.model) as conversation:
        _ensure_idle(conversation)
        conversation.model = svc.model(frame.model or conversation.model).name
        if frame.system_prompt is not None:
            conversation.system_prompt = frame.system_prompt
        turn = _queue_reply(svc, conversation, frame.content, frame, len(conversation.turns))
        conversation.turns.append(turn)
    return conversation, turn


def regenerate(svc: Services, frame: ChatRegenerate) -> tuple[Conversation, Turn]:
    """Replace the last reply with a new one to the same user message."""
    with editing(svc, frame.conversation_id) as conversation:
        _ensure_idle(conversation)
        if not conversation.turns:
            raise invalid("the conversation has no message to answer again",
                          param="conversation_id", code="nothing_to_regenerate")
        last = len(conversation.turns) - 1
        turn = _queue_reply(svc, conversation, conversation.turns[last].user, frame, last)
        conversation.turns[last] = turn
    return conversation, turn


def _queue_reply(svc: Services, conversation: Conversation, user: str,
                 sampling: SamplingFields, before: int) -> Turn:
    """Build the prompt from the history before turn `before`, trimmed to fit, and queue it."""
    spec = svc.model(conversation.model)
    svc.admission.check_model_access(principal(), spec)
    params = sampling.sampling_params(spec)
    prompt_ids, kept = fit_history(
        conversation.history(before), Message("user", user),
        lambda messages: svc.chat_prompt_ids(spec, messages, conversation.system_prompt),
        spec.context_length - params.max_new_tokens)
    check_context(spec, len(prompt_ids), params, "content")
    job = svc.admit(principal(), spec, prompt_ids, params)  # the limits of every submission
    return Turn(user=user, job_id=job.id, model=spec.name, context_turns=kept)


def _existing(svc: Services, conversation_id: str) -> Conversation:
    """The conversation, if the key may see it: another key's conversation is not found."""
    conversation = svc.conversations.load(conversation_id)
    if conversation is None or not principal().may_see(conversation.owner):
        raise APIError(404, f"conversation {conversation_id!r} does not exist or has expired",
                       "conversation_not_found", param="conversation_id")
    return conversation


def _ensure_idle(conversation: Conversation) -> None:
    if conversation.pending:
        raise APIError(409, "a reply is still being written in this conversation; stop it or "
                            "wait for it to end", "reply_in_progress", param="conversation_id")


class LockedSocket:
    """A WebSocket whose sends from the reader and the relay thread never interleave."""

    def __init__(self, ws):
        self._ws, self._lock = ws, threading.Lock()

    def send(self, text: str) -> None:
        with self._lock:
            self._ws.send(text)


class ChatSession:
    """One chat connection: reads client frames, relays one reply at a time in a thread."""

    def __init__(self, ws, svc: Services):
        self.ws, self.out, self.svc = ws, LockedSocket(ws), svc
        self.app = current_app._get_current_object()
        self.principal: Principal = principal()  # for the relay thread's app context
        self.job_id: str | None = None
        self.relay: threading.Thread | None = None

    def run(self) -> None:
        """Handle frames until the client leaves; a running reply goes on without it."""
        try:
            while True:
                self.handle(self.ws.receive())
        except ConnectionClosed:
            logger.debug("chat client left")

    def handle(self, raw: str | bytes) -> None:
        """Act on one frame; any failure becomes an error frame and the session goes on."""
        try:
            self.dispatch(parse_chat_frame(raw))
        except Exception as exc:  # noqa: BLE001 - every failure is answered in the envelope
            self.send_error(as_api_error(exc))

    def dispatch(self, frame: ChatFrame) -> None:
        """Start, regenerate, resume or cancel a reply."""
        if isinstance(frame, ChatCancel):
            if not self.busy:
                raise APIError(409, "no reply is running on this connection", "no_reply_running")
            self.svc.store.cancel(self.job_id)
            return
        self.wait_for_relay()
        if isinstance(frame, ChatResume):
            self.svc.visible_job(self.principal, frame.job_id)
            return self.start(frame.conversation_id, frame.job_id, frame.after)
        conversation, turn = (send if isinstance(frame, ChatSend) else regenerate)(self.svc, frame)
        self.start(conversation.id, turn.job_id, 0, turn.context_turns)

    @property
    def busy(self) -> bool:
        return self.relay is not None and self.relay.is_alive()

    def wait_for_relay(self) -> None:
        """Refuse while a reply streams here; once its job has ended, let the relay finish."""
        if not self.busy:
            return
        last = self.svc.store.last_event(self.job_id)
        if last is None or not is_terminal(last):
            raise APIError(409, "a reply is still streaming on this connection; cancel it or "
                                "wait for it to end", "reply_in_progress")
        self.relay.join(RELAY_FINISH_SECONDS)  # it is saving the reply

    def start(self, conversation_id: str | None, job_id: str, after: int,
              context_turns: int | None = None) -> None:
        """Announce the reply in a `turn` frame, then relay its events from a thread."""
        self.job_id = job_id
        self.out.send(json.dumps({"type": "turn", "conversation_id": conversation_id,
                                  "job_id": job_id, "after": after,
                                  "context_turns": context_turns}))
        self.relay = threading.Thread(target=self._relay, args=(conversation_id, job_id, after),
                                      name=f"chat-relay-{job_id}", daemon=True)
        self.relay.start()

    def _relay(self, conversation_id: str | None, job_id: str, after: int) -> None:
        with self.app.app_context():
            g.principal = self.principal
            try:
                relay_events(self.out, job_id, after)
            except ConnectionClosed:
                logger.debug("chat client left during job %s", job_id)
            finally:
                self._save_reply(conversation_id)

    def _save_reply(self, conversation_id: str | None) -> None:
        if conversation_id is None:
            return
        try:
            settled(self.svc, conversation_id)
        except Exception:  # the conversation may be gone; the next read settles it anyway
            logger.warning("could not save the reply of conversation %s", conversation_id,
                           exc_info=True)

    def send_error(self, error: APIError) -> None:
        self.out.send(json.dumps(ErrorEvent(error.body).to_dict()))
