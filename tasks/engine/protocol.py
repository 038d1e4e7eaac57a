"""The typed messages across the engine process's pipe (pickled, over one duplex socket).

worker → engine: Start first; then Submit, Stop, StatsRequest and Close.
engine → worker: Ready or Failed once at start; then Steps (one iteration's steps and ends in
one message, so a decode step of N rows is one message, not N) and Stats.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from model_store.registry import ModelSpec
from tasks.engine.factory import EngineInfo, EngineOptions
from tasks.engine.interface import EngineStats, StepLogprobs
from tasks.jobs.contract import FinishReason, SamplingParams


@dataclass(frozen=True, slots=True)
class Start:
    """Load this model and build this engine."""

    spec: ModelSpec
    options: EngineOptions


@dataclass(frozen=True, slots=True)
class Submit:
    """Run a request; its steps come back tagged with `rid`."""

    rid: int
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class Stop:
    """Drop the request at its next step (a cancel, or its sink asked to stop)."""

    rid: int


@dataclass(frozen=True, slots=True)
class StatsRequest:
    """Answer with Stats."""


@dataclass(frozen=True, slots=True)
class Close:
    """Stop the engine and exit."""


@dataclass(frozen=True, slots=True)
class Ready:
    info: EngineInfo


@dataclass(frozen=True, slots=True)
class Failed:
    """The engine could not start, and why."""

    reason: str


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a request: a token and/or its finish reason."""

    rid: int
    token_id: int | None
    finish: FinishReason | None
    logprobs: StepLogprobs | None = None


@dataclass(frozen=True, slots=True)
class End:
    """The request ended: nothing more comes for it. `error` if it failed."""

    rid: int
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class Steps:
    """Steps and ends, in order."""

    items: list[Step | End] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Stats:
    stats: EngineStats


ToEngine = Start | Submit | Stop | StatsRequest | Close
FromEngine = Ready | Failed | Steps | Stats
