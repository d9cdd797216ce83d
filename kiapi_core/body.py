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


def _surrogate(text: str) -> int | None:
    """Index of an unpaired UTF-16 surrogate (from a ``\\udXXX`` escape), else None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")  # at C speed, even for a prompt of megabytes
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _check_values(value: Any, limit: int) -> None:
    """Refuse nesting deeper than ``limit`` and strings that are not valid Unicode.

    JSON lets ``"\\ud800"`` through, but such a string cannot be encoded as UTF-8: stored in a
    job it would break every later response that shows it (the job, the job list).
    """
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if len(path) >= limit:
            raise invalid(["body"], f"JSON nested deeper than {limit} levels", "json_too_deep")
        if isinstance(item, dict):
            for key, sub in item.items():
                if (at := _surrogate(key)) is not None:
                    raise _not_unicode([*path], "a key", key, at)
                stack.append((sub, (*path, key)))
        elif isinstance(item, list):
            stack.extend((sub, (*path, i)) for i, sub in enumerate(item))
        elif isinstance(item, str) and (at := _surrogate(item)) is not None:
            raise _not_unicode([*path], "the string", item, at)


def _not_unicode(path: list[str | int], what: str, text: str, at: int) -> ApiError:
    return invalid(
        ["body", *(p[:64] if isinstance(p, str) else p for p in path[:16])],
        f"{what} holds an unpaired UTF-16 surrogate ({text[at]!a} at index {at});"
        " it is not valid Unicode",
        "string_unicode",
    )


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
    except ValueError as exc:
        # int() refuses numbers longer than sys.get_int_max_str_digits() (4300 by default).
        reason = str(exc).split(";")[0]
        raise invalid(["body"], f"malformed JSON: {reason}", "json_invalid") from None
    _check_values(data, MAX_DEPTH)
    if not isinstance(data, dict):
        raise invalid(
            ["body"], f"expected a JSON object, got {type(data).__name__}", "model_attributes_type"
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, validation_detail(exc)) from None
