"""The chat page in Debian's headless Chromium, driven by Selenium: type, watch tokens arrive,
see the intent and the source link."""

from __future__ import annotations

import shutil
import tempfile

import pytest

from .conftest import KEY

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("Debian's chromium and chromium-driver are needed (make test installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="tandem-chromium-")
    # No background traffic: this machine's network is closed.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def send(browser, url: str, message: str, key: str = KEY) -> None:
    """Open the page, enter the key and the message, and send it."""
    from selenium.webdriver.common.by import By

    browser.get(f"{url}/")
    browser.find_element(By.ID, "key").send_keys(key)
    browser.find_element(By.ID, "message").send_keys(message)
    browser.find_element(By.ID, "send").click()


def test_chat_page_streams_a_reply_with_its_source(api, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    send(browser, api, "How do I activate my new card?")
    assert browser.title == "Tandem chat"

    wait = WebDriverWait(browser, 120, poll_frequency=0.05)
    reply = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".turn.bot .reply"))
    seen_lengths = set()

    def growing(_):
        seen_lengths.add(len(reply.text))
        return browser.find_elements(By.CSS_SELECTOR, ".turn.bot .sources a")

    links = wait.until(growing)
    assert len([n for n in seen_lengths if n > 0]) >= 2, "the reply grew token by token, not in one piece"
    meta = browser.find_element(By.CSS_SELECTOR, ".turn.bot .meta").text
    assert "intent activate_my_card" in meta and "confidence" in meta
    assert links[0].get_attribute("href").endswith("/articles/activate-my-card")
    assert reply.text.strip()
    browser.save_screenshot(str(tmp_path / "chat.png"))


def test_a_second_draft_replaces_the_rejected_one_on_the_page(api, browser):
    """"I lost my card": the first draft fails the guard and a second one passes it
    (tests/pipeline/test_chain.py); the page ends showing the reply, not the rejected draft."""
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    send(browser, api, "I lost my card")
    WebDriverWait(browser, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".turn.bot .sources a"))
    shown = browser.find_element(By.CSS_SELECTOR, ".turn.bot .reply").text
    assert not browser.find_elements(By.CSS_SELECTOR, ".turn.bot .warn")
    answer = httpx.post(f"{api}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                        json={"messages": [{"role": "user", "content": "I lost my card"}]}).json()["tandem"]
    assert answer["grounded"] and answer["cached"]  # the page's reply, from the cache
    assert " ".join(shown.split()) == " ".join(answer["reply"].split())


def test_the_guards_quoted_answer_replaces_the_rejected_draft_on_the_page(api, browser, workers):
    """With second drafts off, "I lost my card"'s first draft (streamed as it is written) fails the
    guard, and the answer quoted from the article follows as a token marked `quoted`: the page
    says so and ends showing that answer, not the rejected draft."""
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        workers.restart("gen", env={"TANDEM_GUARD_SECOND_DRAFT": "false"})
        send(browser, api, "I lost my card")
        warning = WebDriverWait(browser, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".turn.bot .warn"))
        assert "quoted answer" in warning[0].text
        WebDriverWait(browser, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".turn.bot .sources a"))
        shown = browser.find_element(By.CSS_SELECTOR, ".turn.bot .reply").text
        answer = httpx.post(f"{api}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                            json={"messages": [{"role": "user", "content": "I lost my card"}]}).json()["tandem"]
        assert answer["cached"] and not answer["grounded"]  # the page's reply, from the cache: the quoted one
        assert " ".join(shown.split()) == " ".join(answer["reply"].split())
        assert len(browser.find_elements(By.CSS_SELECTOR, ".turn.bot .warn")) == 1
    finally:
        workers.restart("gen")  # the session's worker, for the tests after this one


def test_an_error_answer_to_the_events_request_is_shown_on_the_page(workers, browser, tmp_path):
    """A rate limit of one request a minute: the reply is taken, and its events request gets
    429. The page had read that answer as an event stream with no events: "thinking…" for good."""
    import json

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from .conftest import start_api, stop_api

    key = f"page-{tmp_path.name}"  # its own count: the shared key's is far past one
    process, url = start_api(tmp_path / "api.log", {"TANDEM_API_KEYS": json.dumps([key]),
                                                     "TANDEM_RATE_LIMIT_PER_MINUTE": "1"})
    try:
        send(browser, url, "How do I activate my new card?", key=key)
        error = WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".turn.bot .error"))
        assert "rate limit" in error[0].text
    finally:
        stop_api(process)
