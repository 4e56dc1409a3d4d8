"""Screenshots of the page at / for the README: one mid-run, one finished.

    python3 scripts/screenshots.py [--model dcgan-k10] [--models-dir data/models]
                                   [--out docs/screenshots]

Serves the API on a loopback port (auth off, a throwaway SQLite state), opens the page in
headless Chromium (tests/browser.py), picks the model and one of its held-out example images
(else a random picture), submits with the default options and saves the page while the
reconstruction is sharpening and when the job is done. With no such model in the store, a
tiny synthetic trajectory stands in. PNGs are palette-quantised to stay small.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from app.main import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402
from models_store import ModelStore  # noqa: E402

try:  # a checkout's test helpers and the dev extra (selenium): not part of an install
    from tests.browser import LiveServer, chrome, page_state  # noqa: E402
except ImportError as e:
    sys.exit(f"screenshots: run from a checkout with `pip install -e '.[dev]'` ({e})")

WIDTH, HEIGHT = 1280, 900


def wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"screenshots: timed out waiting for {what}")
        time.sleep(0.1)


def save(driver: Any, path: Path, full: bool = False) -> None:
    """A screenshot of the window (or the whole page), palette-quantised."""
    driver.execute_script("window.scrollTo(0, 0)")
    if full:  # grow the window until the viewport holds the whole page
        height, chrome_h = driver.execute_script(
            "return [document.documentElement.scrollHeight, "
            "window.outerHeight - window.innerHeight]")
        driver.set_window_size(WIDTH, max(HEIGHT, int(height) + int(chrome_h)))
        time.sleep(0.5)
    driver.save_screenshot(str(path))
    im = Image.open(path).convert("RGB")
    im.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    driver.set_window_size(WIDTH, HEIGHT)
    print(f"screenshots: {path} ({path.stat().st_size // 1024} KiB, {im.width}x{im.height})")


def models_root(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    store = ModelStore(args.models_dir)
    if (args.models_dir / args.model / "manifest.json").exists():
        return args.models_dir, args.model
    print(f"screenshots: no {args.model} in {args.models_dir}; using a tiny synthetic model")
    from conftest import make_tiny_trajectory

    make_tiny_trajectory(tmp / "models", "tiny", n_ckpt=24)
    del store
    return tmp / "models", "tiny"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dcgan-k10")
    p.add_argument("--models-dir", type=Path, default=REPO / "data" / "models")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    p.add_argument("--example", type=int, default=7, help="which example image to pick")
    p.add_argument("--timeout", type=float, default=900, help="seconds the job may take")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="surfing-shots-"))
    root, model = models_root(args, tmp)
    settings = Settings(auth="off", database_url=None, redis_url=None, state_dir=tmp,
                        models_dir=root, progress_interval_s=0.25)  # fmt: skip
    with LiveServer(create_app(settings)) as server:
        driver = chrome(WIDTH, HEIGHT)
        try:
            run(driver, server, model, args)
        finally:
            driver.quit()


def run(driver: Any, server: LiveServer, model: str, args: argparse.Namespace) -> None:
    driver.get(server.url + "/")
    wait("the model cards", lambda: driver.find_elements("css selector", f'[data-model="{model}"]'),
         60)
    driver.find_element("css selector", f'[data-model="{model}"]').click()
    wait("the sample grids", lambda: driver.execute_script(
        "return [...document.querySelectorAll('.card img')].every(i => i.complete "
        "&& i.naturalWidth > 0)"), 120)
    examples = wait("the examples", lambda: driver.find_elements("css selector", ".example")
                    or driver.find_elements("css selector", "#examples-box[hidden]"), 60)
    if examples and examples[0].tag_name == "button":
        examples[min(args.example, len(examples) - 1)].click()
    else:
        target = Path(tempfile.mkdtemp()) / "target.png"
        Image.effect_noise((28, 28), 60).save(target)
        driver.find_element("id", "file").send_keys(str(target))
    button = driver.find_element("id", "submit")
    wait("the submit button", button.is_enabled, 30)
    button.click()

    def midway() -> bool:
        s = page_state(driver)
        if s["status"] in ("succeeded", "failed", "canceled"):
            return True
        return bool(s["previews"] and s["stage"] and s["stages"]
                    and s["pass_index"] == 0 and s["stage"] >= 0.4 * s["stages"])

    wait("the job to be half way", midway, args.timeout)
    save(driver, args.out / "page-running.png")
    wait("the result", lambda: page_state(driver)["pixel_error_text"], args.timeout)
    time.sleep(1.0)  # the recent-jobs list refreshes on the status change
    save(driver, args.out / "page-finished.png", full=True)


if __name__ == "__main__":
    main()
