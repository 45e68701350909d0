"""The page, in a real headless browser: Debian's chromium driven by Playwright (`make test` installs it;
Playwright is pointed at it and never downloads a browser of its own)."""

from __future__ import annotations

import shutil

import pytest

BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install -y chromium)")
    return path


def test_page_asks_a_question_and_shows_the_answers(demo_server):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=BROWSER_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.goto(demo_server.url + "/")
            expect(page.locator("#health")).to_contain_text("passages")

            # without the key the service refuses, and the page says so
            page.fill("#question", "What is George Rankin's occupation?")
            page.click("#ask")
            expect(page.locator("#ask-error")).to_contain_text("API key", timeout=60_000)

            page.fill("#api-key", demo_server.key)
            page.dispatch_event("#api-key", "change")
            page.click("#ask")
            done = page.locator('.result[data-done="true"]')
            expect(done).to_have_count(4, timeout=240_000)  # closed, rag, prag, combine side by side
            for mode in ("closed", "rag", "prag", "combine"):
                card = page.locator(f'.result[data-mode="{mode}"]')
                assert card.locator(".answer").inner_text().strip(), mode
                expect(card.locator(".timings")).to_contain_text("generation")
            rag = page.locator('.result[data-mode="rag"] .passages li')
            expect(rag.first).to_contain_text("George Rankin")
            expect(page.locator('.result[data-mode="prag"] .passages .lora')).to_have_count(3)
            expect(page.locator('.result[data-mode="closed"] .passages li')).to_have_count(0)

            # add a document, and follow it until it is parameterized
            page.fill("#doc-title", "Page test")
            page.fill("#doc-text", "The page test document says that the glorp of Wendover is violet.")
            page.click("#add")
            expect(page.locator("#add-status")).to_contain_text("doc-", timeout=60_000)
            expect(page.locator("#add-status")).to_contain_text("ready", timeout=240_000)
        finally:
            browser.close()
