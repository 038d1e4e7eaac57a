"""Chat conversations: history kept in Redis, and prompts trimmed to the model's context window.

A conversation is one JSON value at `dawet:conv:{id}` that expires `conversation_ttl_seconds`
after its last change. Each turn holds the user's message and the job that answers it. Nobody
waits for a reply to save it: a turn stays `pending` until it is settled from its job's event
log (by the chat socket when it relays the last event, or by any later read or turn of the
conversation), so a reply is kept even when the browser leaves in the middle of it.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import redis
from pydantic import BaseModel, Field

from model_store.tokenizer import Message
from tasks.jobs.contract import JobState, JobView, is_terminal
from tasks.jobs.log import JobStore

PENDING = "pending"
ANSWERED = frozenset({JobState.SUCCEEDED.value, JobState.CANCELLED.value})
LOCK_SECONDS = 30  # a lock holder that dies frees the conversation after this long
LOCK_WAIT_SECONDS = 10


class Turn(BaseModel):
    """A user message and the reply of the job that answers it."""

    user: str
    job_id: str
    model: str
    state: str = PENDING  # pending, then the job's final state
    assistant: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    timings: dict | None = None
    error: dict | None = None
    context_turns: int = 0  # earlier turns the prompt kept after trimming

    def settle(self, store: JobStore) -> bool:
        """Copy the reply from the job's log once the job has ended; whether anything changed."""
        events = store.read(self.job_id)
        if not events and not store.exists(self.job_id):
            self.state = JobState.EXPIRED.value  # the log expired before anyone settled it
            return True
        if not events or not is_terminal(events[-1]):
            return False
        view = JobView(self.job_id)
        for event in events:
            view.apply(event)
        self.state, self.assistant, self.error = view.state.value, view.text, view.error
        self.finish_reason, self.usage, self.timings = view.finish_reason, view.usage, view.timings
        return True


class Conversation(BaseModel):
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    model: str
    owner: str | None = None  # the name of the API key that started it
    system_prompt: str | None = None  # None: the model's default
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    turns: list[Turn] = []

    def settle(self, store: JobStore) -> bool:
        """Save the replies of finished jobs; whether any turn changed."""
        return any([turn.settle(store) for turn in self.turns if turn.state == PENDING])

    @property
    def pending(self) -> bool:
        return any(turn.state == PENDING for turn in self.turns)

    def history(self, before: int) -> list[tuple[Message, Message]]:
        """(user, assistant) pairs of the answered turns before index `before`, oldest first."""
        return [(Message("user", t.user), Message("assistant", t.assistant))
                for t in self.turns[:before] if t.state in ANSWERED and t.assistant]


class ConversationStore:
    """Conversations as JSON values with a TTL, edited under a per-conversation lock."""

    def __init__(self, client: redis.Redis, ttl_seconds: int):
        self.redis = client
        self.ttl = ttl_seconds

    def load(self, conversation_id: str) -> Conversation | None:
        raw = self.redis.get(_key(conversation_id))
        return Conversation.model_validate_json(raw) if raw else None

    def save(self, conversation: Conversation) -> None:
        """Write the conversation; it expires `ttl` seconds from now."""
        conversation.updated_at = time.time()
        self.redis.set(_key(conversation.id), conversation.model_dump_json(), ex=self.ttl)

    def delete(self, conversation_id: str) -> bool:
        return bool(self.redis.delete(_key(conversation_id)))

    def expires_in(self, conversation_id: str) -> int:
        return int(self.redis.ttl(_key(conversation_id)))

    def lock(self, conversation_id: str):
        """A Redis lock that serialises edits of one conversation across API processes."""
        return self.redis.lock(f"{_key(conversation_id)}:lock", timeout=LOCK_SECONDS,
                               blocking_timeout=LOCK_WAIT_SECONDS)


def _key(conversation_id: str) -> str:
    return f"dawet:conv:{{{conversation_id}}}"


def fit_history(pairs: list[tuple[Message, Message]], user: Message,
                prompt_ids: Callable[[list[Message]], list[int]],
                budget: int) -> tuple[list[int], int]:
    """The prompt with the newest whole turns that fit in `budget` tokens, and how many it kept.

    Older turns are dropped first; `prompt_ids` adds the system prompt, which always stays.
    When even the new message alone is over budget, that prompt comes back with 0 turns kept.
    """
    def build(start: int) -> list[int]:
        return prompt_ids([m for pair in pairs[start:] for m in pair] + [user])

    low, high = 0, len(pairs)  # find the smallest start that fits; fewer turns, fewer tokens
    best = build(high)
    if len(best) > budget:
        return best, 0
    while low < high:
        middle = (low + high) // 2
        ids = build(middle)
        if len(ids) <= budget:
            high, best = middle, ids
        else:
            low = middle + 1
    return best, len(pairs) - high
