"""GET /docs (Swagger UI) and /redoc (ReDoc), their scripts, styles and icon served from the
installed ``fastapi-offline`` package rather than a CDN: the pages work where no request may
leave the host (an air-gapped cluster, where the sidecar lives).

Each asset is a route of its own (not a static mount), so the metrics label it by its path and
the bearer check can leave exactly these paths open (middleware.OPEN_PATHS).
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

router = APIRouter()

ASSETS = {  # file in fastapi_offline/static -> its media type
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
ASSET_PATHS = tuple(f"/docs/{name}" for name in ASSETS)
# The browser itself keeps both pages on this host: ReDoc's sidebar asks a CDN for its logo
# whatever its options say, and an extension or a later version could ask for more. Inline
# scripts and styles are the pages' own (FastAPI's templates); ReDoc's search runs in a blob
# worker.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline';"
    " img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:;"
    " connect-src 'self'; frame-ancestors 'self'"
)


@cache
def asset(name: str) -> bytes:
    return files("fastapi_offline").joinpath("static", name).read_bytes()


def _asset_route(name: str, media_type: str) -> None:
    async def serve_asset() -> Response:
        # The package's version fixes the bytes: caches may keep them for a day.
        headers = {"Cache-Control": "public, max-age=86400"}
        return Response(asset(name), media_type=media_type, headers=headers)

    router.add_api_route(f"/docs/{name}", serve_asset, methods=["GET"], include_in_schema=False)


for _name, _media_type in ASSETS.items():
    _asset_route(_name, _media_type)


@router.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    page = get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}/docs/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs/favicon.png",
        # No badge from the public validator (swagger.io): it would ask that host.
        swagger_ui_parameters={"validatorUrl": None},
    )
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page


@router.get("/redoc", include_in_schema=False)
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    page = get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}/docs/redoc.standalone.js",
        redoc_favicon_url=f"{root}/docs/favicon.png",
        with_google_fonts=False,
    )
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page
