"""Headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, for report pages."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",  # containers often have a small /dev/shm
]  # fmt: skip
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} missing: apt-get install -y chromium"
)


class PageCheck(NamedTuple):
    image_widths: list[int]  # naturalWidth of every <img>, in page order
    console_errors: list[str]
    requests: list[str]  # every URL the page asked for


def open_chromium(tmp_path_factory):
    """Open a page in headless Chromium, screenshot it, and say what it loaded and logged."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"),
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
        )  # fmt: skip

        def check(index: Path, screenshot: Path) -> PageCheck:
            page = browser.new_page()
            errors: list[str] = []
            requests: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(index.as_uri(), wait_until="load")
            widths = page.eval_on_selector_all(
                "img", "images => images.map(i => i.complete ? i.naturalWidth : 0)"
            )
            page.screenshot(path=screenshot, full_page=True)
            page.close()
            return PageCheck(widths, errors, requests)

        yield check
        browser.close()


def assert_page_is_whole(check: PageCheck, images: int) -> None:
    assert len(check.image_widths) == images
    assert all(width > 0 for width in check.image_widths), check.image_widths
    assert check.console_errors == []
    # Self-contained: the page itself, then only data URIs.
    assert all(url.startswith(("file:", "data:")) for url in check.requests), check.requests
