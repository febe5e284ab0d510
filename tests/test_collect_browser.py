"""The comparison collection page in a real browser: headless Chromium (Debian's, driven
by Playwright) opens the page served by Ray Serve on 127.0.0.1, chats, picks responses
with the keyboard only, and the comparisons are in the database. Saves a screenshot
(the test's tmp folder, copied to docs/collect_page.png).
"""

import shutil
import socket
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.timeout(600)

CHROMIUM = "/usr/bin/chromium"
KEY = "browser-test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_server(ray_cluster, tiny_model, tmp_path_factory):
    from ray import serve

    from serve.collect import start_collect

    db = tmp_path_factory.mktemp("collect-browser") / "comparisons.sqlite"
    port = _free_port()
    start_collect(dict(policy=tiny_model, db=str(db), api_key=KEY, max_new_tokens=16, kv_cache_gib=0.25),
                  port=port, name="collect-browser")
    yield f"http://127.0.0.1:{port}", db
    serve.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing: `make test` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: the test may run as root (CI containers), where Chromium's sandbox refuses to start.
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def test_chat_and_label_with_the_keyboard(page_server, browser, tmp_path):
    from hh_ray.comparisons import ComparisonStore

    url, db = page_server
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    page.goto(url + "/")
    assert "which response is better" in page.title() + page.inner_text("h1")
    page.fill("#labeler", "browser-tester")
    page.dispatch_event("#labeler", "change")
    page.fill("#apikey", KEY)
    page.dispatch_event("#apikey", "change")

    # Turn 1: Enter sends; the two responses arrive; "s" twice = "clearly better"; "2" picks response 2.
    page.click("#message")
    page.keyboard.type("Can you tell me about chess?")
    page.keyboard.press("Enter")
    page.wait_for_selector("#compare.show", timeout=120_000)
    shown = [page.inner_text("#resp1 .text"), page.inner_text("#resp2 .text")]
    page.keyboard.press("s")
    page.keyboard.press("s")
    assert page.inner_text("#strength-value") == "clearly better"
    page.keyboard.press("2")
    page.wait_for_selector("#status.ok", timeout=30_000)
    assert "Recorded: 2 is better" in page.inner_text("#status")
    # The dialogue goes on with the chosen response.
    assert page.locator(".turn.assistant").last.inner_text() == shown[1]

    # Turn 2, on top of it: a tie, pressed as "t" after a screenshot of both responses.
    page.keyboard.type("Any tips for chess?")
    page.keyboard.press("Enter")
    page.wait_for_selector("#compare.show", timeout=120_000)
    shot = tmp_path / "collect_page.png"
    page.screenshot(path=str(shot), full_page=True)
    page.keyboard.press("t")
    page.wait_for_function("document.querySelector('#count').textContent === '2 labels'", timeout=30_000)

    labels = ComparisonStore(db).labeled_pairs()
    assert [(lp.choice, lp.strength, lp.labeler) for lp in labels] == [("b", 2, "page:browser-tester"),
                                                                       ("tie", None, "page:browser-tester")]
    first, second = labels
    assert first.response_b.strip() == shown[1]
    # The second prompt holds the first turn, continued with the response that was chosen.
    assert second.prompt.startswith(first.prompt + first.response_b) and "Any tips for chess?" in second.prompt

    # Without the key the API refuses, and the page says so instead of failing silently.
    page.fill("#apikey", "wrong")
    page.keyboard.press("Escape")
    page.click("#message")
    page.keyboard.type("hello?")
    page.keyboard.press("Enter")
    page.wait_for_selector("#status.err", timeout=30_000)
    assert "API key" in page.inner_text("#status")
    assert len(ComparisonStore(db).labeled_pairs()) == 2

    assert shot.stat().st_size > 10_000
    (ROOT / "docs").mkdir(exist_ok=True)
    shutil.copy(shot, ROOT / "docs" / "collect_page.png")
