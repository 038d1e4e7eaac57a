"""Flask extensions, created unbound and bound in create_app."""
from flask import Flask
from flask_cors import CORS
from flask_sock import Sock

sock = Sock()

# Headers a browser client may send and read across origins.
CORS_REQUEST_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key"]
CORS_EXPOSED_HEADERS = ["Retry-After", "X-Dawet-Job-Id"]


def enable_cors(app: Flask, origins: list[str]) -> None:
    """Allow these browser origins to call the API (no CORS headers when the list is empty)."""
    if origins:
        CORS(app, origins=origins, allow_headers=CORS_REQUEST_HEADERS,
             expose_headers=CORS_EXPOSED_HEADERS, max_age=600)
