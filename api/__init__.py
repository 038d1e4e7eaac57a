"""The Dawet HTTP and WebSocket API (Flask). Imports no torch or transformers."""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from api.errors import register_error_handlers
from api.extensions import enable_cors, sock
from api.services import Services
from dawet.settings import Settings, get_settings


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the app: settings from the environment, then `config` overrides (for tests)."""
    settings = Settings(**{**get_settings().model_dump(), **(config or {})})
    logging.basicConfig(level=settings.log_level)
    app = Flask(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
        SOCK_SERVER_OPTIONS={"ping_interval": 25, "max_message_size": 64 * 1024},
    )
    app.extensions["dawet"] = Services(settings)
    sock.init_app(app)
    enable_cors(app, settings.cors_origin_list())
    register_error_handlers(app)
    from api import chat, docs, health, jobs, metrics, openai, responses, tokenize, usage
    from api import adapters, batches, files, job_socket

    app.register_blueprint(docs.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(job_socket.bp)
    app.register_blueprint(openai.bp)
    app.register_blueprint(responses.bp)
    app.register_blueprint(chat.bp)
    app.register_blueprint(usage.bp)
    app.register_blueprint(tokenize.bp)
    app.register_blueprint(files.bp)
    app.register_blueprint(batches.bp)
    app.register_blueprint(adapters.bp)
    metrics.init_app(app)
    return app
