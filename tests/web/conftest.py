"""Fixtures for the browser tests: headless Chromium (Debian's package) driven by Playwright."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, Page

from tests.web.harness import PageErrors, launch_chromium


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium; the test fails (never skips) when it is not installed."""
    async with launch_chromium() as browser:
        yield browser


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 720})
    page = await context.new_page()
    try:
        yield page
    finally:
        await context.close()


@pytest.fixture
def page_errors(page: Page) -> PageErrors:
    errors = PageErrors()
    errors.attach(page)
    return errors
