"""The browser side of the service: the page at `/` (app.api.routes.ui serves its HTML) and
the offline /docs and /redoc.

Everything a browser loads comes from this package or an installed one, never a CDN: the
README promises that nothing is downloaded at run time, and a machine without internet must
still show the page and the docs.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from app.web.docs import install_docs

WEB_DIR = Path(__file__).parent
STATIC_DIR = WEB_DIR / "static"
TEMPLATES_DIR = WEB_DIR / "templates"
STATIC_URL = "/static"


def install(app: FastAPI) -> None:
    """Mount the page's assets at /static and the offline API docs at /docs and /redoc."""
    install_docs(app)  # first: its /static/docs mount must match before /static does
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static")


__all__ = ["STATIC_DIR", "STATIC_URL", "TEMPLATES_DIR", "install"]
