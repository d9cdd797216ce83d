"""``GET /playground``: a page to try the capabilities from a browser, and its sibling pages
(``/playground/models``, ``/playground/jobs``, ``/playground/files``).

Plain HTML, JS and CSS files next to this module, served as they are (no CDN, no build step;
the sibling pages are their ``<main>`` put in the header they share, ``page.html``).
The files hold no data: everything the page shows comes from the API, fetched by the page
with the bearer token typed into its key field. With KIAPI_API_KEY set, these paths are
protected like every other route, but also accept HTTP Basic with the key as the password,
so a browser can open the page (it asks for the credentials itself); see docs/playground.md.
"""

from __future__ import annotations

import functools
import hashlib
import string
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

HERE = Path(__file__).resolve().parent
PAGES = ("models", "jobs", "files")
HTML = "text/html; charset=utf-8"
ASSETS = {
    "/playground": ("index.html", HTML),
    "/playground/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    "/playground/playground.css": ("playground.css", "text/css; charset=utf-8"),
    # The Models, Jobs and Files pages: each its <main> (``<page>.main.html``) in the header,
    # nav and theme they share (``page.html``; docs/playground.md).
    **{f"/playground/{page}": (f"{page}.main.html", HTML) for page in PAGES},
    **{
        f"/playground/{page}.js": (f"{page}.js", "text/javascript; charset=utf-8") for page in PAGES
    },
    "/playground/common.js": ("common.js", "text/javascript; charset=utf-8"),
    "/playground/common.css": ("common.css", "text/css; charset=utf-8"),
    # Modules playground.js imports: the schema-built form and the layout canvas.
    "/playground/schema_form.js": ("schema_form.js", "text/javascript; charset=utf-8"),
    "/playground/canvas.js": ("canvas.js", "text/javascript; charset=utf-8"),
}
PATHS = frozenset(ASSETS)
AUTH_NOTE = (
    "Besides the bearer token, this static file also accepts HTTP Basic with any user name and "
    "the API key as the password, so a browser can open the page (it asks for them itself)."
)
# Only our own files may run or style the page; images come back as blob: URLs because they
# are fetched with the Authorization header, which an <img src> cannot send.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on each load, so an upgraded server never runs with a stale script.
    "Cache-Control": "no-cache",
}


def _asset(filename: str, media_type: str) -> Any:
    async def serve(request: Request) -> Response:
        return FileResponse(HERE / filename, media_type=media_type, headers=HEADERS)

    return serve


@functools.cache
def page_html(page: str) -> tuple[bytes, str]:
    """A sibling page (``models``, ``jobs``, ``files``) as served, and its ETag."""
    shell = string.Template((HERE / "page.html").read_text(encoding="utf-8"))
    main = (HERE / f"{page}.main.html").read_text(encoding="utf-8")
    body = shell.substitute(page=page, main=main).encode()
    return body, f'"{hashlib.sha256(body).hexdigest()[:32]}"'


def _page(page: str) -> Any:
    async def serve(request: Request) -> Response:
        body, etag = page_html(page)
        headers = {**HEADERS, "ETag": etag}
        # As FileResponse answers the other files: a reload under no-cache revalidates.
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=HTML, headers=headers)

    return serve


routes = [
    Route(
        path,
        _page(filename.removesuffix(".main.html"))
        if filename.endswith(".main.html")
        else _asset(filename, media_type),
        methods=["GET"],
    )
    for path, (filename, media_type) in ASSETS.items()
]


SUMMARIES = {
    "index.html": "The playground page",
    "models.main.html": "The Models page: every plugin's models, activation, warm and unload",
    "jobs.main.html": "The Jobs page: a live list with progress, previews, cancel and retry",
    "files.main.html": "The Files page: list, download and delete stored files",
}


def fragment() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for path, (filename, media_type) in ASSETS.items():
        paths[path] = {
            "get": {
                "summary": SUMMARIES.get(filename, f"Playground {filename}"),
                "tags": ["playground"],
                "responses": {
                    "200": {
                        "description": "A static file of the playground (no data in it).",
                        "content": {media_type.split(";")[0]: {"schema": {"type": "string"}}},
                    }
                },
            }
        }
    return {
        "paths": paths,
        "tags": [{"name": "playground", "description": "A browser page to try the capabilities."}],
    }
