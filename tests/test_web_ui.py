"""
Browser tests of nanochat/ui.html: a real headless Chromium (Debian's `chromium` package, driven by
Playwright; never `playwright install`, which downloads browsers) against scripts/chat_web.py.

One server runs the tiny trained d2 model through the real Engine; another runs the test-only echo
engine from tests/test_chat_web.py, which lets a test decide what the "model" outputs (slow replies
to stop, HTML/script payloads that must show up as plain text).

Without chromium or playwright the tests skip with the reason; with env CI set they fail instead.
"""

import os
import json
import time

import httpx
import pytest

from scripts.chat_web import Sampling, WorkerPool, build_workers, create_app
from test_chat_web import ThreadServer, echo_pool, wait_for

CHROMIUM = os.environ.get("NANOCHAT_CHROMIUM", "/usr/bin/chromium")
# Headless and offline: no sandbox (containers), no GPU, nothing phoning home.
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = "the playwright package is not installed (pip install playwright; no `playwright install` needed)"
    if problem is None and not os.path.exists(CHROMIUM):
        problem = f"no chromium at {CHROMIUM} (Debian: apt-get install chromium; or set NANOCHAT_CHROMIUM)"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def model_server(tiny_run):
    """The tiny d2 base model behind the real Engine, one worker, greedy-comparable (fp32)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(tiny_run))
        mp.setenv("NANOCHAT_DTYPE", "float32")
        workers, model_id = build_workers("base", num_workers=1, device_type="cpu")
    pool = WorkerPool(workers, model_id, Sampling(temperature=0.8, top_k=50, max_tokens=24))
    server = ThreadServer(create_app(pool))
    yield server.url
    server.close()
    pool.close()


@pytest.fixture(scope="module")
def echo_server(tiny_tokenizer):
    pool = echo_pool(tiny_tokenizer, num_workers=1, delay=0.03)
    server = ThreadServer(create_app(pool))
    yield server.url
    server.close()
    pool.close()


class Page:
    """A browser tab on the chat page that records what a test must check afterwards: dialogs
    (alert() from injected script), page errors, console errors (CSP violations), requests."""

    def __init__(self, browser, url, route=None):
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.dialogs, self.errors, self.requests, self.bodies = [], [], [], []
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        self.page.on("request", self._on_request)
        if route:
            self.page.route(*route)
        self.page.goto(url + "/")

    def _on_request(self, request):
        self.requests.append(request.url)
        if request.url.endswith("/chat/completions"):
            self.bodies.append(json.loads(request.post_data))

    def ready(self):
        self.page.wait_for_selector("#status.ok")
        return self

    def texts(self):
        return self.page.eval_on_selector_all(
            ".msg", "els => els.map(e => [e.classList.contains('user') ? 'user' : 'assistant', "
                    "e.querySelector('.text').textContent])")

    def idle(self):
        self.page.wait_for_selector("#stop", state="hidden")
        self.page.wait_for_selector("#send", state="visible")

    def send(self, text):
        n = len(self.bodies)
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")
        wait_for(lambda: len(self.bodies) > n, what="the page to send its request")
        self.idle()

    def set_setting(self, input_id, value):
        if not self.page.eval_on_selector("#settings", "d => d.open"):
            self.page.click("#settings summary")
        self.page.fill(f"#{input_id}", value)

    def click_action(self, index, action):
        msg = self.page.locator(".msg").nth(index)
        msg.hover()  # the actions show on hover, like ChatGPT's
        msg.locator(f"button.{action}").click()

    def close(self):
        self.context.close()


@pytest.fixture
def open_page(browser):
    pages = []

    def make(url, route=None):
        p = Page(browser, url, route)
        pages.append(p)
        return p
    yield make
    for p in pages:
        p.close()


# -----------------------------------------------------------------------------

def test_multi_turn_chat_with_the_model(model_server, open_page):
    p = open_page(model_server).ready()
    assert "nanochat-base-d2" in p.page.text_content("#status")
    assert p.page.input_value("#temperature") == "0.8" and p.page.input_value("#max-tokens") == "24"
    p.set_setting("temperature", "0")  # greedy, so the reply can be checked against the API
    p.send("Hello there")
    texts = p.texts()
    assert texts[0] == ["user", "Hello there"] and texts[1][0] == "assistant"
    assert p.bodies[0] == {"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0, "top_k": 50,
                           "max_tokens": 24}
    api = httpx.post(model_server + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Hello there"}], "temperature": 0, "max_tokens": 24}).json()
    assert texts[1][1] == api["choices"][0]["message"]["content"] != ""

    p.send("And then?")  # second turn: the page sends the whole history back
    texts = p.texts()
    assert [t[0] for t in texts] == ["user", "assistant", "user", "assistant"]
    assert p.bodies[1]["messages"] == [{"role": "user", "content": "Hello there"},
                                       {"role": "assistant", "content": texts[1][1]},
                                       {"role": "user", "content": "And then?"}]
    assert texts[3][1] != "" and not p.errors and not p.dialogs


def test_streaming_and_stop(echo_server, open_page):
    p = open_page(echo_server).ready()
    p.page.fill("#input", "slow and steady ")
    p.page.press("#input", "Enter")
    p.page.wait_for_selector("#stop", state="visible")
    text = p.page.locator(".msg.assistant .text")
    seen = [text.text_content()]
    wait_for(lambda: len(text.text_content()) > 20, what="streamed text")  # arrives piece by piece...
    seen.append(text.text_content())
    wait_for(lambda: len(text.text_content()) > len(seen[-1]), what="more streamed text")
    seen.append(text.text_content())
    assert p.page.is_visible("#stop")  # ...while the reply is still being written
    assert seen[1].startswith(seen[0]) and seen[2].startswith(seen[1])
    p.page.click("#stop")
    p.idle()
    partial = text.text_content()
    assert partial.startswith(seen[2]) and len(partial) < 512 * len("slow")
    assert ("slow and steady " * 100).startswith(partial)
    assert p.page.locator(".msg.assistant .note").text_content() == "stopped"
    wait_for(lambda: httpx.get(echo_server + "/stats").json()["busy_workers"] == 0, what="the worker to be freed")
    # the partial reply is part of the conversation from now on
    p.send("next")
    assert p.bodies[-1]["messages"][1] == {"role": "assistant", "content": partial}
    assert p.texts()[-1] == ["assistant", "next"]
    assert not p.errors


def test_edit_and_regenerate(echo_server, open_page):
    p = open_page(echo_server).ready()
    p.send("first")
    p.send("second")
    assert p.texts() == [["user", "first"], ["assistant", "first"], ["user", "second"], ["assistant", "second"]]

    p.click_action(2, "edit")  # edit "second": it goes back to the input and the chat is cut there
    assert p.page.input_value("#input") == "second"
    assert p.texts() == [["user", "first"], ["assistant", "first"]]
    p.send("second, edited")
    assert p.bodies[-1]["messages"][-1] == {"role": "user", "content": "second, edited"}
    assert len(p.bodies[-1]["messages"]) == 3
    assert p.texts()[2:] == [["user", "second, edited"], ["assistant", "second, edited"]]

    n = len(p.bodies)
    p.click_action(1, "regenerate")  # regenerate the first reply: everything after it goes
    wait_for(lambda: len(p.bodies) > n, what="the regenerate request")
    p.idle()
    assert p.bodies[-1]["messages"] == [{"role": "user", "content": "first"}]
    assert p.texts() == [["user", "first"], ["assistant", "first"]]

    p.click_action(0, "edit")  # edit the very first message: an empty chat with the text in the input
    assert p.texts() == [] and p.page.input_value("#input") == "first"
    assert p.page.is_visible("#empty")
    assert not p.errors and not p.dialogs


PAYLOADS = [
    '<img src=x onerror="window.__xss=1;alert(1)">',
    "<script>window.__xss=2;alert(2)</script>",
    '<b>bold</b><iframe src="javascript:alert(3)"></iframe><svg onload="alert(4)"></svg>',
    "tags & entities: &lt;i&gt; &amp; \"quotes\" 'single'\n  second line <u>x</u>",
]


def test_html_in_messages_and_model_output_renders_as_text(echo_server, open_page):
    p = open_page(echo_server).ready()
    for i, payload in enumerate(PAYLOADS):
        p.send(payload)  # the echo engine makes the model output the same payload
        texts = p.texts()
        assert texts[-2:] == [["user", payload], ["assistant", payload]], i
    created = p.page.evaluate(
        "document.querySelectorAll('#messages img, #messages script, #messages iframe, #messages svg, "
        "#messages b, #messages i, #messages u').length")
    assert created == 0
    assert p.page.evaluate("window.__xss === undefined")
    time.sleep(0.3)  # give any stray handler a chance to fire
    assert p.dialogs == [] and p.errors == []  # no alert, and no CSP violation was even attempted
    assert not any(u.endswith("/x") for u in p.requests)  # the <img src=x> was never loaded
    # each message is exactly one text node: nothing was parsed
    assert p.page.evaluate("[...document.querySelectorAll('.msg .text')].every("
                           "e => e.childNodes.length === 1 && e.firstChild.nodeType === Node.TEXT_NODE)")


def test_keyboard_new_chat_and_send_button(echo_server, open_page):
    p = open_page(echo_server).ready()
    assert p.page.is_disabled("#send")  # nothing to send yet
    p.page.fill("#input", "line one")
    p.page.press("#input", "Shift+Enter")  # a newline, not a send
    p.page.keyboard.type("line two")
    assert p.bodies == [] and p.page.input_value("#input") == "line one\nline two"
    assert p.page.is_enabled("#send")
    n = len(p.bodies)
    p.page.click("#send")
    wait_for(lambda: len(p.bodies) > n, what="the request")
    p.idle()
    assert p.texts() == [["user", "line one\nline two"], ["assistant", "line one\nline two"]]
    assert p.page.input_value("#input") == ""
    p.page.click("#new-chat")
    assert p.texts() == [] and p.page.is_visible("#empty")
    # New chat in the middle of a reply: it stops, and nothing of the old chat leaks into the new one
    p.page.fill("#input", "slow talker ")
    p.page.press("#input", "Enter")
    wait_for(lambda: len(p.page.locator(".msg.assistant .text").text_content()) > 5, what="streamed text")
    p.page.click("#new-chat")
    p.idle()
    assert p.texts() == []
    p.send("fresh")
    assert p.bodies[-1]["messages"] == [{"role": "user", "content": "fresh"}]
    assert p.texts() == [["user", "fresh"], ["assistant", "fresh"]]


def test_errors_are_shown(echo_server, open_page):
    p = open_page(echo_server).ready()
    p.set_setting("max-tokens", "5000")  # over the server's limit: a 400 with the reason
    p.send("hello")
    p.page.wait_for_selector("#error", state="visible")
    assert "max_tokens=5000" in p.page.text_content("#error") and "4096" in p.page.text_content("#error")
    assert p.texts() == [] and p.page.input_value("#input") == "hello"  # the turn is taken back to fix
    p.set_setting("max-tokens", "100")
    p.send("hello")
    assert p.page.is_hidden("#error") and p.texts()[-1] == ["assistant", "hello"]

    # server unreachable: the health check on load says so
    down = open_page(echo_server, route=("**/health", lambda r: r.abort()))
    down.page.wait_for_selector("#error", state="visible")
    assert "not responding" in down.page.text_content("#error")
    assert down.page.text_content("#status") == "offline"

    # the request itself fails on the network
    broken = open_page(echo_server, route=("**/chat/completions", lambda r: r.abort())).ready()
    broken.page.fill("#input", "anyone there?")
    broken.page.press("#input", "Enter")
    broken.page.wait_for_selector("#error", state="visible")
    broken.idle()
    assert "cannot reach the server" in broken.page.text_content("#error")
    assert broken.page.input_value("#input") == "anyone there?"
