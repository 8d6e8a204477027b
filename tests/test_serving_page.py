"""The web page in headless Chromium (Debian's, driven by Playwright): submit a prompt, watch the progress
bar move, see the finished video playing, find the job in the list."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.serving_helpers import Gate, ThreadServer
from wanpipe.serving.app import create_app
from wanpipe.serving.manager import JobManager
from wanpipe.serving.step_gate import StepGate
from wanpipe.serving.store import JobStore

CHROMIUM = os.environ.get("WANPIPE_TEST_CHROMIUM", "/usr/bin/chromium")


def _browser_or_skip():
    """Playwright and Chromium; a missing one skips locally, and fails in CI (which installs both)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or shutil.which(CHROMIUM) is None:
        message = f"needs the playwright package and Chromium at {CHROMIUM} (.ci/run installs both)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright


@pytest.fixture
def page_server(wan_pipe, tmp_path: Path):
    # The worker's step gate holds the job half-way until the page has shown a progress between 0 and
    # 100, however fast or slow the machine is.
    manager = JobManager(JobStore(tmp_path / "out"), lambda: wan_pipe, model_name="wan-tiny")
    gate = Gate(tmp_path / "gate")
    manager.step_gate = StepGate(gate.folder)
    with ThreadServer(create_app(manager)) as srv:
        assert manager.wait_ready(60)
        srv.gate = gate
        try:
            yield srv
        finally:
            gate.open()


def test_the_page_generates_and_plays_a_video(page_server, tmp_path: Path) -> None:
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required"],
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('wan-tiny')")
            assert page.input_value("#width") == "832"  # the checkpoint's defaults fill the fields
            assert page.is_hidden("#image-field")  # a text-to-video model: no image upload

            # Record every progress value the bar shows.
            page.evaluate(
                """() => {
                    window.seenProgress = [];
                    const bar = document.getElementById('progress');
                    new MutationObserver(() => window.seenProgress.push(bar.value))
                        .observe(bar, {attributes: true, attributeFilter: ['value']});
                }"""
            )
            page.fill("#prompt", "a cat walks on the grass")
            page.fill("#negative_prompt", "blurred")
            page.fill("#width", "32")
            page.fill("#height", "32")
            page.fill("#num_frames", "5")
            page.fill("#steps", "100")
            page.fill("#seed", "42")
            page.click("#submit")

            page.wait_for_selector("#current:not([hidden])")
            page_server.gate.hold_at(50)  # half-way: the bar must show it before the job goes on
            page.wait_for_function("() => window.seenProgress.some(v => v > 0 && v < 100)")
            page_server.gate.open()
            page.wait_for_function(
                """() => { const v = document.getElementById('player');
                           return !v.hidden && v.readyState >= 2 && !v.paused && v.currentTime > 0; }"""
            )
            seen = page.evaluate("window.seenProgress")
            assert any(0 < value < 100 for value in seen), seen  # the bar moved while it ran
            assert seen[-1] == 100
            assert "completed" in page.text_content("#progress-text")
            size = page.evaluate(
                "[document.getElementById('player').videoWidth, document.getElementById('player').videoHeight]"
            )
            assert size == [32, 32]
            link = page.locator("#download")
            assert link.is_visible() and link.get_attribute("download").endswith(".mp4")
            with page.expect_download() as download_info:
                link.click()
            saved = tmp_path / "download.mp4"
            download_info.value.save_as(saved)
            assert saved.read_bytes()[4:8] == b"ftyp"

            page.wait_for_function("document.querySelectorAll('#jobs tr').length >= 1")
            row = page.text_content("#jobs tr")
            assert "a cat walks on the grass" in row and "completed" in row and "32x32" in row
            page.screenshot(path=str(tmp_path / "page.png"))
            assert errors == []
        finally:
            browser.close()
