"""The web console: three static files shipped inside the package, served at /ui.

The page is public (it holds no data); every call it makes goes to the same API the
console's user could call with curl, with the tokens they type into it. The
Content-Security-Policy lets the page talk to this origin only, so the console provably
never reaches the network beyond the server that served it.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, HTTPException
from fastapi.responses import RedirectResponse, Response

router = APIRouter(tags=["console"], include_in_schema=False)

# An allowlist, not a directory mount: nothing else in the package is reachable from here.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Assets change with the installed version; revalidating is cheap and never serves a stale page.
    "Cache-Control": "no-cache",
}


@router.get("/ui")
async def console_root() -> RedirectResponse:
    # The page links its assets relatively, so it must live at the directory URL.
    return RedirectResponse("/ui/", status_code=308)


@router.get("/ui/")
async def console_index() -> Response:
    return _asset("index.html")


@router.get("/ui/{asset}")
async def console_asset(asset: str) -> Response:
    if asset not in ASSETS:
        raise HTTPException(404, f"no console asset {asset!r}")
    return _asset(asset)


def _asset(name: str) -> Response:
    body = files("server.ui").joinpath(name).read_bytes()
    return Response(body, media_type=ASSETS[name], headers=HEADERS)
