"""The chat page in a real browser: Debian's headless Chromium through Selenium (no browser is
downloaded; where Chromium or its driver is missing the tests skip and say why).

A scripted engine writes a known reply slowly, so the test can watch it stream in, stop it, and
check that a reply holding <script> and <img onerror=...> is shown as text and never runs.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("selenium")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from onecard.data import Corpus, iter_texts  # noqa: E402
from onecard.server import Running, create_app  # noqa: E402
from onecard.tokenizer import Tokenizer  # noqa: E402
from tests.browser import start_chromium  # noqa: E402
from tests.serve_helpers import CutStreams, Record, scripted_backend  # noqa: E402

XSS = 'Look: <script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> and <b>bold</b>. Done.'


@pytest.fixture(scope="module")
def browser():
    chrome = start_chromium()
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(iter_texts(Corpus.embedded(), 20_000), 300)


def wait(condition, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def replies(chrome) -> list[str]:
    return chrome.execute_script(
        "return [...document.querySelectorAll('.msg.assistant .text')].map(n => n.textContent)")


def open_page(chrome, server) -> None:
    chrome.get(server.url + "/")
    wait(lambda: "scripted" in chrome.find_element(By.ID, "status").text, what="the page to connect")


def send(chrome, text: str) -> None:
    box = chrome.switch_to.active_element  # the page keeps the focus in the message box
    assert box.get_attribute("id") == "input"
    box.send_keys(text, Keys.ENTER)


def test_a_reply_streams_in_and_markup_in_it_is_shown_as_text(browser, tokenizer):
    record = Record()
    server = Running(create_app(scripted_backend(tokenizer, XSS, 0.02, record)))
    try:
        open_page(browser, server)
        send(browser, "Show me some HTML")
        seen = set()
        wait(lambda: seen.add(len((replies(browser) or [""])[-1])) or record.finished.is_set(), what="the reply")
        assert len(seen - {0}) >= 3, f"the reply did not stream in: lengths seen {sorted(seen)}"
        wait(lambda: not browser.find_elements(By.CSS_SELECTOR, ".msg.streaming"), what="the end of the reply")
        assert replies(browser) == [XSS]
        assert browser.execute_script("return window.pwned") is None
        assert browser.execute_script("return document.querySelectorAll('#log img, #log script, #log b').length") == 0
        user = browser.find_element(By.CSS_SELECTOR, ".msg.user .text").text
        assert user == "Show me some HTML"
    finally:
        server.stop()


def test_stop_regenerate_edit_and_new_chat_by_keyboard(browser, tokenizer):
    record = Record()
    server = Running(create_app(scripted_backend(tokenizer, "word " * 300, 0.02, record, workers=1)))
    try:
        open_page(browser, server)
        send(browser, "Talk for a long time")
        wait(lambda: len((replies(browser) or [""])[-1]) > 20, what="the reply to begin")
        browser.switch_to.active_element.send_keys(Keys.ESCAPE)  # Escape stops the reply
        wait(lambda: browser.find_elements(By.XPATH, "//div[@class='note' and text()='(stopped)']"),
             what="the reply to stop")
        assert record.closed.wait(5) and not record.finished.is_set(), "the server went on generating"
        stopped = replies(browser)[-1]
        time.sleep(0.3)
        assert replies(browser)[-1] == stopped and 0 < len(stopped) < len("word " * 300)

        record.closed.clear()
        press_tab_until(browser, "Regenerate").send_keys(Keys.ENTER)
        wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.streaming"), what="the new reply")
        browser.find_element(By.ID, "stop").click()
        wait(lambda: not browser.find_elements(By.CSS_SELECTOR, ".msg.streaming"), what="the stop button")
        assert len(replies(browser)) == 1

        press_tab_until(browser, "Edit").send_keys(Keys.ENTER)
        editor = browser.switch_to.active_element
        assert editor.get_attribute("aria-label") == "Edit message"
        editor.send_keys(Keys.CONTROL, "a")
        editor.send_keys("A new question", Keys.ENTER)
        wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.streaming"), what="the edited question's reply")
        browser.switch_to.active_element.send_keys(Keys.ESCAPE)
        wait(lambda: not browser.find_elements(By.CSS_SELECTOR, ".msg.streaming"), what="the stop")
        texts = [n.text for n in browser.find_elements(By.CSS_SELECTOR, ".msg .text")]
        assert texts[0] == "A new question" and len(texts) == 2

        press_tab_until(browser, "New chat", backwards=True).send_keys(Keys.ENTER)
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg")
    finally:
        server.stop()


def press_tab_until(chrome, label: str, backwards: bool = False, presses: int = 30):
    """Move the focus with Tab (or Shift+Tab) alone until it is on the button `label`."""
    for _ in range(presses):
        focused = chrome.switch_to.active_element
        if focused.tag_name == "button" and focused.text == label:
            return focused
        focused.send_keys(Keys.SHIFT, Keys.TAB) if backwards else focused.send_keys(Keys.TAB)
    raise AssertionError(f"Tab never reached the {label!r} button")


def test_a_refused_turn_an_open_edit_box_and_lower_server_limits_do_not_break_the_chat(browser, tokenizer):
    """A message the server refused used to be sent again with every later one (so each failed the same
    way); an edit box left open during Regenerate started a second reply beside the first; the page's
    default settings failed on a server started with lower limits; a reader scrolled up was pulled down."""
    from onecard.openai_api import Limits

    record = Record()
    limits = Limits(max_message_chars=40, max_tokens=256)  # below the page's 512 default
    server = Running(create_app(scripted_backend(tokenizer, "word " * 200, 0.01, record, workers=1), limits))
    try:
        open_page(browser, server)
        send(browser, "x" * 60)
        wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".note.error"), what="the refusal")
        assert "left out of the conversation" in browser.find_element(By.CSS_SELECTOR, ".note.error").text
        send(browser, "a short one")
        wait(lambda: len(replies(browser)) == 2 and len(replies(browser)[-1]) > 100, what="the second reply")
        browser.execute_script("document.getElementById('log').scrollTop = 0")  # read from the top meanwhile
        time.sleep(0.3)
        assert browser.execute_script("return document.getElementById('log').scrollTop") == 0
        wait(lambda: not browser.find_elements(By.CSS_SELECTOR, ".msg.streaming"), timeout=30, what="its end")
        assert len(browser.find_elements(By.CSS_SELECTOR, ".note.error")) == 1

        edit = browser.find_elements(By.XPATH, "//button[text()='Edit']")[-1]
        edit.click()  # an edit box open on the last question ...
        browser.find_element(By.XPATH, "//button[text()='Regenerate']").click()  # ... then Regenerate
        wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.streaming"), what="the regenerated reply")
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg textarea")  # closed: no second reply from it
        browser.switch_to.active_element.send_keys(Keys.ESCAPE)
        wait(lambda: not browser.find_elements(By.CSS_SELECTOR, ".msg.streaming"), what="the stop")
        assert record.closed.wait(5)
    finally:
        server.stop()


@pytest.mark.parametrize("broken", [False, True], ids=["ended", "broken"])
def test_a_reply_cut_off_mid_stream_says_so(browser, tokenizer, broken):
    """A stream that ended without its [DONE] (a proxy cut it off) used to leave the half reply looking
    complete; one whose connection broke (the server killed mid-reply) said "cannot reach the server"."""
    app = create_app(scripted_backend(tokenizer, "word " * 40, 0.01))
    app.add_middleware(CutStreams, pieces=6, broken=broken)
    server = Running(app)
    try:
        open_page(browser, server)
        send(browser, "Talk for a while")
        wait(lambda: not browser.find_elements(By.CSS_SELECTOR, ".msg.streaming"), what="the end of the reply")
        assert 0 < len(replies(browser)[-1]) < len("word " * 40)
        note = wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .note.error"), what="a note")
        assert "cut off" in note[0].text and "cannot reach" not in note[0].text
        assert browser.find_elements(By.XPATH, "//button[text()='Regenerate']")
    finally:
        server.stop()


def test_regenerate_after_a_refusal_asks_the_same_question_again(browser, tokenizer):
    """Regenerate on a refused turn (401 without the key, 429 busy: 'try again') used to send the
    conversation without the question, which the server refused again ('messages: expected a
    non-empty list')."""
    server = Running(create_app(scripted_backend(tokenizer, "Hello there.", 0.01), api_key="sesame"))
    try:
        open_page(browser, server)
        send(browser, "Hi")
        wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".note.error"), what="the refusal")
        browser.find_element(By.ID, "apikey").send_keys("sesame")
        browser.find_element(By.XPATH, "//button[text()='Regenerate']").click()
        wait(lambda: replies(browser) == ["Hello there."] and not browser.find_elements(By.CSS_SELECTOR, ".note"),
             timeout=5, what="the reply to the same question")
    finally:
        server.stop()


def test_a_missing_or_wrong_api_key_points_to_the_key_field(browser, tokenizer):
    """A 401 used to show the server's words for programs ("send 'Authorization: Bearer KEY'"), which
    a reader of the page cannot act on; it now says where the key goes and puts the cursor there."""
    server = Running(create_app(scripted_backend(tokenizer, "Hello there.", 0.01), api_key="sesame"))
    try:
        open_page(browser, server)
        for key, said in (("", "needs its API key"), ("guess", "wrong API key")):
            browser.execute_script("document.getElementById('apikey').value = arguments[0]", key)
            browser.find_element(By.ID, "input").click()
            send(browser, "Hi")
            note = wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg:last-child .note.error"),
                        what="the refusal")[0].text
            assert said in note and "Settings" in note and "Authorization" not in note, note
            assert browser.switch_to.active_element.get_attribute("id") == "apikey"
            assert browser.find_element(By.ID, "settings").get_attribute("open") is not None
        browser.switch_to.active_element.send_keys(Keys.CONTROL, "a")
        browser.switch_to.active_element.send_keys("sesame")
        browser.find_element(By.XPATH, "//button[text()='Regenerate']").click()
        wait(lambda: replies(browser)[-1] == "Hello there.", timeout=5, what="the reply with the key")
    finally:
        server.stop()



def test_a_server_out_of_reach_is_polled_by_one_retry_loop(browser, tokenizer):
    """Every failed request started a loop of its own that asked /health every 2 s: after a few
    messages sent to a stopped server, the page polled it several times every 2 s."""
    server = Running(create_app(scripted_backend(tokenizer, "Hi.", 0.0)))
    try:
        open_page(browser, server)
    finally:
        server.stop()
    for sent in range(1, 4):
        send(browser, f"Are you there? {sent}")
        wait(lambda n=sent: len(browser.find_elements(By.CSS_SELECTOR, ".note.error")) == n, what="the error")
    browser.execute_script("""window.polls = 0; const fetched = window.fetch;
        window.fetch = (url, options) => { if (url === "/health") window.polls++; return fetched(url, options); }""")
    time.sleep(2.5)
    assert browser.execute_script("return window.polls") <= 2  # one loop asks every 2 s


def test_the_server_restarted_with_a_base_model_while_the_page_is_open(browser, tokenizer):
    """The page learned chat or base once, when it opened: after a restart with a base model its next
    message failed ('scripted is a base model: it continues text at /v1/completions') and the header
    still named the old model."""
    server = Running(create_app(scripted_backend(tokenizer, "A chat reply.", 0.01)))
    port = int(server.url.rsplit(":", 1)[1])
    try:
        open_page(browser, server)
        send(browser, "Hi")
        wait(lambda: replies(browser) == ["A chat reply."] and
             not browser.find_elements(By.CSS_SELECTOR, ".msg.streaming"), timeout=5, what="the chat reply")
        server.stop()
        server = Running(create_app(scripted_backend(tokenizer, " it was.", 0.01, kind="base")), port=port)
        send(browser, "Once upon a time")
        wait(lambda: replies(browser) == ["A chat reply.", " it was."] and
             not browser.find_elements(By.CSS_SELECTOR, ".msg.streaming"), timeout=5, what="the continuation")
        assert [n.text for n in browser.find_elements(By.CSS_SELECTOR, ".note")] == []
        assert "base model" in browser.find_element(By.ID, "status").text
    finally:
        server.stop()



def test_escape_closes_the_settings(browser, tokenizer):
    """The Settings panel (opened by itself on a server that needs a key) lies over the conversation;
    Escape did not close it, so a keyboard user had to find its summary again."""
    server = Running(create_app(scripted_backend(tokenizer, "Hi.", 0.0), api_key="sesame"))
    try:
        open_page(browser, server)
        assert browser.find_element(By.ID, "settings").get_attribute("open") is not None
        browser.find_element(By.ID, "apikey").send_keys("sesame", Keys.ESCAPE)
        assert browser.find_element(By.ID, "settings").get_attribute("open") is None
        assert browser.switch_to.active_element.tag_name == "summary"  # the focus is not lost with the panel
        browser.switch_to.active_element.send_keys(Keys.ENTER)  # opens it again
        assert browser.find_element(By.ID, "settings").get_attribute("open") is not None
    finally:
        server.stop()


def test_a_conversation_too_long_in_all_says_what_helps(browser, tokenizer):
    """A conversation over the server's limit in all (or the model's context) used to be noted "edit it,
    or send another message", though another message is refused the same: only a shorter one, or a
    New chat, helps."""
    from onecard.openai_api import Limits

    server = Running(create_app(scripted_backend(tokenizer, "Hi.", 0.0), Limits(max_total_chars=100)))
    try:
        open_page(browser, server)
        for sent in ("a" * 50, "b" * 50):  # 50 + 3 + 50 characters
            send(browser, sent)
            wait(lambda: not browser.find_elements(By.CSS_SELECTOR, ".msg.streaming"), what="the reply")
        note = wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".note.error"), what="the refusal")[0].text
        assert "100 characters in all" in note and "New chat" in note and "another message" not in note, note
        send(browser, "short")  # as the note says, a shorter message fits
        wait(lambda: replies(browser)[-1] == "Hi." and len(replies(browser)) == 3, timeout=5, what="its reply")
    finally:
        server.stop()


def test_a_screen_reader_is_told_each_reply_once_when_it_is_whole(browser, tokenizer):
    """The conversation was a live region redrawn whole at the start and end of every reply (and changed
    at every token): a screen reader could read every message again each time. The log is not live now;
    one hidden live line says the finished reply alone. The streaming reply is still aria-busy."""
    server = Running(create_app(scripted_backend(tokenizer, "word " * 30, 0.01)))
    busy = "return [...document.querySelectorAll('.msg.assistant')].map(n => n.getAttribute('aria-busy'))"
    said = "return document.getElementById('announce').textContent"
    try:
        open_page(browser, server)
        assert browser.find_element(By.ID, "log").get_attribute("aria-live") == "off"
        for turn in (1, 2):
            send(browser, f"Hi {turn}")
            wait(lambda: len((replies(browser) or [""])[-1]) > 5, what="the reply to begin")
            assert browser.execute_script(busy)[-1] == "true" and browser.execute_script(said) == ""
            wait(lambda: not browser.find_elements(By.CSS_SELECTOR, ".msg.streaming"), what="the end of the reply")
            assert browser.execute_script(busy) == [None] * turn and replies(browser) == ["word " * 30] * turn
            assert browser.execute_script(said) == "Model: " + "word " * 30  # this reply alone, not the chat
    finally:
        server.stop()


def test_a_long_reply_is_appended_to_not_rewritten_at_every_token(browser, tokenizer):
    """Each token rewrote the whole reply's text and laid the page out again: on two CPU cores a reply
    of 9,394 scripted tokens took 7.8 s to show, against 1.7 s for the server alone (1.3 s now). New
    text is now appended to the text node shown, once a frame; the reply must still be whole and exact."""
    text = "".join(f"{i} " for i in range(250))
    server = Running(create_app(scripted_backend(tokenizer, text, 0.002)))
    try:
        open_page(browser, server)
        send(browser, "Count")
        wait(lambda: browser.execute_script(
            "const n = document.querySelector('.msg.streaming .text'); window.shown = n && n.firstChild;"
            "return window.shown && window.shown.length > 0"), what="the reply to begin")
        first = browser.execute_script("return window.shown.data")
        wait(lambda: len(replies(browser)[-1]) > len(first) + 20, what="more of the reply")
        assert browser.execute_script("return window.shown.isConnected"), "the text shown was replaced"
        wait(lambda: not browser.find_elements(By.CSS_SELECTOR, ".msg.streaming"), what="the end of the reply")
        assert replies(browser) == [text]
    finally:
        server.stop()


def test_a_setting_that_is_not_a_number_is_said_under_settings_and_a_cleared_one_is_the_default(browser, tokenizer):
    """Temperature 1e400 (which the browser cannot read) was left out without a word, so the server used
    its own; top-k 0.4 was rounded to 0 and the server's error said "got 0"; a cleared field was saved
    as "" and came back empty. Now the page says which setting is not a number (or not whole) before
    it sends anything, and a cleared field shows its default again."""
    server = Running(create_app(scripted_backend(tokenizer, "Hi.", 0.0)))
    try:
        open_page(browser, server)
        browser.execute_script("localStorage.clear()")
        open_page(browser, server)
        browser.execute_script("""window.bodies = []; const fetched = window.fetch;
            window.fetch = (url, options) => { if (options && options.body) window.bodies.push(options.body);
                                               return fetched(url, options); }""")
        browser.find_element(By.ID, "input").send_keys("Hi")
        browser.find_element(By.ID, "settings").click()
        for field, typed, said in (("temperature", "1e400", "Temperature: expected a number"),
                                   ("topk", "0.4", "Top-k: expected a whole number, got 0.4")):
            box = browser.find_element(By.ID, field)
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(typed)
            browser.find_element(By.ID, "input").click()
            send(browser, "")  # Enter
            assert not browser.find_elements(By.CSS_SELECTOR, ".msg"), f"sent with {field} {typed}"
            assert browser.find_element(By.ID, "input").get_attribute("value") == "Hi"  # kept for later
            assert browser.find_element(By.ID, "settings-error").text == said
            assert browser.switch_to.active_element.get_attribute("id") == field  # on the setting to fix
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(Keys.BACKSPACE)
            browser.find_element(By.ID, "maxtokens").click()  # cleared, then left: back to its default
            assert box.get_attribute("value") == box.get_attribute("defaultValue")
        assert not browser.find_element(By.ID, "settings-error").is_displayed()
        browser.find_element(By.ID, "input").click()
        send(browser, "")  # the message kept in the box
        wait(lambda: replies(browser) == ["Hi."], timeout=5, what="the reply")
        assert browser.execute_script("return window.bodies.length") == 1
        open_page(browser, server)  # the cleared fields were saved as their defaults, not as ""
        assert [browser.find_element(By.ID, f).get_attribute("value") for f in ("temperature", "topk")] == ["0.6", "50"]
    finally:
        server.stop()
