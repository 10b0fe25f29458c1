"""The console in a real browser: Debian's chromium, driven by Playwright.

Against a platform the test starts (the real Claude Code CLI, a scripted model): an
operator signs in, watches a conversation appear and its timeline fill in while it runs,
kills the running task, answers an escalation and sees the conductor's next turn get the
``[OPERATOR]`` block, and signs out. A hostile email renders inert.

Screenshots of the main pages go to ``$PODIUM_SCREENSHOTS`` when it is set (``make
screenshots`` writes those of docs/), else to the test's own folder.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Dialog, Page, async_playwright, expect

from podium.cli.natsserver import NatsServer
from podium.testing.anthropic import FakeAnthropic
from podium.testing.platform import ALL, OPERATOR_TOKEN, Platform
from tests.test_console import REFUND_REQUEST, SLOW_REQUEST, respond, scripted_platform

pytestmark = pytest.mark.e2e

CHROMIUM = Path(os.environ.get("PODIUM_CHROMIUM", "/usr/bin/chromium"))
#: As root, on a machine without a display or a network beyond the registries.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 60_000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM}: `make setup` installs Debian's chromium (as root)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def model() -> AsyncIterator[FakeAnthropic]:
    """The scripted model of tests/test_console.py."""
    async with FakeAnthropic(respond) as api:
        yield api


def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("PODIUM_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def new_page(browser: Browser) -> Page:
    page = await browser.new_page(viewport={"width": 1360, "height": 860})

    async def accept(dialog: Dialog) -> None:
        await dialog.accept()  # "Kill task …?": yes

    page.on("dialog", accept)
    return page


async def sign_in(page: Page, url: str) -> None:
    await page.goto(url + "/")
    await expect(page).to_have_url(url + "/login?next=/")
    await page.fill("#token", OPERATOR_TOKEN)
    await page.click("#sign-in")
    await expect(page).to_have_url(url + "/")
    await expect(page.locator("header .who")).to_contain_text("alice (operator)")


async def test_an_operator_follows_kills_answers_and_signs_out(
    nats_server: NatsServer,
    model: FakeAnthropic,
    browser: Browser,
    tmp_path: Path,
    claude_bin: str,
) -> None:
    folder = shots(tmp_path)
    platform = scripted_platform(nats_server, tmp_path, model, claude_bin, secure=False)
    try:
        await platform.ready()
        url = platform.console_url
        page = await new_page(browser)
        await sign_in(page, url)

        # A conversation appears while the page is open (live, no reload).
        slow = (await platform.send(SLOW_REQUEST))["conversation_id"]
        row = page.locator(f'tr[data-conversation="{slow}"]')
        await expect(row).to_be_visible(timeout=WAIT_MS)
        await expect(row).to_contain_text("1 / 1", timeout=WAIT_MS)  # one open task
        await page.screenshot(path=folder / "console-conversations.png")

        # Its timeline fills in: the message, the conductor's turn, the worker starting.
        await row.locator("a").click()
        await expect(page).to_have_url(f"{url}/conversations/{slow}")
        timeline = page.locator("#timeline")
        await expect(timeline.locator("li.entry.inbound")).to_contain_text("api from test")
        await expect(timeline.locator("li.entry.turn")).to_contain_text(
            "conductor turn (api)", timeout=WAIT_MS
        )
        await expect(timeline.locator("li.entry.turn")).to_contain_text("SPAWN_WORKER")
        await expect(timeline.locator("li.entry.progress")).to_have_count(1, timeout=WAIT_MS)
        await page.screenshot(path=folder / "console-conversation.png", full_page=True)

        # Kill the running task from the tasks page and see it cancelled.
        await page.click("nav >> text=Tasks")
        running = page.locator("tr.task-running")
        await expect(running).to_have_count(1, timeout=WAIT_MS)
        task = await running.get_attribute("data-task")
        await page.screenshot(path=folder / "console-tasks.png")
        await running.locator("button.kill").click()
        await expect(page.locator(f'tr.task-cancelled[data-task="{task}"]')).to_be_visible(
            timeout=WAIT_MS
        )

        # Answer an escalation; the conductor's next turn gets the [OPERATOR] block.
        refund = (await platform.send(REFUND_REQUEST))["conversation_id"]
        await page.click("nav >> text=Escalations")
        waiting = page.locator(f'article.escalated[data-conversation="{refund}"]')
        await expect(waiting).to_be_visible(timeout=WAIT_MS)
        await expect(waiting).to_contain_text("a refund needs a human's approval")
        await page.screenshot(path=folder / "console-escalations.png")
        await waiting.locator("textarea").fill("Approved: refund order 42.")
        await waiting.locator("button").click()
        await expect(page).to_have_url(f"{url}/conversations/{refund}")
        turn = page.locator("li.entry.turn", has_text="conductor turn (operator)")
        await expect(turn).to_be_visible(timeout=WAIT_MS)
        await turn.locator("summary", has_text="given").click()
        await expect(turn.locator("pre.body").first).to_contain_text("[OPERATOR]")
        await expect(turn.locator("pre.body").first).to_contain_text("Approved: refund order 42.")
        await expect(page.locator("#state")).to_have_text("open")
        await expect(page.locator("li.entry.operator")).to_contain_text("alice answered")
        await expect(page.locator("li.entry.outbound")).to_contain_text(
            "Your refund for order 42 is approved.", timeout=WAIT_MS
        )

        await page.click("nav >> text=Spend")
        await expect(page.locator("h1")).to_contain_text("Spend")
        await page.screenshot(path=folder / "console-spend.png")

        # Sign out: the pages ask to sign in again.
        await page.click("#logout")
        await expect(page).to_have_url(url + "/login")
        await page.goto(url + "/tasks")
        await expect(page).to_have_url(url + "/login?next=/tasks")
    finally:
        platform.stop()


HOSTILE_SUBJECT = "Invoice \u202egnp.exe"
HOSTILE_BODY = (
    "<script>window.__pwned = 'script'</script>\n"
    '<img src="x" onerror="window.__pwned = \'img\'">\n'
    "<a href=\"javascript:window.__pwned='link'\">click me</a>\n"
    "<style>body { display: none }</style>\n"
    "reversed: \u202etxt.exe\n" + "A" * 20_000 + "\n"
)


async def test_a_hostile_email_renders_inert(
    nats_server: NatsServer, browser: Browser, tmp_path: Path
) -> None:
    platform = Platform(nats_server.url, tmp_path, services=ALL).start()
    try:
        await platform.ready()
        sent = await platform.email(
            "Mallory <mallory@example.com>",
            HOSTILE_SUBJECT,
            HOSTILE_BODY,
            message_id="<hostile-1@example.com>",
        )
        conversation = sent["conversation_id"]
        page = await new_page(browser)
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: dialogs.append(dialog.message))
        await sign_in(page, platform.console_url)
        await expect(page.locator(f'tr[data-conversation="{conversation}"]')).to_be_visible(
            timeout=WAIT_MS
        )
        await page.goto(f"{platform.console_url}/conversations/{conversation}")
        message = page.locator("li.entry.inbound pre.body").first
        await expect(message).to_contain_text("<script>window.__pwned = 'script'</script>")
        # Shown as text: no script ran, no element was made from it, nothing is hidden.
        assert await page.evaluate("window.__pwned") is None
        assert await page.locator("main img, main script, main style").count() == 0
        assert await page.locator("main a[href^='javascript']").count() == 0
        assert await page.locator("body").is_visible()
        assert dialogs == []
        # The right-to-left override is spelled out, not obeyed.
        body = await message.inner_text()
        assert "⟦U+202E⟧txt.exe" in body and "\u202e" not in body
        assert "⟦U+202E⟧gnp.exe" in await page.locator("h1").inner_text()
        # The 20,000-character line wraps instead of widening the page.
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 1360
    finally:
        platform.stop()
