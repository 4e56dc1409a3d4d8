"""Swagger UI at /docs and ReDoc at /redoc from files on disk, not a CDN.

FastAPI's defaults fetch both from jsDelivr (and ReDoc's fonts from Google), so on a machine
without internet the docs were blank pages. The assets come from the `fastapi-offline`
package (MIT; it bundles Swagger UI, Apache-2.0, and ReDoc, MIT, with their license notices
at the top of each file); only its static folder is used, not its FastAPI wrapper.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_STATIC_URL = "/static/docs"


def assets_dir() -> Path:
    """The folder holding swagger-ui-bundle.js, swagger-ui.css and redoc.standalone.js."""
    return Path(str(files("fastapi_offline") / "static"))


def install_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve the assets and the two pages (create the app with docs_url=redoc_url=None)."""
    app.mount(DOCS_STATIC_URL, StaticFiles(directory=assets_dir()), name="docs-static")

    def _urls(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "")
        return f"{root}{app.openapi_url}", f"{root}{DOCS_STATIC_URL}"

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        openapi, static = _urls(request)
        return get_swagger_ui_html(
            openapi_url=openapi,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{static}/swagger-ui-bundle.js",
            swagger_css_url=f"{static}/swagger-ui.css",
            swagger_favicon_url=f"{static}/favicon.png",
        )

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        openapi, static = _urls(request)
        return get_redoc_html(
            openapi_url=openapi,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{static}/redoc.standalone.js",
            redoc_favicon_url=f"{static}/favicon.png",
            with_google_fonts=False,
        )
