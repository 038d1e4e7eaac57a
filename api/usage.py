"""GET /v1/usage: requests and tokens per key, model and UTC day (tasks/jobs/usage.py).

A key sees its own usage and its daily budget; an admin key sees every key's, or one key's
with ?key=NAME.
"""
from __future__ import annotations

from datetime import date, timedelta

from flask import Blueprint, request

from api.auth import principal, require_api_key
from api.errors import APIError, invalid
from api.keys import Principal
from api.services import Services, services
from tasks.jobs.usage import today

bp = Blueprint("usage", __name__, url_prefix="/v1")
bp.before_request(require_api_key)
EPOCH = date(1970, 1, 1)


@bp.get("/usage")
def get_usage():
    """Usage rows from ?start_date to ?end_date (YYYY-MM-DD, UTC, inclusive; default today)."""
    svc, who = services(), principal()
    first, last = _day_param("start_date"), _day_param("end_date")
    if first > last:
        raise invalid("start_date is after end_date", param="start_date")
    oldest = today() - svc.settings.usage_retention_days
    first = max(first, oldest)  # older days are gone
    key = _key_filter(who)
    data = [{"date": _date(day), **row.to_dict()}
            for day, rows in svc.usage.days(first, last).items()
            for row in rows if key is None or row.key == key]
    return {"object": "list", "start_date": _date(first), "end_date": _date(last),
            "data": data, "budget": _budget(svc, who)}


def _day_param(name: str) -> int:
    raw = request.args.get(name)
    if raw is None:
        return today()
    try:
        return (date.fromisoformat(raw) - EPOCH).days
    except ValueError:
        raise invalid(f"{name} must be a date as YYYY-MM-DD", param=name) from None


def _key_filter(who: Principal) -> str | None:
    """The one key whose rows are shown; None: every key (admins only)."""
    wanted = request.args.get("key")
    if who.admin:
        return wanted
    if wanted not in (None, who.name):
        raise APIError(403, "only an admin key may read another key's usage", "admin_required",
                       "permission_error", param="key")
    return who.name


def _budget(svc: Services, who: Principal) -> dict[str, int | None]:
    """The key's daily budget and what it has spent and holds (jobs in flight) today."""
    budget = who.budget(svc.settings.daily_token_budget)
    spent, held = svc.usage.spent(who.name)
    return {"daily_tokens": budget or None, "spent_today": spent, "held": held}


def _date(day: int) -> str:
    return (EPOCH + timedelta(days=day)).isoformat()
