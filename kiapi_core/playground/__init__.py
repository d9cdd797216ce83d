"""``GET /playground``: a page to try the capabilities from a browser, and its sibling pages
(``/playground/models``, ``/playground/jobs``, ``/playground/files``).

Plain HTML, JS and CSS files next to this module, served as they are (no CDN, no build step).
The files hold no data: everything the page shows comes from the API, fetched by the page
with the bearer token typed into its key field. With KIAPI_API_KEY set, these paths are
protected like every other route, but also accept HTTP Basic with the key as the password,
so a browser can open the page (it asks for the credentials itself); see docs/playground.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

HERE = Path(__file__).resolve().parent
PAGES = ("models", "jobs", "files")
ASSETS = {
    "/playground": ("index.html", "text/html; charset=utf-8"),
    "/playground/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    "/playground/playground.css": ("playground.css", "text/css; charset=utf-8"),
    # The Models, Jobs and Files pages, with the nav and theme they share (docs/playground.md).
    **{f"/playground/{page}": (f"{page}.html", "text/html; charset=utf-8") for page in PAGES},
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


routes = [
    Route(path, _asset(filename, media_type), methods=["GET"])
    for path, (filename, media_type) in ASSETS.items()
]


SUMMARIES = {
    "index.html": "The playground page",
    "models.html": "The Models page: every plugin's models, activation, warm and unload",
    "jobs.html": "The Jobs page: a live list with progress, previews, cancel and retry",
    "files.html": "The Files page: list, download and delete stored files",
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
