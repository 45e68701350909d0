"""A screenshot of the service's page after asking a question in four modes (the README's picture).

    python scripts/screenshot_page.py --url http://127.0.0.1:8000 --key KEY \
        --question "What is George Rankin's occupation?" --out docs/page.png

Drives Debian's chromium through Playwright (never a downloaded browser), as the page's test does.
"""

from __future__ import annotations

import argparse
import shutil

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", default="")
    parser.add_argument("--question", required=True)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--out", default="docs/page.png")
    args = parser.parse_args()

    from playwright.sync_api import expect, sync_playwright

    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        raise SystemExit("chromium is not installed (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=FLAGS)
        page = browser.new_page(viewport={"width": 1300, "height": 900}, device_scale_factor=1)
        page.goto(args.url + "/")
        expect(page.locator("#health")).to_contain_text("passages")
        if args.key:
            page.fill("#api-key", args.key)
            page.dispatch_event("#api-key", "change")
        page.fill("#question", args.question)
        page.fill("#top-k", str(args.top_k))
        page.click("#ask")
        expect(page.locator('.result[data-done="true"]')).to_have_count(4, timeout=600_000)
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
