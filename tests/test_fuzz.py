"""Schema-driven fuzzing: schemathesis generates well-formed and malformed requests from
/openapi.json, an in-process app answers them, and none gets a 5xx.

The app runs on the session stack's Redis with a token rate limit of 1, so a request that
passes validation stops at a 429 instead of queueing a generation (other modules cover
admitted jobs)."""
from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from api import create_app
from conftest import DEMO_MODEL, MODELS_FILE

MIN_REQUESTS = 1000
EXAMPLES = {GenerationMode.NEGATIVE: 350, GenerationMode.POSITIVE: 40}  # per operation


@pytest.fixture(scope="module")
def fuzz_app(stack):
    return create_app({"models_file": MODELS_FILE, "redis_url": stack.settings.redis_url,
                       "default_model": DEMO_MODEL, "rate_limit_tokens_per_minute": 1})


def _fuzz(operation, mode: GenerationMode, statuses: Counter) -> None:
    """Send EXAMPLES[mode] generated requests to one operation; fail on any 5xx."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(case):
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str) \
                and sum(statuses.values()) % 2:
            case.body["model"] = DEMO_MODEL  # half the bodies name a served model
        response = case.call_and_validate(checks=[not_a_server_error])
        statuses[response.status_code] += 1

    try:
        run()
    except Unsatisfiable:  # nothing to break (no parameters): no negative case exists
        assert mode is GenerationMode.NEGATIVE and not operation.body


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda mode: mode.value)
def test_no_generated_request_gets_a_server_error(fuzz_app, mode):
    schema = schemathesis.openapi.from_wsgi("/openapi.json", fuzz_app)
    statuses: Counter = Counter()
    for result in schema.get_all_operations():
        _fuzz(result.ok(), mode, statuses)
    assert not [status for status in statuses if status >= 500], statuses
    if mode is GenerationMode.NEGATIVE:
        assert sum(statuses.values()) >= MIN_REQUESTS, statuses
        assert statuses[400] > MIN_REQUESTS // 2, statuses
    print(f"{mode.value}: {sum(statuses.values())} requests, statuses {dict(statuses)}")
