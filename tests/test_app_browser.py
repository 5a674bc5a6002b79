"""The app in a real browser: Debian's Chromium, headless, driven by Playwright.

Upload a dataset zip, start a run, watch the progress reach the end, predict, download the ONNX bundle;
a malicious zip shows an error and the app keeps working. Screenshots land in the test's tmp folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@contextlib.contextmanager
def serving(state, root: Path):
    """The app over ``state`` served on loopback (files under ``root`` allowed); yields its URL, closes after."""
    from app.main import build_app

    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: apt-get install chromium (.ci/run does)"
    demo = build_app(state)
    demo.queue()
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, allowed_paths=[str(root)])
    try:
        yield demo.local_url
    finally:
        demo.close()
        state.jobs.close()


def open_page(p, url: str, height: int, **kw):
    """(browser, page): headless Chromium at ``url``, 1400 × ``height``, with a patient default timeout."""
    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
    page = browser.new_page(viewport={"width": 1400, "height": height}, **kw)
    page.set_default_timeout(120_000)  # actions wait long on a loaded box
    page.goto(url)
    return browser, page


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from app.main import AppState

    root = tmp_path_factory.mktemp("browser")
    state = AppState(root / "runs", root / "uploads")
    with serving(state, root) as url:
        yield url, state, root


def _dropdown(page, label: str, option: str) -> None:
    box = page.get_by_label(label).first
    box.click()
    box.fill(option.split(" ")[0])
    page.get_by_role("option", name=re.compile(re.escape(option.split(" ")[0]))).first.click()


def test_browser_upload_train_predict_export(served, aid_root: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)  # assertions wait like actions do (5 s is too short on a loaded box)
    url, state, root = served
    data = tmp_path / "mini.zip"
    with zipfile.ZipFile(data, "w") as zf:
        for c in ("Beach", "Forest", "Port"):
            for f in sorted((aid_root / c).glob("*.jpg"))[:16]:
                zf.write(f, f"mini/{c}/{f.name}")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escape.jpg", b"x")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as p:
        browser, page = open_page(p, url, 1800, accept_downloads=True)
        expect(page.get_by_text("vision_peft").first).to_be_visible()
        tab = page.get_by_role("tabpanel").first

        # a malicious zip: readable error, nothing extracted, the page keeps working
        tab.locator("input[type=file]").first.set_input_files(str(evil))
        expect(page.get_by_text(re.compile("escapes the upload folder")).first).to_be_visible()
        page.screenshot(path=str(shots / "1-malicious-zip.png"), full_page=True)
        assert not (root / "escape.jpg").exists() and not (root.parent / "escape.jpg").exists()

        # reload the page (the app re-attaches), then upload the real dataset: class counts appear
        page.reload()
        tab = page.get_by_role("tabpanel").first
        tab.locator("input[type=file]").first.set_input_files(str(data))
        expect(tab.get_by_label("dataset used")).to_have_value(re.compile(r"mini$"))
        expect(tab.get_by_role("gridcell", name="Forest").first).to_be_attached()
        page.screenshot(path=str(shots / "2-uploaded.png"), full_page=True)

        _dropdown(tab, "recipe (tasks/*.yaml)", "classification-tiny")
        _dropdown(tab, "backbone", "timm:test_vit")
        tab.get_by_label("epochs").fill("2")
        tab.get_by_role("button", name="Start").click()
        expect(tab.get_by_text(re.compile(r"done, step (\d+) / \1 \(100 %\)"))).to_be_visible(timeout=240_000)
        page.screenshot(path=str(shots / "3-trained.png"), full_page=True)
        expect(tab.get_by_label("CLI command that reproduces this run")).to_have_value(re.compile("vision_peft train"))

        # predict with the finished run
        tab.get_by_role("button", name="Refresh runs").click()
        job_id = state.jobs.list()[-1].id
        _dropdown(tab, "finished run", job_id)
        img = sorted((aid_root / "Beach").glob("*.jpg"))[-1]
        tab.locator("input[type=file]").nth(1).set_input_files(str(img))
        expect(tab.get_by_text(re.compile(r'"label": "(Beach|Forest|Port)"')).first).to_be_visible()
        page.screenshot(path=str(shots / "4-predicted.png"), full_page=True)

        # export and download the bundle
        tab.get_by_role("button", name="Export ONNX bundle").click()
        link = tab.get_by_role("row", name=re.compile(r"bundle\.zip")).get_by_role("link")
        expect(link).to_be_visible(timeout=240_000)
        with page.expect_download() as dl:
            link.click()
        saved = tmp_path / "bundle.zip"
        dl.value.save_as(saved)
        page.screenshot(path=str(shots / "5-exported.png"), full_page=True)
        browser.close()
    with zipfile.ZipFile(saved) as zf:
        assert {"model.onnx", "manifest.json", "parity.json"} <= set(zf.namelist())
    assert len(list(shots.glob("*.png"))) == 5
    print(f"screenshots: {shots}")
