"""Take the README's screenshot of the web view: ``docs/webview.png``.

    nanoshard demo --keep &        # prints "web view: http://127.0.0.1:8000"
    python scripts/webview_screenshot.py http://127.0.0.1:8000 docs/webview.png

Debian's chromium (``apt-get install -y chromium``), driven by Playwright's Python package
(``pip install playwright``; it downloads no browser here: ``executable_path``).
"""

from __future__ import annotations

import shutil
import sys

from playwright.sync_api import sync_playwright


def main(url: str, out: str) -> None:
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        sys.exit("no chromium on PATH: apt-get install -y chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(url)
        page.wait_for_selector("[data-node]", timeout=30_000)
        page.fill("#max_tokens", "80")
        page.click("#go")
        page.wait_for_function("!document.getElementById('go').disabled", timeout=60_000)
        page.hover("#output span.tok >> nth=12")
        page.wait_for_timeout(1500)  # one more status event: the nodes' live numbers
        page.screenshot(path=out, full_page=True)
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "docs/webview.png")
