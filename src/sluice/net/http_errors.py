"""Errors of our HTTP servers (the engine's and the agent gateway): every refused request gets a 4xx (or 503) JSON
body naming the offending field.

The body follows OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, which the openai client
parses and which carries SGLang's ``{"error": {"message"}}`` as a subset.
"""

from __future__ import annotations

import json
import re
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)

# "field: message", how a check across several fields (a model validator, whose error has no location of its own)
# names the field it refuses.
_NAMED_MESSAGE = re.compile(r"(?P<field>[A-Za-z_][A-Za-z0-9_]*): (?P<message>.+)", re.DOTALL)

# Parts of a pydantic error location that name a union member, not a field of the request (so do model class
# names, which start with a capital letter).
_TYPE_WORDS = {"str", "int", "float", "bool", "list", "dict", "none", "body"}


class RequestError(ValueError):
    """A request the server refuses; ``field`` is the dotted path of the offending value ("" for the whole body)."""

    def __init__(self, field: str, message: str, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.status = status
        self.headers = headers  # e.g. WWW-Authenticate with a 401, Retry-After with a 503


def error_response(status: int, message: str, field: str = "", headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": field or None, "code": status}},
                        status_code=status, headers=headers)


def field_path(location: tuple) -> str:
    """``("body", "sampling_params", "list[str]", 0)`` -> ``"sampling_params[0]"``."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in _TYPE_WORDS and not part[0].isupper():
            path += f".{part}" if path else part
    return path


def describe_validation(errors: list[dict]) -> tuple[str, str]:
    """(field, message) for the first problem; a bad-JSON body is reported as such."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "", f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
    field = field_path(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        message = "required field is missing"
    elif first.get("type") == "extra_forbidden":
        message = "unknown field"
    elif first.get("type") == "model_attributes_type":
        message = "expected a JSON object"
    message = message.removeprefix("Value error, ")
    named = _NAMED_MESSAGE.match(message)
    if named and first.get("type") == "value_error":  # a check across fields names its field first
        field = f"{field}.{named['field']}" if field else named["field"]
        message = named["message"]
    return field, message


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def _refused(_: Request, error: RequestError) -> JSONResponse:
        return error_response(error.status, str(error), error.field, error.headers)

    @app.exception_handler(Exception)
    async def _failed(_: Request, error: Exception) -> JSONResponse:
        """An engine failure (the request was valid): a JSON 500, and the server keeps serving."""
        return error_response(500, f"internal error: {type(error).__name__}: {error}")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        field, message = describe_validation(list(error.errors()))
        return error_response(400, f"{field}: {message}" if field else message, field)


async def read_body(request: Request, model: type[ModelT], optional: bool = False) -> ModelT:
    """Parse the body as JSON whatever its content type (curl -d sends form encoding) and validate it.

    ``optional``: an empty body means the model's defaults (control calls sent without a body).
    """
    raw = await request.body()
    if optional and not raw.strip():
        return model()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError("", f"the body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise RequestError("", f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        field, message = describe_validation(error.errors())
        raise RequestError(field, message) from None
