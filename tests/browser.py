"""A real headless Chromium driven by Selenium, and the API served on a loopback port, for
tests/test_browser.py and scripts/screenshots.py.

The browser is Debian's `chromium` with its matching `chromium-driver` (scripts/setup.sh
installs both); Selenium is pointed at them explicitly so it never tries to download a
driver. SURFING_CHROMIUM / SURFING_CHROMEDRIVER override the paths.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) executables, or None when either is missing."""
    browser = os.environ.get("SURFING_CHROMIUM") or next(
        (p for p in map(shutil.which, BROWSERS) if p), None
    )
    driver = os.environ.get("SURFING_CHROMEDRIVER") or shutil.which("chromedriver")
    if not browser or not driver or not os.path.exists(browser) or not os.path.exists(driver):
        return None
    return browser, driver


def chrome(width: int = 1280, height: int = 900) -> Any:
    """A headless Chromium WebDriver with a fixed window size (screenshots are that size)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        raise RuntimeError("chromium and chromedriver not found (apt-get install chromium "
                           "chromium-driver)")
    browser, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars",
                "--force-device-scale-factor=1", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    """uvicorn serving `app` in a background thread on 127.0.0.1 (lifespan included, so the
    embedded job runner runs too)."""

    app: FastAPI
    port: int = field(default_factory=free_port)
    server: Any = None
    thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> LiveServer:
        import uvicorn

        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="live-api", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(30)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def page_state(driver: Any) -> dict[str, Any]:
    """What the page shows about its job right now, read from the DOM."""
    return dict(driver.execute_script("""
        const p = document.getElementById('progress'), d = p ? p.dataset : {};
        const num = (v) => v === undefined ? null : Number(v);
        const pe = document.getElementById('pixel-error');
        return {
          status: (document.getElementById('status') || {}).textContent || null,
          pass: d.pass || null, pass_index: num(d.passIndex), stage: num(d.stage),
          stages: num(d.stages), events: num(d.events) || 0, previews: num(d.previews) || 0,
          transport: d.transport || null,
          stage_text: document.getElementById('stage').textContent,
          pixel_error: pe ? Number(pe.dataset.value) : null,
          pixel_error_text: pe ? pe.textContent : null,
          recon_loaded: (() => {
            const i = document.getElementById('result-recon');
            const shown = !document.getElementById('result').hidden;
            return !!(shown && i && i.complete && i.naturalWidth > 0); })(),
          job_error: document.getElementById('job-error').textContent,
          form_error: document.getElementById('form-error').textContent,
        };
    """))
