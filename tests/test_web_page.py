"""The end-user page in a real browser: Debian's chromium, headless, with a fake microphone playing espeak-ng speech.

What a person does: press Start, speak (the fake microphone loops a WAV: one final per loop), read
the finals, correct one, accept another, pick an alternative reading of a third, stop; or upload a
file; or, on a server with a tokens file, give a token first. The checks are what the page shows and
what the feedback store holds afterwards. The server serves the small CTC model (models/base: quick to
start and to decode on a busy CI machine), which hears espeak-ng approximately ("the quick grown fox
jumps over the lazy dog"): the tests assert on words it reliably gets and correct the rest.

A screenshot of the page after a correction is saved (tmp_path, and $VOXLOOP_SCREENSHOT_DIR when set:
docs/img/web-page.png was made that way).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import soundfile as sf
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from support import TWO_TENANTS_TOKENS
from voxloop.core.store import FeedbackKind, FeedbackStore
from voxloop.core.text import normalize_text
from voxloop.server.app import BackgroundServer
from voxloop.server.config import BASE_MODEL_DIR, ServerConfig
from web_support import chromium, espeak_wav

pytestmark = pytest.mark.slow  # a browser and a real model

SPOKEN = "the quick brown fox jumps over the lazy dog"
HEARD_RELIABLY = {"quick", "fox", "jumps", "over"}  # what the small CTC model gets from espeak-ng every time
UPLOADED = "the weather is nice today"
UPLOAD_HEARD_RELIABLY = {"is", "today"}  # "nice" comes out as "ice" about as often
WAIT_S = 90  # a final per ~6 s loop of the fake microphone; generous for a loaded 2-core machine
SCREENSHOT_ENV = "VOXLOOP_SCREENSHOT_DIR"
TOKENS_TOML = TWO_TENANTS_TOKENS


@pytest.fixture
def served(tmp_path):
    """Start a server with the small CTC model and its page: served(**config fields) -> (page url, store file)."""
    running = []

    def start(**fields) -> tuple[str, Path]:
        # The small CTC model (models/base): the expected words below are what it hears.
        config = ServerConfig(port=0, metrics_port=0, data_dir=tmp_path / "data", shipped_model_dir=BASE_MODEL_DIR,
                              **fields)
        server = BackgroundServer(config)
        running.append(server)
        port = server.call(server.server.start_web(0))
        return f"http://127.0.0.1:{port}/", config.data_dir / "feedback.sqlite3"

    yield start
    for server in running:
        server.stop()


@pytest.fixture
def browser(tmp_path):
    """browser(fake microphone WAV or None) -> a selenium driver of headless chromium (quit after the test)."""
    drivers = []

    def start(microphone: Path | None = None):
        driver = chromium(tmp_path / f"profile-{len(drivers)}", microphone)
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        javascript_errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
                             and e.get("source") == "javascript"]
        driver.quit()
        assert not javascript_errors, javascript_errors


def by_testid(root, testid: str):
    return root.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')


def finals(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, '[data-testid="final"]')


def words_of(final) -> set[str]:
    return set(by_testid(final, "transcript").text.split())


def wait_for(driver, condition, what: str, timeout_s: float = WAIT_S):
    def attempt(d):
        try:
            return condition(d)
        except StaleElementReferenceException:
            return False

    return WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(attempt, message=f"waiting for {what}")


def wait_for_final(driver, after: int, what: str, accept=lambda final: True):
    """The first final past the first `after` that `accept`s."""
    return wait_for(driver, lambda d: next((f for f in finals(d)[after:] if accept(f)), None), what)


def wait_until_connected(driver) -> str:
    return wait_for(driver, lambda d: (v := by_testid(d, "model-version").text) and not v.startswith("(") and v,
                    "the model version", timeout_s=30)


def save_screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copy(path, Path(os.environ[SCREENSHOT_ENV]) / name)
    return path


def stored_feedback(store_file: Path) -> dict[str, object]:
    """utterance id -> (feedback record, utterance record) of the current feedback in the store."""
    with FeedbackStore.open(store_file) as store:
        return {i.feedback.utterance_id: i for i in store.pending_feedback(1000, include_flagged=True)}


def test_speak_then_correct_accept_and_choose_and_the_store_holds_them(served, browser, tmp_path):
    url, store_file = served()
    driver = browser(espeak_wav(tmp_path / "fox.wav", SPOKEN))
    driver.get(url)
    version = wait_until_connected(driver)
    assert by_testid(driver, "token").is_displayed() is False  # anonymous server: no token field

    by_testid(driver, "start").click()
    wait_for(driver, lambda d: by_testid(d, "interim").text.strip(), "interim text")
    first = wait_for_final(driver, 0, "a final with the spoken words", lambda f: words_of(f) >= HEARD_RELIABLY)
    heard = by_testid(first, "transcript").text
    shaded = first.find_elements(By.CSS_SELECTOR, ".word[data-confidence]")
    assert [w.text for w in shaded] == heard.split()  # every word carries its confidence
    assert first.get_attribute("data-utterance-id")

    # Correct it in place.
    by_testid(first, "edit").click()
    field = by_testid(first, "correction-input")
    assert field.get_attribute("value") == heard and field == driver.switch_to.active_element
    field.clear()
    field.send_keys(SPOKEN)
    by_testid(first, "submit-correction").click()
    receipt = wait_for(driver, lambda d: "Correction saved" in (t := by_testid(first, "receipt").text) and t,
                       "the correction's receipt")
    assert by_testid(first, "transcript").text == SPOKEN and not field.is_displayed()

    # Accept the next final, pick another reading of the one after.
    count = len(finals(driver))
    second = wait_for_final(driver, count, "a second final")
    by_testid(second, "accept").click()
    wait_for(driver, lambda d: "Marked right" in by_testid(second, "receipt").text, "the acceptance's receipt")
    count = len(finals(driver))
    third = wait_for_final(driver, count, "a final with alternatives",
                           lambda f: f.find_elements(By.CSS_SELECTOR, '[data-testid="alternatives"] button'))
    alternative = by_testid(third, "alternatives").find_element(By.CSS_SELECTOR, "button")
    chosen_text = alternative.text
    assert alternative.get_attribute("data-index") == "1"
    alternative.click()
    wait_for(driver, lambda d: "Chose" in by_testid(third, "receipt").text, "the choice's receipt")
    assert by_testid(third, "transcript").text == chosen_text
    wait_for_final(driver, len(finals(driver)), "one more final, left as heard")  # its words shaded by confidence
    screenshot = save_screenshot(driver, tmp_path, "web-page.png")  # after a correction, an acceptance, a choice

    by_testid(driver, "stop").click()
    wait_for(driver, lambda d: by_testid(d, "start").is_enabled(), "Start enabled again after Stop")

    stored = stored_feedback(store_file)
    correction = stored[first.get_attribute("data-utterance-id")]
    assert correction.feedback.kind is FeedbackKind.CORRECTION and correction.feedback.corrected_text == SPOKEN
    assert correction.utterance.hypothesis == normalize_text(heard) and correction.utterance.model_version == version
    assert f"{correction.feedback.reward:.2f}".replace("-", "\u2212") in receipt  # the page showed the reward
    assert stored[second.get_attribute("data-utterance-id")].feedback.kind is FeedbackKind.ACCEPTANCE
    choice = stored[third.get_attribute("data-utterance-id")]
    assert choice.feedback.kind is FeedbackKind.CHOICE and choice.feedback.chosen_index == 1
    assert choice.utterance.alternatives[1] == chosen_text
    assert screenshot.is_file()


def test_uploading_a_flac_file_shows_its_final(served, browser, tmp_path):
    url, store_file = served()
    driver = browser()
    driver.get(url)
    wait_until_connected(driver)
    flac = espeak_wav(tmp_path / "weather.flac", UPLOADED, trail_s=0.5)
    by_testid(driver, "upload").send_keys(str(flac))
    final = wait_for_final(driver, 0, "the file's final", lambda f: words_of(f) >= UPLOAD_HEARD_RELIABLY)
    wait_for(driver, lambda d: by_testid(d, "status").text == "File recognized.", "the end of the file")
    assert len(finals(driver)) == 1
    by_testid(final, "accept").click()
    wait_for(driver, lambda d: "Marked right" in by_testid(final, "receipt").text, "the acceptance's receipt")
    item = stored_feedback(store_file)[final.get_attribute("data-utterance-id")]
    assert item.utterance.hypothesis == by_testid(final, "transcript").text
    assert item.utterance.duration_s == pytest.approx(sf.info(flac).duration, abs=0.5)  # the whole file


def test_with_a_tokens_file_the_page_needs_a_token_and_refuses_another_tenants_utterance(served, browser, tmp_path):
    (tmp_path / "tokens.toml").write_text(TOKENS_TOML)
    url, store_file = served(tokens_file=tmp_path / "tokens.toml")
    driver = browser(espeak_wav(tmp_path / "fox.wav", SPOKEN))
    driver.get(url)

    # No token: the page says what to do, and Start does nothing else.
    token = by_testid(driver, "token")
    wait_for(driver, lambda d: token.is_displayed(), "the token field", timeout_s=30)
    wait_for(driver, lambda d: "access token" in by_testid(d, "error").text, "the token message", timeout_s=30)
    by_testid(driver, "start").click()
    wait_for(driver, lambda d: "access token" in by_testid(d, "error").text, "the token message after Start",
             timeout_s=30)
    assert by_testid(driver, "start").is_enabled() and not by_testid(driver, "stop").is_enabled()

    # A wrong token is not accepted; Alice's is, and recognition works.
    token.send_keys("tok-mallory", Keys.ENTER)
    wait_for(driver, lambda d: "access token was not accepted" in by_testid(d, "error").text, "the refusal",
             timeout_s=30)
    token.clear()
    token.send_keys("tok-alice", Keys.ENTER)
    wait_until_connected(driver)
    assert by_testid(driver, "error").text == ""
    by_testid(driver, "start").click()
    final = wait_for_final(driver, 0, "alice's final", lambda f: words_of(f) >= HEARD_RELIABLY)
    by_testid(driver, "stop").click()
    wait_for(driver, lambda d: by_testid(d, "start").is_enabled(), "Start enabled again after Stop")
    utterance_id = final.get_attribute("data-utterance-id")

    # Bob, of another tenant, on the same page: refused.
    token.clear()
    token.send_keys("tok-bob", Keys.ENTER)
    wait_for(driver, lambda d: by_testid(d, "status").text == "Connected.", "bob connected", timeout_s=30)
    by_testid(final, "edit").click()
    field = by_testid(final, "correction-input")
    field.clear()
    field.send_keys("bob says otherwise", Keys.ENTER)  # the keyboard submits too
    refused = wait_for(driver, lambda d: "Refused" in (t := by_testid(final, "receipt").text) and t,
                       "the refusal", timeout_s=30)
    assert "belongs to another tenant" in refused
    assert utterance_id not in stored_feedback(store_file)

    # Alice again: her correction is taken.
    token.clear()
    token.send_keys("tok-alice", Keys.ENTER)
    wait_for(driver, lambda d: by_testid(d, "status").text == "Connected.", "alice connected again", timeout_s=30)
    field.send_keys(Keys.ENTER)
    wait_for(driver, lambda d: "Correction saved" in by_testid(final, "receipt").text, "alice's correction",
             timeout_s=30)
    item = stored_feedback(store_file)[utterance_id]
    assert (item.utterance.tenant, item.feedback.submitted_by) == ("acme", "alice")
    assert item.feedback.corrected_text == "bob says otherwise"
