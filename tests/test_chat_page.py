"""The chat page in a real browser (Debian's Chromium, headless, via Playwright) at phone width."""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ARTIFACTS, MODELS_FILE, DEMO_MODEL, stream_events
from model_store.registry import load_registry
from model_store.tokenizer import ChatTokenizer, Message

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PHONE = {"width": 390, "height": 844}
REPLY = ".message.assistant"
TIMEOUT_MS = 60_000

# Record the length of the newest reply's text at every change, to see tokens arrive one by one.
WATCH_LENGTHS = """() => {
  window.replyLengths = [];
  new MutationObserver(() => {
    const replies = document.querySelectorAll('.message.assistant .text');
    const last = replies[replies.length - 1];
    if (last) window.replyLengths.push(last.textContent.length);
  }).observe(document.getElementById('messages'),
             {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not CHROMIUM.exists() and not shutil.which("chromium"):
        pytest.skip("no Chromium: apt-get install chromium (.ci/run does)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture()
def page(browser, stack):
    context = browser.new_context(viewport=PHONE, base_url=stack.api_url)
    context.set_default_timeout(TIMEOUT_MS)
    opened = context.new_page()
    opened.goto("/")
    opened.wait_for_selector("body[data-ready=true]")
    yield opened
    context.close()


def _settings(page, max_new_tokens: int, temperature: float = 0.0,
              min_new_tokens: int | None = None) -> None:
    page.click("#settings summary")
    page.fill("#max-new-tokens", str(max_new_tokens))
    page.fill("#min-new-tokens", "" if min_new_tokens is None else str(min_new_tokens))
    page.fill("#temperature", str(temperature))
    page.click("#settings summary")


def _send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def _wait_reply(page, index: int, states: str = "succeeded") -> str:
    """Wait until reply `index` ends in one of `states`; return its text."""
    page.wait_for_function(
        "([selector, index, states]) => { const el = document.querySelectorAll(selector)[index];"
        " return Boolean(el) && states.includes(el.dataset.state); }",
        arg=[REPLY, index, states.split()])
    return page.locator(REPLY).nth(index).locator(".text").text_content()


def _conversation_id(page) -> str:
    return page.evaluate("new URL(location.href).searchParams.get('c')")


def _assert_rendered_frame_by_frame(page, stack, job_id: str, text: str) -> None:
    """The page showed the reply growing by each token frame of the job's log as it came.

    How many frames a reply takes depends on how fast the engine is (the worker sends the
    first token at once, then what came each chunk interval), so the page is checked against
    the job's own log, not against a count: every prefix the log spells must have been on
    screen (lengths measured in the browser: JavaScript counts UTF-16 units)."""
    events = stream_events(f"{stack.api_url.replace('http', 'ws', 1)}/v1/jobs/{job_id}/stream")
    texts = [event["text"] for event in events if event["type"] == "token"]
    assert "".join(texts) == text
    assert len(texts) >= 2, "the first token is sent alone, before the rest of the reply"
    prefixes = page.evaluate(
        "(texts) => { let n = 0; return texts.map((t) => (n += t.length)); }", texts)
    shown = page.evaluate("window.replyLengths")
    assert set(prefixes) <= set(shown), f"frames {prefixes}, screen {shown}"


def test_two_messages_stream_and_the_second_prompt_holds_the_first(page, api, stack):
    _settings(page, max_new_tokens=96, min_new_tokens=96)  # long enough for several chunks
    page.evaluate(WATCH_LENGTHS)
    _send(page, "Halo, apa kabar?")
    first = _wait_reply(page, 0)
    cid = _conversation_id(page)
    assert cid and page.evaluate("localStorage.getItem('dawet.conversation')") == cid
    first_job = api.get(f"/v1/conversations/{cid}").json()["turns"][0]["job_id"]
    _assert_rendered_frame_by_frame(page, stack, first_job, first)

    _send(page, "Kamu suka makan apa?")
    second = _wait_reply(page, 1)
    assert "TTFT" in page.locator(f"{REPLY} >> nth=1").locator(".meta").inner_text()
    assert "tok/s" in page.locator(f"{REPLY} >> nth=1").locator(".meta").inner_text()

    turns = api.get(f"/v1/conversations/{cid}").json()["turns"]
    assert [t["assistant"] for t in turns] == [first, second]
    assert turns[1]["context_turns"] == 1
    spec = load_registry(MODELS_FILE).get(DEMO_MODEL)
    tokenizer = ChatTokenizer(spec.path)
    prompt = [Message("user", "Halo, apa kabar?"), Message("assistant", first),
              Message("user", "Kamu suka makan apa?")]
    second_job = api.get(f"/v1/jobs/{turns[1]['job_id']}").json()
    assert second_job["usage"]["prompt_tokens"] == len(
        tokenizer.encode(tokenizer.render(prompt, spec.system_prompt)))
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-page.png"), full_page=True)

    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator(f"{REPLY} .text").all_text_contents() == [first, second]
    assert page.locator(".message.user").all_text_contents() == [
        "Halo, apa kabar?", "Kamu suka makan apa?"]


def test_stop_cancels_the_reply(page, api):
    _settings(page, max_new_tokens=400, min_new_tokens=400)  # it cannot end before Stop
    _send(page, "Ceritakan dongeng yang panjang sekali.")
    page.wait_for_selector(f"{REPLY}[data-state=streaming]")
    page.click("#stop")
    text = _wait_reply(page, 0, "cancelled")
    job_id = page.locator(REPLY).first.get_attribute("data-job-id")
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "cancelled" and job["usage"]["completion_tokens"] < 400
    assert text == job["text"]
    saved = api.get(f"/v1/conversations/{_conversation_id(page)}").json()["turns"][0]
    assert saved["state"] == "cancelled" and saved["assistant"] == text


def test_a_dropped_connection_resumes_without_losing_or_repeating_text(page, api):
    _settings(page, max_new_tokens=400, min_new_tokens=400)  # still streaming when it drops
    _send(page, "Jelaskan cara membuat es dawet.")
    page.wait_for_selector(f"{REPLY}[data-state=streaming]")
    shown_at_drop = page.evaluate(
        "() => { window.dawetChat.dropConnection();"
        " return document.querySelector('.message.assistant .text').textContent.length; }")
    page.wait_for_selector("#connection[data-state=closed]")
    text = _wait_reply(page, 0)
    assert page.locator("#connection").get_attribute("data-state") == "open"
    job_id = page.locator(REPLY).first.get_attribute("data-job-id")
    assert text == api.get(f"/v1/jobs/{job_id}").json()["text"]
    assert 0 < shown_at_drop < len(text)


def test_regenerate_and_new_chat(page, api):
    _settings(page, max_new_tokens=8)
    _send(page, "Selamat pagi!")
    _wait_reply(page, 0)
    first_job = page.locator(REPLY).first.get_attribute("data-job-id")
    cid = _conversation_id(page)
    page.click("#regenerate")
    page.wait_for_function(
        "job => { const el = document.querySelector('.message.assistant'); "
        "return el.dataset.jobId !== job && el.dataset.state === 'succeeded'; }", arg=first_job)
    turns = api.get(f"/v1/conversations/{cid}").json()["turns"]
    assert len(turns) == 1 and turns[0]["job_id"] != first_job
    assert page.locator(REPLY).count() == 1

    page.click("#new-chat")
    assert page.locator(".message").count() == 0 and _conversation_id(page) is None
    _send(page, "Halo lagi.")
    _wait_reply(page, 0)
    assert _conversation_id(page) not in (None, cid)
