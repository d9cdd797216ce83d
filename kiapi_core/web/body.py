"""Reading a JSON request body into a pydantic model, with errors a client can act on.

Strict JSON only: numbers must be finite (no ``NaN``, ``Infinity`` or ``1e400``, which Python's
json would turn into floats that no later JSON answer can carry), nesting stays within
``MAX_DEPTH`` and strings are valid Unicode. The same rules apply to JSON a plugin parses out
of a string field (``parse_json_text``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from kiapi_core.web.errors import ApiError, invalid, validation_detail

M = TypeVar("M", bound=BaseModel)

# Deep nesting is never a real caption; refusing it keeps recursion out of every later step.
MAX_DEPTH = 64
# Used when a request reaches read_json outside a kiapi app (plugin unit tests).
DEFAULT_MAX_VALUES = 100_000
# A body this small, with this few separators, parses and checks in well under a millisecond:
# a thread hop would cost more than it saves. Any other runs on _PARSER, so the event loop
# keeps serving other requests (64 KiB of ``0,0,...`` is 32,000 values: ~15 ms of work).
OFF_LOOP_BYTES = 64 * 1024
OFF_LOOP_SEPARATORS = 1024
# One thread: concurrent big bodies queue instead of multiplying GIL contention and memory.
_PARSER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiapi-json")
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
# Items between two offers of the GIL to the event loop during the Python-level passes.
_YIELD_EVERY = 2048

JsonPath = tuple[str | int, ...]


class JsonRefused(ValueError):
    """JSON that parses but breaks a rule; ``path`` is where, inside the document."""

    def __init__(self, path: JsonPath, msg: str, type_: str) -> None:
        super().__init__(msg if not path else f"{msg} (at {_shown(path)})")
        self.path = path
        self.msg = msg
        self.type = type_


def body_loc(path: JsonPath) -> list[str | int]:
    """``path`` as the ``loc`` of a 422, shortened: a hostile key must not flood the answer."""
    return ["body", *(p[:64] if isinstance(p, str) else p for p in path[:16])]


def _shown(path: JsonPath) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p[:64]}" for p in path[:16]).lstrip(".")


def _surrogate(text: str) -> int | None:
    """Index of an unpaired UTF-16 surrogate (from a ``\\udXXX`` escape), else None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")  # at C speed, even for a prompt of megabytes
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def check_values(value: Any, limit: int = MAX_DEPTH) -> None:
    """Refuse nesting deeper than ``limit``, non-finite numbers and strings that are not valid
    Unicode (``JsonRefused`` naming the path).

    JSON lets ``"\\ud800"`` through, but such a string cannot be encoded as UTF-8; and Python
    reads ``NaN``, ``Infinity`` and ``1e400`` as floats that strict JSON cannot write back.
    Stored in a job, either would break every later response that shows it (the job, the list).
    """
    # Iterators, not items, on the stack: a list of 100,000 values is walked a step at a
    # time (with offers of the GIL), never copied onto the stack in one C call.
    stack: list[tuple[Iterator[tuple[str | int, Any]], JsonPath]] = [(iter((("", value),)), ())]
    seen = 0
    while stack:
        entries, parent = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        seen += 1
        if not seen % _YIELD_EVERY:
            _yield()
        key, item = entry
        path = (*parent, key) if seen > 1 else ()
        if isinstance(key, str) and (at := _surrogate(key)) is not None:
            raise _not_unicode(parent, "a key", key, at)
        if len(path) >= limit:
            raise JsonRefused((), f"JSON nested deeper than {limit} levels", "json_too_deep")
        if isinstance(item, dict):
            stack.append((iter(item.items()), path))
        elif isinstance(item, list):
            stack.append((enumerate(item), path))
        elif isinstance(item, str):
            if (at := _surrogate(item)) is not None:
                raise _not_unicode(path, "the string", item, at)
        elif isinstance(item, float) and not math.isfinite(item):
            raise JsonRefused(
                path,
                "number is not finite (NaN, Infinity or beyond the float range, e.g. 1e400);"
                " JSON numbers must be finite",
                "finite_number",
            )


def _not_unicode(path: JsonPath, what: str, text: str, at: int) -> JsonRefused:
    return JsonRefused(
        path,
        f"{what} holds an unpaired UTF-16 surrogate ({text[at]!a} at index {at});"
        " it is not valid Unicode",
        "string_unicode",
    )


def _separators(raw: bytes) -> int:
    return raw.count(b",") + raw.count(b"[") + raw.count(b"{")


def _count_values(raw: bytes, limit: int) -> int:
    """How many values ``raw`` holds at most, counted before any object is built.

    Every value but the first follows a comma or opens a container, so separators and
    brackets bound the count from above at C speed. Only when that bound is over ``limit``
    are the ones inside strings subtracted (a Python loop: slow, but it releases the GIL).
    """
    count = _separators(raw) + 1
    if count <= limit or b'"' not in raw:
        return count
    for n, m in enumerate(_STRING.finditer(raw), 1):
        if not n % _YIELD_EVERY:
            _yield()
        start, end = m.span()
        count -= raw.count(b",", start, end) + raw.count(b"[", start, end)
        count -= raw.count(b"{", start, end)
    return count


def _yield() -> None:
    """Offer the GIL: a waiting event loop takes it now, not after the 5 ms switch interval.

    A /health call needs the GIL several times; against a thread that only gives it up when
    forced, each costs a full interval (measured: p99 21 ms during a parse, 6 ms idle).
    """
    time.sleep(0)


_ints = itertools.count(1)


def _int(digits: str) -> int:
    # json.loads is one C call: this hook is where it can offer the GIL, after a long number
    # (~70 µs for 4300 digits) or every so many short ones.
    value = int(digits)
    if len(digits) > 64 or not next(_ints) % _YIELD_EVERY:
        _yield()
    return value


_DECODER = json.JSONDecoder(parse_int=_int)


def _loads(text: str | bytes) -> Any:
    if isinstance(text, bytes):
        text = text.decode(json.detect_encoding(text), "surrogatepass")  # as json.loads does
    return _DECODER.decode(text)


def parse_json_text(text: str) -> Any:
    """JSON found inside a string field, by the body's rules; None when it is not JSON at all.

    For plugins that accept a document as a string (an ideogram4 caption): refuses
    (``JsonRefused``) what the body would refuse, nesting included, before any library
    parses it again with Python's recursive json.
    """
    try:
        data = _loads(text)
    except RecursionError:
        raise JsonRefused(
            (), f"JSON nested deeper than {MAX_DEPTH} levels", "json_too_deep"
        ) from None
    except json.JSONDecodeError:
        return None
    except ValueError as exc:
        # Valid JSON Python will not read, e.g. an int past sys.get_int_max_str_digits().
        raise JsonRefused((), f"malformed JSON: {str(exc).split(';')[0]}", "json_invalid") from None
    check_values(data)
    return data


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


def _max_values(request: Request) -> int:
    state = getattr(request.app.state, "kiapi", None)
    return int(state.settings.max_json_values) if state is not None else DEFAULT_MAX_VALUES


def _parse(raw: bytes, model: type[M], max_values: int) -> M:
    if not raw.strip():
        raise invalid(["body"], "request body is empty; send a JSON object", "missing")
    if (count := _count_values(raw, max_values)) > max_values:
        raise invalid(
            ["body"],
            f"JSON holds about {count} values, more than {max_values} (KIAPI_MAX_JSON_VALUES)",
            "json_too_many_values",
        )
    try:
        data = _loads(raw)
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
    try:
        check_values(data)
    except JsonRefused as exc:
        raise invalid(body_loc(exc.path), exc.msg, exc.type) from None
    if not isinstance(data, dict):
        raise invalid(
            ["body"], f"expected a JSON object, got {type(data).__name__}", "model_attributes_type"
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, validation_detail(exc)) from None


async def read_json(request: Request, model: type[M]) -> M:
    """Parse and validate the body; 415 wrong Content-Type, 422 malformed JSON or invalid fields."""
    _check_content_type(request)
    raw = await request.body()
    max_values = _max_values(request)
    if len(raw) <= OFF_LOOP_BYTES and _separators(raw) <= OFF_LOOP_SEPARATORS:
        return _parse(raw, model, max_values)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_PARSER, _parse_off_loop, raw, model, max_values)


def _parse_off_loop(raw: bytes, model: type[M], max_values: int) -> M:
    try:
        return _parse(raw, model, max_values)
    except ApiError as exc:
        # Without the traceback, whose frames hold the parsed document: it is freed here,
        # not on the event loop when the error is answered.
        raise exc.with_traceback(None) from None
