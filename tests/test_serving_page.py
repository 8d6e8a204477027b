"""The web page in headless Chromium (Debian's, driven by Playwright): submit a prompt, watch the job's
progress bar move and its live preview appear (from the job's Server-Sent Events stream), see the finished
video play in the gallery, delete it; the page at phone width."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.serving_helpers import Gate, ThreadServer
from wanpipe.serving.app import create_app
from wanpipe.serving.manager import JobManager
from wanpipe.serving.step_gate import StepGate
from wanpipe.serving.store import JobStore

CHROMIUM = os.environ.get("WANPIPE_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = os.environ.get("WANPIPE_PAGE_SCREENSHOT")  # also save the screenshot here (docs/img/page.png)


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
    # The worker's step gate holds the job until the page has shown each stage, however fast or slow
    # the machine is.
    manager = JobManager(JobStore(tmp_path / "out"), lambda: wan_pipe, model_name="wan-tiny")
    gate = Gate(tmp_path / "gate")
    manager.step_gate = StepGate(gate.folder)
    with ThreadServer(create_app(manager)) as srv:
        assert manager.wait_ready(60)
        srv.gate = gate
        srv.manager = manager
        try:
            yield srv
        finally:
            gate.open()


def test_the_page_shows_progress_and_a_preview_then_plays_the_video(page_server, tmp_path: Path) -> None:
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required"],
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(60_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('wan-tiny')")
            assert page.input_value("#width") == "832"  # the checkpoint's defaults fill the fields
            # a text-to-video model: no image, last-image, video or Animate uploads
            for field in ("#image-field", "#last-image-field", "#video-field", "#animate-fields"):
                assert page.is_hidden(field), field
            assert page.locator("#preset option").first.text_content() == "none"

            page.fill("#prompt", "a cat walks on the grass")
            page.fill("#width", "32")
            page.fill("#height", "32")
            page.fill("#num_frames", "5")
            page.click("#advanced summary")
            page.fill("#negative_prompt", "blurred")
            page.fill("#steps", "6")
            page.fill("#guidance", "4.5")
            page.fill("#shift", "3")
            page.fill("#seed", "42")
            page.click("#submit")

            card = page.locator(".card").first
            card.wait_for()
            video_id = card.get_attribute("data-id")
            # Record every value the job's progress bar shows (the worker is held before its first step).
            page.evaluate(
                """() => {
                    window.seenProgress = [];
                    const bar = document.querySelector('.card .bar');
                    new MutationObserver(() => window.seenProgress.push(bar.value))
                        .observe(bar, {attributes: true, attributeFilter: ['value']});
                    window.seenProgress.push(bar.value);
                }"""
            )
            page_server.gate.hold_at(3)  # half-way: the bar and the preview must show before it goes on
            page.wait_for_function("() => window.seenProgress.some(v => v > 0 && v < 100)")
            page.wait_for_function(
                "() => { const i = document.querySelector('.card img.preview'); return i && i.naturalWidth > 0; }"
            )
            assert "step 3/6" in card.locator(".status").text_content()
            page.screenshot(path=str(tmp_path / "page-running.png"))
            page_server.gate.open()
            page.wait_for_function(
                """() => { const v = document.querySelector('.card video.player');
                           return v && v.readyState >= 2 && !v.paused && v.currentTime > 0; }"""
            )
            seen = page.evaluate("window.seenProgress")
            assert any(0 < value < 100 for value in seen), seen  # the bar moved while it ran
            assert seen == sorted(seen), seen
            assert card.locator(".status").text_content() == "completed"
            size = page.evaluate(
                "[document.querySelector('.card video').videoWidth, document.querySelector('.card video').videoHeight]"
            )
            assert size == [32, 32]
            job = httpx.get(f"{page_server.url}/v1/videos/{video_id}", timeout=30).json()
            params = job["parameters"]
            assert (params["guidance_scale"], params["flow_shift"], params["seed"]) == (4.5, 3.0, 42)
            assert params["negative_prompt"] == "blurred" and params["num_inference_steps"] == 6
            page.screenshot(path=str(tmp_path / "page.png"))

            # phone width: nothing wider than the window
            page.set_viewport_size({"width": 390, "height": 844})
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            assert page.evaluate("document.querySelector('.card').getBoundingClientRect().width") <= 390
            page.screenshot(path=str(tmp_path / "page-phone.png"), full_page=True)

            card.locator("button.remove").click()
            page.wait_for_function("document.querySelectorAll('.card').length === 0")
            assert httpx.get(f"{page_server.url}/v1/videos/{video_id}", timeout=30).status_code == 404
            assert errors == []
        finally:
            browser.close()


@pytest.mark.skipif(
    not SCREENSHOT, reason="makes docs/img/page.png: set WANPIPE_PAGE_SCREENSHOT=docs/img/page.png"
)
def test_the_readme_screenshot(page_server, tmp_path: Path) -> None:
    """A finished job playing and a running one with its live preview, as README's picture."""
    sync_playwright = _browser_or_skip()
    http = httpx.Client(base_url=page_server.url, timeout=60)
    done = {"prompt": "a lighthouse on a cliff at dusk, waves below", "size": "128x80", "num_frames": 9}
    job = http.post("/v1/videos", json={**done, "num_inference_steps": 4, "seed": 1}).json()
    page_server.gate.allow(4)
    from tests.serving_helpers import wait_until

    wait_until(lambda: http.get(f"/v1/videos/{job['id']}").json()["status"] == "completed", 60, "completion")
    running = {"prompt": "a red fox trots through fresh snow at dawn", "size": "128x80", "num_frames": 9}
    http.post("/v1/videos", json={**running, "num_inference_steps": 10, "seed": 2})
    page_server.gate.hold_at(4 + 6)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.set_default_timeout(60_000)
            page.goto(page_server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('wan-tiny')")
            page.fill("#prompt", "a paper boat drifting down a rainy street")
            page.wait_for_function(
                "() => { const i = document.querySelector('.card img.preview'); return i && i.naturalWidth > 0; }"
            )
            page.wait_for_function(
                "() => { const v = document.querySelector('.card video.player'); return v && v.readyState >= 3 && v.duration > 0; }"
            )
            page.wait_for_timeout(1000)  # the player's loading spinner fades out
            assert page.locator(".card").count() == 2
            page.screenshot(path=str(tmp_path / "readme.png"))
        finally:
            browser.close()
    shutil.copyfile(tmp_path / "readme.png", SCREENSHOT)
    assert Path(SCREENSHOT).stat().st_size < 300_000
    page_server.gate.open()


def test_the_page_with_an_api_key_and_a_failed_job(wan_pipe, tmp_path: Path, monkeypatch) -> None:
    """With a key (which EventSource cannot send) the page reads the event streams through fetch and loads
    the video as a blob; a failed job's card shows its error."""
    sync_playwright = _browser_or_skip()
    manager = JobManager(JobStore(tmp_path / "out"), lambda: wan_pipe, model_name="wan-tiny")
    with ThreadServer(create_app(manager, api_key="page-key")) as srv, sync_playwright() as p:
        assert manager.wait_ready(60)
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required"],
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url + "/")
            page.wait_for_selector("#key-field:not([hidden])")
            page.fill("#api-key", "page-key")
            for field, value in (
                ("#prompt", "a kite"),
                ("#width", "32"),
                ("#height", "32"),
                ("#num_frames", "5"),
            ):
                page.fill(field, value)
            page.click("#advanced summary")
            page.fill("#steps", "2")
            page.click("#submit")
            page.wait_for_function(
                """() => { const v = document.querySelector('.card video.player');
                           return v && v.src.startsWith('blob:') && v.readyState >= 2; }"""
            )
            assert page.locator(".card .status").first.text_content() == "completed"

            def broken(*args, **kwargs):
                raise RuntimeError("the DiT fell over")

            monkeypatch.setattr(wan_pipe.executor, "execute", broken)
            page.fill("#prompt", "a kite that falls")
            page.click("#submit")
            page.wait_for_function(
                "document.querySelector('.card.status-failed .error:not([hidden])') !== null"
            )
            failed = page.locator(".card.status-failed")
            assert "the DiT fell over" in failed.locator(".error").text_content()
            assert failed.locator("button.remove").text_content() == "Delete"
            assert page.locator(".card").count() == 2
            assert errors == []
        finally:
            browser.close()
