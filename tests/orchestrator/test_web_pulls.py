"""The page's view of a local pull request, in headless Chromium: reached from a run's pull request link, its diff
and comments shown as text, comments added through its form, and a follow-up run started from it."""

from __future__ import annotations

import os

import pytest

from tests.conftest import git

from .conftest import ROOT, of_type, stack
from .test_local_pulls import DOCSTRING, docstring_follow_up, open_pull, pull_href, record, tool
from .test_run import BUGGY, fix_script
from .test_web import CHROMIUM, async_playwright, browser_page, start, stored_events

if async_playwright is not None:
    from playwright.async_api import expect

pytestmark = [
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.skipif(async_playwright is None, reason="playwright is not installed: pip install -e '.[dev]'"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed: apt-get install chromium"),
]
HOSTILE = '<img id="injected" src="x" onerror="document.title=\'owned\'"> <b>Ship it</b>'
LOOKS_RIGHT = "Looks right to me; two questions on the lines below."


async def test_a_runs_local_pull_request_opens_on_the_page_with_its_diff_and_takes_comments(pool, make_repo, tmp_path):
    async with stack(pool, fix_script()) as s, browser_page(s.url) as page:
        repo = make_repo(BUGGY)
        run_id = await start(page, repo, "Fix add(); its test fails.")
        await expect(page.locator("#run-status")).to_have_text("success")
        number = of_type(await stored_events(s.url, run_id), "pull_request")[0]["number"]
        await tool(pool, "add_review_comment", {"repo": str(repo), "number": number, "path": "calc.py", "line": 2,
                                                "body": "Test negative numbers too."})
        await tool(pool, "add_review_comment", {"repo": str(repo), "number": number, "body": LOOKS_RIGHT})
        # The run's link leads to the page's own view of the pull request, not to a file: URL browsers refuse.
        link = page.locator("#pr a")
        await expect(link).to_have_attribute("href", pull_href(repo, number))
        await link.click()
        view = page.locator("#pull-view")
        await expect(view).to_have_attribute("data-loaded", str(number))
        await expect(page.locator("#view")).to_be_hidden()
        await expect(page.locator("#pull-title")).to_have_text("Fix add()")
        await expect(page.locator("#pull-state")).to_have_text("open")
        await expect(page.locator("#pull-branches")).to_have_text("tb/fix-add → main")
        await expect(page.locator("#pull-body")).to_have_text("add() subtracted; it adds now. Tested: unittest.")
        await expect(page.locator("#pull-diff .add")).to_have_text("+    return a + b\n")
        await expect(page.locator("#pull-diff .del")).to_have_text("-    return a - b\n")
        threads = page.locator("#pull-threads .thread")
        await expect(threads.locator(".where")).to_have_text(["calc.py:2"])
        await expect(threads.locator(".body")).to_have_text(["Test negative numbers too."])
        await expect(page.locator("#pull-comments .comment .body")).to_have_text([LOOKS_RIGHT])
        await expect(page.locator("#pulls li")).to_have_count(1)
        await expect(page.locator("#pulls li.current")).to_contain_text(f"#{number} Fix add()")

        # A comment on a line of a file, through the form, starts a review thread.
        await page.fill("#comment-body", "Call it sum?")
        await page.fill("#comment-path", "calc.py")
        await page.fill("#comment-line", "1")
        await page.click("#comment-go")
        await expect(threads.locator(".where")).to_have_text(["calc.py:2", "calc.py:1"])
        await expect(page.locator("#comment-path")).to_have_value("")
        await page.screenshot(path=tmp_path / "pull.png", full_page=True)
        if os.environ.get("TB_UPDATE_SCREENSHOT") == "1":  # the README's picture of a pull request, on request
            await page.screenshot(path=ROOT / "docs" / "pull.png", full_page=True)
        # One whose HTML is shown as text: nothing of it becomes an element.
        await page.fill("#comment-body", HOSTILE)
        await page.click("#comment-go")
        await expect(page.locator("#pull-comments .comment .body")).to_have_text([LOOKS_RIGHT, HOSTILE])
        await expect(page.locator("#comment-body")).to_have_value("")
        assert await page.locator("#injected").count() == 0 and await page.locator("#pull-view b").count() == 0
        assert await page.title() == "Tiny Backspace"
        # A line the forge cannot place is refused with its reason, and nothing is added.
        await page.fill("#comment-body", "Here?")
        await page.fill("#comment-path", "nowhere.py")
        await page.click("#comment-go")
        await expect(page.locator("#comment-error")).to_contain_text("'nowhere.py' is in neither")
        saved = record(repo, number)
        assert [c["body"] for c in saved["comments"]] == [LOOKS_RIGHT, HOSTILE]
        assert [(c["path"], c["line"]) for c in saved["review_comments"]] == [("calc.py", 2), ("calc.py", 1)]
        # The address is the view: a reload shows it again.
        await page.reload()
        await expect(view).to_have_attribute("data-loaded", str(number))
        await expect(page.locator("#pull-comments .comment .body")).to_have_text([LOOKS_RIGHT, HOSTILE])


async def test_the_follow_up_button_starts_a_run_on_the_pull_request_and_the_page_follows_it(pool, make_repo):
    repo = make_repo(BUGGY)
    number = await open_pull(pool, repo)
    head = git(repo, "rev-parse", "tb/fix-add")
    thread = (await tool(pool, "add_review_comment", {"repo": str(repo), "number": number, "path": "calc.py",
                                                      "line": 1, "body": "add() needs a docstring."}))["id"]
    async with stack(pool, docstring_follow_up(thread)) as s, \
            browser_page(s.url + "/" + pull_href(repo, number)) as page:
        await expect(page.locator("#pull-view")).to_have_attribute("data-loaded", str(number))
        await page.select_option("#follow-mode", "single")
        await page.fill("#follow-prompt", "Keep the change small.")
        await page.click("#follow-go")
        await page.wait_for_function("() => location.hash.startsWith('#run_')")
        await expect(page.locator("#view")).to_be_visible()
        await expect(page.locator("#pull-view")).to_be_hidden()
        await expect(page.locator("#run-status")).to_have_text("success")
        await expect(page.locator("#run-repo")).to_contain_text(f"follow-up of #{number}")
        await expect(page.locator("#timeline")).to_contain_text(f"replied in thread {thread} (calc.py:1): "
                                                                "Added a docstring.")
        run_id = (await page.evaluate("location.hash"))[1:]
        events = await stored_events(s.url, run_id)
        assert events[0]["pull_request"] == number and events[0]["prompt"] == "Keep the change small."
        await expect(page.locator("#diff .add")).to_have_text("+" + DOCSTRING)
        # Back to the pull request: the thread has the run's reply, and the branch one more commit.
        await page.click("#pr a")
        await expect(page.locator("#pull-view")).to_have_attribute("data-loaded", str(number))
        reply = page.locator(f'#pull-threads .thread[data-id="{thread}"] .replies .comment')
        await expect(reply.locator(".body")).to_contain_text("Added a docstring.")
        await expect(reply.locator(".ours")).to_have_text(" (Tiny Backspace)")
        await expect(page.locator(f'#pull-threads .thread[data-id="{thread}"] .where')).to_contain_text("addressed")
        await expect(page.locator("#pull-diff .add")).to_have_text(["+" + DOCSTRING, "+    return a + b\n"])
    assert git(repo, "rev-parse", "tb/fix-add^") == head
