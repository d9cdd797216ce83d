"""Starlette path templates compared by structure: can one request path match two of them?

String comparison misses ``/v1/image/{cap}/generate`` answering ``/v1/image/ideogram4/generate``.
Here a template is a list of segments: a literal, a pattern for one segment (a ``{param}``, a
converter, or a segment mixing both), or a *tail* matching any number of further segments
(``{param:path}``, a ``Mount``, a capability's whole prefix). Two templates overlap when some
concrete path matches both; when two patterns meet, they are taken to overlap (no
intersection of regular languages is attempted, so the answer errs towards "overlap").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from starlette.convertors import CONVERTOR_TYPES
from starlette.routing import PARAM_REGEX, BaseRoute, Mount, Route, WebSocketRoute


class Tail:
    """Any number (zero or more) of further segments."""

    def __repr__(self) -> str:
        return "…"


TAIL = Tail()
Segment = str | re.Pattern[str] | Tail


@dataclass(frozen=True)
class Template:
    """A path template, ``shown`` as the route declared it."""

    shown: str
    segments: tuple[Segment, ...]


def _segment(text: str) -> Segment:
    if "{" not in text:
        return text
    regex, end = "", 0
    for match in PARAM_REGEX.finditer(text):
        convertor = (match.group(2) or ":str")[1:]
        if convertor == "path":
            return TAIL  # swallows the slashes after it: anything from here on
        regex += re.escape(text[end : match.start()])
        regex += f"(?:{CONVERTOR_TYPES[convertor].regex})"
        end = match.end()
    return re.compile(regex + re.escape(text[end:]))


def parse(path: str, *, below: bool = False) -> Template:
    """The template of a Starlette path; ``below``: it also covers every path under it."""
    segments: list[Segment] = []
    for text in path.strip("/").split("/") if path.strip("/") else []:
        segment = _segment(text)
        segments.append(segment)
        if segment is TAIL:
            break
    if below and (not segments or segments[-1] is not TAIL):
        segments.append(TAIL)
    return Template(path, tuple(segments))


def _segments_meet(a: Segment, b: Segment) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    if isinstance(a, str) and isinstance(b, re.Pattern):
        return b.fullmatch(a) is not None
    if isinstance(b, str) and isinstance(a, re.Pattern):
        return a.fullmatch(b) is not None
    return True  # two patterns: some segment may well match both


def overlap(a: Template, b: Template) -> bool:
    """True when some concrete request path matches both templates."""
    for x, y in zip(a.segments, b.segments, strict=False):
        if x is TAIL or y is TAIL:
            return True
        if not _segments_meet(x, y):
            return False
    shorter, longer = sorted((a.segments, b.segments), key=len)
    return len(shorter) == len(longer) or longer[len(shorter)] is TAIL


def route_template(route: BaseRoute) -> Template:
    """What request paths ``route`` can answer; a route of unknown kind is taken to answer all."""
    if isinstance(route, Mount):
        return parse(route.path, below=True)
    if isinstance(route, Route | WebSocketRoute):
        return parse(route.path)
    return Template(repr(route), (TAIL,))


def methods_of(route: BaseRoute) -> str:
    """The methods shown in messages: ``GET, POST``; ``*`` for a Mount or unknown route."""
    if isinstance(route, Route):
        shown = sorted(
            m for m in (route.methods or {"GET"}) if m != "HEAD" or route.methods == {"HEAD"}
        )
        return ", ".join(shown)
    if isinstance(route, WebSocketRoute):
        return "WEBSOCKET"
    return "*"


def openapi_path(path: str) -> str:
    """The OpenAPI spelling of a Starlette path: ``{name:conv}`` becomes ``{name}``."""
    return PARAM_REGEX.sub(lambda m: "{" + m.group(1) + "}", path)
