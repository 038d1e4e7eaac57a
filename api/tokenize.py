"""POST /tokenize and POST /detokenize, in vLLM's shapes: a model's tokens for a prompt or chat
messages (exactly what a generation would be given), and text for token ids."""
from __future__ import annotations

from flask import Blueprint, request

from api.auth import principal, require_api_key
from api.errors import invalid
from api.offload import off_loop
from api.schemas import DetokenizeRequest, TokenizeRequest
from api.services import services

bp = Blueprint("tokenize", __name__)
bp.before_request(require_api_key)


@bp.post("/tokenize")
def tokenize():
    """The prompt's token ids; chat messages go through the model's chat template and system
    prompt first, as POST /v1/chat/completions renders them."""
    body = TokenizeRequest.model_validate_json(request.get_data())
    svc = services()
    spec = svc.usable_model(principal(), body.model)
    prompt = body.prompt_input()
    if prompt.text is not None and not body.add_special_tokens:
        tokens = off_loop(svc.tokenizer(spec).encode, prompt.text)
    else:
        tokens = svc.prompt_ids(spec, prompt)
    return {"count": len(tokens), "max_model_len": spec.context_length, "tokens": tokens,
            "token_strs": None}


@bp.post("/detokenize")
def detokenize():
    """The text of token ids (special tokens left out, as in generated text)."""
    body = DetokenizeRequest.model_validate_json(request.get_data())
    svc = services()
    spec = svc.usable_model(principal(), body.model)
    tokenizer = svc.tokenizer(spec)
    if any(token >= tokenizer.vocab_size for token in body.tokens):
        raise invalid(f"a token id is outside model {spec.name}'s vocabulary of "
                      f"{tokenizer.vocab_size}", param="tokens", code="invalid_token_ids")
    return {"prompt": off_loop(tokenizer.decode, body.tokens)}
