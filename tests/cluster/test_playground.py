"""The web playground end to end in a real browser: the local cluster serves the page at `/`,
Debian's headless Chromium (driven by Playwright, never a downloaded browser) enters the token,
gets a field error for a bad size and a category for a blocked prompt, then types a prompt, follows
the progress bar (SSE) to 100 %, plays the finished MP4 and sees the clip verified in the gallery.

Needs the system packages `chromium` and `chromium-driver` (.ci/run installs them). The page's
screenshot is kept under the test's tmp dir; CINERAY_UPDATE_DOCS=1 also copies it to
docs/playground.png (the README's picture).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "playground.png"
RENDER_TIMEOUT_MS = 480_000  # a 17-frame clip on a shared 2-core machine, through every stage


@pytest.fixture(scope="module")
def playground(ray_cluster, tmp_path_factory):
    """(base URL, token) of the whole cineray Serve app (shipped tiny checkpoint) on a free
    loopback port, deployed the way `cineray serve` does it."""
    from ray import serve

    from cineray.cluster.app import AppArgs
    from cineray.cluster.local import Client, deploy, free_port

    args = AppArgs(storage_root=str(tmp_path_factory.mktemp("serve") / "data"),
                   token=secrets.token_urlsafe(16), denoiser_max_replicas=1, max_replicas=1,
                   num_cpus=0.05, log_encoding="TEXT")
    url, token = deploy(args, port=free_port(), name="playground")
    Client(url, token).wait_ready(timeout=300)
    yield url, token
    serve.shutdown()


@pytest.fixture(scope="module")
def page():
    """A fresh headless Chromium (own profile folder) page, closed after the module."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver")
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900})
        page = context.pages[0] if context.pages else context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))  # uncaught exceptions in app.js
        page.js_errors = errors
        yield page
        context.close()


def open_with_token(page, url: str, token: str) -> None:
    """Load the page and enter the token the way a person does (type it, press Enter)."""
    page.goto(url + "/")
    unlabelled = page.evaluate("[...document.querySelectorAll('input, select, textarea')]"
                               ".filter(e => !e.labels.length).map(e => e.id)")
    assert unlabelled == [], f"form controls without a label: {unlabelled}"
    page.get_by_label("API token").fill(token)
    page.get_by_label("API token").press("Enter")
    page.wait_for_function("document.getElementById('token-state').textContent.includes('saved')")
    assert page.evaluate("sessionStorage.getItem('cineray.token')") == token


def check_field_error(page, field_id: str, error_id: str, *needles: str) -> str:
    """The error is shown right under its field (same .field block), names the problem, and the
    field is marked invalid; returns the message."""
    error = page.locator(f"#{error_id}")
    error.wait_for(state="visible", timeout=30_000)
    text = error.text_content()
    for needle in needles:
        assert needle in text, text
    assert page.locator(f"#{field_id}").get_attribute("aria-invalid") == "true"
    same_block = page.evaluate(
        f"document.getElementById('{error_id}').closest('.field') === "
        f"document.getElementById('{field_id}').closest('.field')")
    field_box, error_box = (page.locator(f"#{i}").bounding_box() for i in (field_id, error_id))
    assert same_block and 0 <= error_box["y"] - (field_box["y"] + field_box["height"]) < 40
    return text


def bad_requests_show_their_field(page) -> None:
    """A 422 for size "33x7" lands under Size; a blocked prompt shows its category under Prompt;
    an unreadable image is explained under the image field; none starts a job."""
    page.get_by_label("Prompt", exact=True).fill("a red ball falling")
    page.get_by_label("Size (W×H)").fill("33x7")
    page.get_by_role("button", name="Generate").click()
    check_field_error(page, "size", "err-size", "33")
    assert page.locator("#job").is_hidden() and page.locator("#err-form").is_hidden()

    page.get_by_label("Size (W×H)").fill("32x32")
    page.get_by_label("Prompt", exact=True).fill("a red ball falling into a beheading")
    page.get_by_role("button", name="Generate").click()
    check_field_error(page, "prompt", "err-prompt", "blocked", "graphic_violence")
    assert page.locator("#err-size").is_hidden() and page.locator("#job").is_hidden()

    # The first-frame image travels as a data: URL (input_reference); an unreadable one is
    # explained under the file field.
    page.get_by_label("Prompt", exact=True).fill("a red ball falling")
    page.get_by_label("First frame (optional image: image-to-video)").set_input_files(
        files=[{"name": "broken.png", "mimeType": "image/png", "buffer": b"not a png"}])
    page.get_by_role("button", name="Generate").click()
    check_field_error(page, "image", "err-input_reference", "PNG")
    page.get_by_label("First frame (optional image: image-to-video)").set_input_files([])
    assert page.locator("#job").is_hidden()


def render_a_clip(page) -> dict:
    """Type a prompt with the keyboard, submit with Ctrl+Enter, follow the bar to 100 %, then
    play the result. Returns what the page saw."""
    page.locator("summary", has_text="Sampler").click()
    page.get_by_label("Steps").fill("2")  # tiny and fast; the default steps look better
    page.get_by_label("Seed").fill("7")
    prompt = page.get_by_label("Prompt", exact=True)
    prompt.fill("")
    prompt.press_sequentially("a blue square moving right")
    # Record every value the bar takes, to show SSE fed it (not one jump at the end).
    page.evaluate("""() => { window.seen = []; const bar = document.getElementById('progress');
        new MutationObserver(() => window.seen.push(bar.value)).observe(bar,
            {attributes: true}); setInterval(() => window.seen.push(bar.value), 100);
        window.previewSeen = false; new MutationObserver(() => { window.previewSeen ||=
            !document.getElementById('preview-box').hidden; }).observe(
            document.getElementById('preview-box'), {attributes: true}); }""")
    prompt.press("Control+Enter")
    page.locator("#job").wait_for(state="visible", timeout=30_000)
    page.wait_for_function(  # the terminal event: completed, failed or cancelled
        "['completed', 'failed', 'cancelled'].includes("
        "document.getElementById('progress').dataset.status)", timeout=RENDER_TIMEOUT_MS)
    status = page.locator("#progress").get_attribute("data-status")
    assert status == "completed", f"job {status}: {page.locator('#err-form').text_content()}"
    assert page.evaluate("document.getElementById('progress').value") == 100
    page.wait_for_function(
        "document.getElementById('result').readyState >= 2", timeout=60_000)  # frame decoded
    video = page.evaluate("""async () => { const v = document.getElementById('result');
        v.muted = true; await v.play(); await new Promise(r => setTimeout(r, 300));
        return {duration: v.duration, width: v.videoWidth, height: v.videoHeight,
                time: v.currentTime, ready: v.readyState, src: v.currentSrc,
                mp4: v.canPlayType('video/mp4; codecs="avc1.42E01E"')}; }""")
    video["seen"] = page.evaluate("window.seen")
    video["preview_seen"] = page.evaluate("window.previewSeen")
    video["job"] = page.locator("#job").get_attribute("data-job")
    video["download"] = page.locator("#download").get_attribute("href")
    return video


def test_playground_renders_plays_and_verifies(playground, page, tmp_path):
    url, token = playground
    open_with_token(page, url, token)
    bad_requests_show_their_field(page)

    video = render_a_clip(page)
    assert video["mp4"] in ("probably", "maybe"), video
    assert video["width"] == 32 and video["height"] == 32, video
    assert 1.5 < video["duration"] < 3.0, video  # 17 frames at 8 fps = 2.125 s
    assert video["time"] > 0, video  # it really played
    seen = video["seen"]
    assert seen == sorted(seen) and seen[-1] == 100, seen
    assert video["preview_seen"], "the preview never appeared before the final video"
    data = page.request.get(url + video["download"]).body()  # the download link: signed MP4
    assert data[4:8] == b"ftyp" and len(data) > 1000

    card = page.locator(f'#gallery li[data-job="{video["job"]}"]')
    card.locator('dl.verify[data-state="done"]').wait_for(timeout=120_000)
    facts = card.locator("dl.verify").inner_text()
    assert "found, payload " in facts and "C2PA" in facts and "Valid" in facts, facts
    assert "Payload matches manifest\nyes" in facts, facts

    page.wait_for_function("[...document.querySelectorAll('#gallery video')]"
                           ".every(v => v.readyState >= 2)", timeout=60_000)
    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
    if os.environ.get("CINERAY_UPDATE_DOCS") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)
    assert page.js_errors == [], page.js_errors
