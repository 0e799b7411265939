"""The page at `GET /`, in headless Chromium driven by Playwright, against the real service and the scripted model."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import unique_marker
from tests.fakes.messages_api import text, tool_use, turn

from .conftest import ROOT, parse_sse, stack
from .test_attempts import FIXED, WRONG, Router, choose, coder_writes
from .test_first_minutes import get_json, service
from .test_local_pulls import pull_href
from .test_environment import FAILING_SETUP, needs_sandbox_setup
from .test_nothing_lost import forge_goes_away
from .test_run import BUGGY, TESTS, fix_script
from .test_runs import read_until
from .test_team import coder, planner, reviewer

CHROMIUM = Path("/usr/bin/chromium")
try:
    from playwright.async_api import Page, async_playwright, expect
except ImportError:  # the skip below says what to install
    async_playwright = None

pytestmark = [
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.skipif(async_playwright is None, reason="playwright is not installed: pip install -e '.[dev]'"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed: apt-get install chromium"),
]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
HOSTILE = '<img id="injected" src="x" onerror="document.title=\'owned\'"> Let me look at the code.'
SLEEP_MARK = unique_marker()
TOKEN = "tb-web-test-token-" + "x" * 24


def hostile_fix_script() -> list:
    """fix_script, whose first words are HTML a hostile repository could make the model write."""
    first = turn(text(HOSTILE), tool_use("sandbox_read_file", {"path": "calc.py"}),
                 tool_use("sandbox_exec", {"command": TESTS}))
    return [first, *fix_script()[1:]]


@asynccontextmanager
async def browser_page(url: str, console: list[str] | None = None) -> AsyncIterator[Page]:
    """A fresh headless Chromium page on the service's front page; nothing is fetched from the internet. The
    console's errors, from the first request on, go to `console` when given."""
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, timeout=30_000)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            if console is not None:
                page.on("console", lambda m: console.append(f"{m.text} ({m.location.get('url')})")
                        if m.type == "error" else None)
            await page.goto(url)
            yield page
            assert errors == []
        finally:
            await browser.close()


async def start(page: Page, repo: Path, prompt: str, mode: str = "single", attempts: int = 1) -> str:
    """Fill in the form, start the run and return its id, once the page follows it."""
    await page.fill("#repo", str(repo))
    await page.fill("#prompt", prompt)
    await page.select_option("#mode", mode)
    if attempts > 1:
        await page.fill("#attempts", str(attempts))
    old = await page.evaluate("location.hash")
    await page.click("#go")
    await page.wait_for_function("old => location.hash.length > 1 && location.hash !== old", arg=old)
    return (await page.evaluate("location.hash"))[1:]


async def stored_events(url: str, run_id: str, token: str | None = None) -> list[dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{url}/runs/{run_id}/events") as resp:
            return parse_sse(await resp.text())


async def test_the_page_shows_a_run_live_to_its_pull_request_and_cancels_another(pool, make_repo, tmp_path):
    script = hostile_fix_script() + [turn(tool_use("sandbox_exec", {"command": f"sleep {SLEEP_MARK}"}))]
    async with stack(pool, script) as s, browser_page(s.url) as page:
        repo = make_repo(BUGGY)
        run_id = await start(page, repo, "Fix add(); its test fails.")
        view = page.locator("#view")
        await expect(page.locator("#run-status")).to_have_text("success")
        events = await stored_events(s.url, run_id)
        number = next(e["number"] for e in events if e["type"] == "pull_request")
        await expect(page.locator("#pr a")).to_have_attribute("href", pull_href(events[0]["repo"], number))
        # Every event arrived once, over EventSource, in the agent's part, tool calls with their results.
        await expect(view).to_have_attribute("data-seq", str(events[-1]["seq"]))
        await expect(view).to_have_attribute("data-transport", "eventsource")
        calls = [e for e in events if e["type"] == "tool_call" and e["state"] == "complete"]
        await expect(page.locator(".agent .tool.done")).to_have_count(len(calls))
        exec_card = page.locator('.tool[data-tool="sandbox_exec"]').first
        await exec_card.locator("summary").click()
        await expect(exec_card.locator(".result")).to_contain_text("FAILED")
        await expect(page.locator("#diff .add")).to_have_text("+    return a + b\n")
        await expect(page.locator("#diff .del")).to_have_text("-    return a - b\n")
        await expect(page.locator("#usage")).to_contain_text("cost $")
        # The model's text is shown as text: the hostile markup is visible and inert.
        await expect(page.locator(".say").first).to_contain_text(HOSTILE)
        assert await page.locator("#injected").count() == 0 and await page.title() == "Tiny Backspace"
        await expect(page.locator(f'#runs li[data-id="{run_id}"] .badge')).to_have_text("success")
        await page.screenshot(path=tmp_path / "run.png", full_page=True)

        second = await start(page, repo, "Sleep, then fix add().")
        sleeping = page.locator('.tool[data-tool="sandbox_exec"]')
        await expect(sleeping).to_have_count(1)
        await expect(sleeping.locator(".input")).to_contain_text(SLEEP_MARK)
        # A reload reconnects to the run from the page's address and shows each event once.
        await page.reload()
        await expect(page.locator("#run-id")).to_have_text(second)
        await expect(sleeping.locator(".input")).to_contain_text(SLEEP_MARK)
        await expect(sleeping).to_have_count(1)
        await page.click("#cancel")
        await expect(page.locator("#run-status")).to_have_text("cancelled")
        await expect(page.locator("#cancel")).to_be_disabled()
        await expect(page.locator(f'#runs li[data-id="{second}"] .badge')).to_have_text("cancelled")
        await page.screenshot(path=tmp_path / "cancelled.png", full_page=True)
        assert (await stored_events(s.url, second))[-1]["status"] == "cancelled"


async def test_the_page_works_with_the_bearer_token_over_a_fetch_stream(pool, make_repo, tmp_path):
    async with stack(pool, planner() + coder() + reviewer("approve"), api_token=TOKEN) as s, \
            browser_page(s.url) as page:
        await expect(page.locator("#runs-error")).to_contain_text("API token")
        await page.fill("#token", TOKEN)
        await page.dispatch_event("#token", "change")
        await expect(page.locator("#runs-error")).to_have_text("")
        run_id = await start(page, make_repo(BUGGY, name="calc"), "Fix add(); its test fails.", "team")
        await expect(page.locator("#run-status")).to_have_text("success")
        await expect(page.locator("#view")).to_have_attribute("data-transport", "fetch")
        await expect(page.locator(".agent > summary")).to_have_text(["planner", "coder", "reviewer"])
        await expect(page.locator("#plan li")).to_have_text("calc.py return a + b (add must add)")
        events = await stored_events(s.url, run_id, TOKEN)
        number = next(e["number"] for e in events if e["type"] == "pull_request")
        await expect(page.locator("#pr a")).to_have_attribute("href", pull_href(events[0]["repo"], number))
        await expect(page.locator("#view")).to_have_attribute("data-seq", str(events[-1]["seq"]))
        assert await page.evaluate("sessionStorage.getItem('tb-token')") == TOKEN
        await page.screenshot(path=tmp_path / "team.png", full_page=True)
        (ROOT / "docs").mkdir(exist_ok=True)  # the README's picture of the page
        if os.environ.get("TB_UPDATE_SCREENSHOT") == "1":  # the README's picture, refreshed on request
            await page.screenshot(path=ROOT / "docs" / "page.png", full_page=True)


async def test_the_page_shows_attempts_side_by_side_and_marks_the_chosen_one(pool, make_repo, tmp_path):
    router = Router({"planner": planner(), "coder1": coder_writes(WRONG, "Multiplied."),
                     "coder2": coder_writes(FIXED, "Added."), "chooser": choose(2)})
    async with stack(pool, router.steps()) as s, browser_page(s.url) as page:
        await page.select_option("#mode", "single")
        await expect(page.locator("#attempts")).to_be_disabled()  # attempts are for team runs
        run_id = await start(page, make_repo(BUGGY, name="calc"), "Fix add(); its test fails.", "team", attempts=2)
        await expect(page.locator("#run-status")).to_have_text("success")
        events = await stored_events(s.url, run_id)
        assert events[0]["attempts"] == 2  # the form asked for them
        await expect(page.locator("#view")).to_have_attribute("data-seq", str(events[-1]["seq"]))
        # The planner and the reviewer that chose are the run's own; each attempt has a column between them.
        await expect(page.locator("#agents > .agent > summary")).to_have_text(["planner", "reviewer"])
        columns = page.locator("#attempt-columns > .attempt")
        await expect(columns.locator(":scope > h2")).to_have_text(["Attempt 1", "Attempt 2"])
        for n, line in ((1, "+    return a * b\n"), (2, "+    return a + b\n")):
            column = page.locator(f'.attempt[data-attempt="{n}"]')
            calls = [e for e in events if e["type"] == "tool_call" and e["state"] == "complete"
                     and e.get("attempt") == n and e["agent"] == "coder"]
            assert calls and all(c["name"] == "sandbox_write_file" for c in calls)
            await expect(column.locator('.agent[data-agent="coder"] .tool.done')).to_have_count(len(calls))
            await expect(column.locator('.agent[data-agent="coder"] .say')).to_have_text(
                "Multiplied." if n == 1 else "Added.")
            await expect(column.locator('.agent[data-agent="tests"] .tool.done')).to_have_count(1)
            await expect(column.locator(".diff .add")).to_have_text(line)
        # Each attempt's own test run: the plan's verification fails on attempt 1 and passes on attempt 2.
        tests = page.locator('.agent[data-agent="tests"] .tool .result')
        await expect(tests).to_have_count(2)
        await expect(tests.first).to_contain_text("FAILED")
        await expect(tests.last).to_contain_text('"exit_code": 0')
        # The chosen attempt is marked, with the reviewer's reason; the other is not.
        await expect(page.locator(".attempt.chosen")).to_have_count(1)
        await expect(page.locator('.attempt[data-attempt="2"]')).to_have_class(re.compile(r"\bchosen\b"))
        await expect(page.locator(".attempt.chosen .chosen-note")).to_have_text(
            "Chosen (approve): attempt 2's tests pass")
        # The run's own diff (the chosen sandbox, published) is in the main card, and its pull request below.
        await expect(page.locator("#diff .add")).to_have_text("+    return a + b\n")
        number = next(e["number"] for e in events if e["type"] == "pull_request")
        await expect(page.locator("#pr a")).to_have_attribute("href", pull_href(events[0]["repo"], number))
        await page.screenshot(path=tmp_path / "attempts.png", full_page=True)
        if os.environ.get("TB_UPDATE_SCREENSHOT") == "1":  # the README's picture of attempts, refreshed on request
            await page.screenshot(path=ROOT / "docs" / "attempts.png", full_page=True)


async def test_the_page_loads_without_a_console_error_and_shows_when_each_run_started_and_took(pool, make_repo):
    console: list[str] = []
    async with stack(pool, fix_script()) as s, browser_page(s.url, console) as page:
        run_id = await start(page, make_repo(BUGGY), "Fix add(); its test fails.")
        await expect(page.locator("#run-status")).to_have_text("success")
        record = await get_json(f"{s.url}/runs/{run_id}")
        row = page.locator(f'#runs li[data-id="{run_id}"]')
        await expect(row.locator(".took")).to_have_text(re.compile(r"^took \d+\.\d s$"))
        took = float((await row.locator(".took").text_content()).split()[1])
        started = datetime.fromisoformat(await row.locator("time").get_attribute("datetime"))
        await expect(row.locator("time")).not_to_be_empty()
    assert abs(took - record["duration_s"]) <= 0.051
    assert abs(started.timestamp() - record["created"]) < 0.01
    assert console == []


async def test_the_page_says_what_to_set_when_no_model_is_usable(mcp_config, make_repo, tmp_path):
    async with service(mcp_config, tmp_path, {}) as svc, browser_page(svc.url) as page:
        await expect(page.locator("#health-problem")).to_contain_text("ANTHROPIC_API_KEY")
        await expect(page.locator("#health-problem")).to_be_visible()
        await page.fill("#repo", str(make_repo(BUGGY)))
        await page.fill("#prompt", "Fix add()")
        await page.click("#go")
        await expect(page.locator("#start-error")).to_contain_text("503")
        await expect(page.locator("#start-error")).to_contain_text("ANTHROPIC_BASE_URL")


@needs_sandbox_setup
async def test_the_page_shows_a_failed_environment_and_a_commands_output_while_it_runs(pool, make_repo, tmp_path):
    mark = unique_marker()
    script = [turn(tool_use("sandbox_exec", {"command": f"echo started; sleep {mark}"}))]
    async with stack(pool, script) as s, browser_page(s.url) as page:
        # The page has no field for a setup script: the run starts through the API, and the page follows it.
        async with aiohttp.ClientSession() as http:
            async with http.post(s.url + "/code", json={"repoUrl": str(make_repo(BUGGY)), "prompt": "Run it",
                                                        "mode": "single", "setup": FAILING_SETUP}) as resp:
                run_id = (await read_until(resp, '"type":"run"'))[0]["run_id"]
        await page.evaluate("id => { location.hash = id; }", run_id)
        env = page.locator("#env")
        await expect(env).to_have_class(re.compile(r"\bfailed\b"))
        await expect(env.locator(".error")).to_contain_text("exit 3")
        await expect(env.locator(".output")).to_contain_text("preparing the environment")
        await expect(page.locator("#timeline .error")).to_contain_text("the environment could not be set up")
        running = page.locator('.tool[data-tool="sandbox_exec"]')
        await expect(running.locator(".output")).to_have_text("started\n")
        await expect(running.locator(".output")).to_be_visible()
        assert await running.evaluate("card => card.classList.contains('done')") is False
        await page.screenshot(path=tmp_path / "environment.png", full_page=True)
        await page.click("#cancel")
        await expect(page.locator("#run-status")).to_have_text("cancelled")


async def test_the_page_steers_a_run_and_cancels_it_discarding_its_changes(pool, make_repo, tmp_path):
    mark = unique_marker()
    script = [turn(tool_use("sandbox_write_file", {"path": "calc.py", "content": "changed\n"})),
              turn(tool_use("sandbox_exec", {"command": f"sleep {mark}"}))]
    async with stack(pool, script) as s, browser_page(s.url) as page:
        repo = make_repo(BUGGY)
        run_id = await start(page, repo, "Change calc.py, then sleep.")
        await expect(page.locator('.tool[data-tool="sandbox_exec"] .input')).to_contain_text(mark)
        await page.fill("#say", "Keep the public API as it is.")
        await page.click("#send")
        await expect(page.locator("#say")).to_have_value("")
        await page.select_option("#cancel-changes", "discard")
        await page.click("#cancel")
        await expect(page.locator("#run-status")).to_have_text("cancelled")
        await expect(page.locator("#steer")).to_be_hidden()
        await expect(page.locator("#timeline .error")).to_contain_text("its changes are discarded")
        await page.screenshot(path=tmp_path / "discarded.png", full_page=True)
        events = await stored_events(s.url, run_id)
    assert not [e for e in events if e["type"] == "pull_request"] and events[-1]["status"] == "cancelled"
    # Sent while a tool ran, it was never handed over: the run stopped before the agent's next turn.
    assert not [e for e in events if e["type"] == "user_message"]


async def test_the_page_publishes_and_retries_what_a_stopped_run_kept(pool, make_repo, tmp_path):
    repo = make_repo(BUGGY)
    away = tmp_path / "away"
    script = [turn(tool_use("sandbox_write_file", {"path": "calc.py", "content": "fixed\n"})),
              forge_goes_away(repo, away, "Done."),
              turn(text("The change is there already."))]
    async with stack(pool, script) as s, browser_page(s.url) as page:
        first = await start(page, repo, "Fix calc.py")
        await expect(page.locator("#run-status")).to_have_text("error")
        await expect(page.locator("#kept")).to_be_visible()
        await expect(page.locator("#kept-text")).to_contain_text("/publish opens a draft pull request")
        await page.click("#publish")
        await expect(page.locator("#timeline .error").last).to_contain_text("still kept")
        away.rename(repo)
        await page.click("#publish")
        await expect(page.locator("#pr a")).to_contain_text("Draft pull request #")
        await expect(page.locator("#kept")).to_be_hidden()
        await page.screenshot(path=tmp_path / "published.png", full_page=True)
        # Retry from the same kept changes: the page follows the new run, which publishes them again.
        await page.reload()
        await expect(page.locator("#kept")).to_be_visible()
        await page.click("#retry")
        await page.wait_for_function("old => location.hash.length > 1 && location.hash.slice(1) !== old", arg=first)
        await expect(page.locator("#run-status")).to_have_text("success")
        await expect(page.locator("#pr a")).to_contain_text("Pull request #")
