"""Reading a JSON request body into a pydantic model, with errors a client can act on."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from kiapi_core.errors import ApiError, invalid, validation_detail

M = TypeVar("M", bound=BaseModel)

# Deep nesting is never a real caption; refusing it keeps recursion out of every later step.
MAX_DEPTH = 64


def _too_deep(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return False


def _check_content_type(request: Request) -> None:
    ctype = request.headers.get("content-type")
    if ctype is None:
        return
    media = ctype.split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return
    raise ApiError(
        415,
        f"Content-Type {media or ctype!r} is not supported here; send a JSON body with "
        "'Content-Type: application/json'",
    )


async def read_json(request: Request, model: type[M]) -> M:
    """Parse and validate the body; 415 wrong Content-Type, 422 malformed JSON or invalid fields."""
    _check_content_type(request)
    raw = await request.body()
    if not raw.strip():
        raise invalid(["body"], "request body is empty; send a JSON object", "missing")
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise invalid(
            ["body"], f"body is not valid UTF-8 ({exc.reason} at byte {exc.start})", "json_invalid"
        ) from None
    except json.JSONDecodeError as exc:
        raise invalid(
            ["body"],
            f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            "json_invalid",
        ) from None
    except RecursionError:
        raise invalid(
            ["body"], f"JSON nested deeper than {MAX_DEPTH} levels", "json_too_deep"
        ) from None
    if _too_deep(data, MAX_DEPTH):
        raise invalid(["body"], f"JSON nested deeper than {MAX_DEPTH} levels", "json_too_deep")
    if not isinstance(data, dict):
        raise invalid(
            ["body"], f"expected a JSON object, got {type(data).__name__}", "model_attributes_type"
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, validation_detail(exc)) from None
