"""The Runs tab and the Start form in a real browser (Debian's Chromium, headless, Playwright).

Two real tiny runs are listed, both are chosen and their curves overlay; a page reload re-attaches (the rows and the
chosen runs come back); choosing a recipe fills the Start form with the recipe's values. Screenshots land in the
test's tmp folder; the last ones are copied to bench/results/app_runs_tab.png and bench/results/app_start_form.png.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from tests.test_app_browser import open_page, serving  # noqa: E402
from tests.test_app_runs import RECIPE, cli_train  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


@pytest.fixture(scope="module")
def served(tmp_path_factory, aid_root: Path):
    from app.main import AppState

    root = tmp_path_factory.mktemp("browser_runs")
    names = ["tiny-a", "tiny-b"]
    cli_train(root / "runs", names[0])
    cli_train(root / "runs", names[1], "--train.lr=0.005", "--train.epochs=3")
    state = AppState(root / "runs", root / "uploads")
    with serving(state, root) as url:
        yield url, state, names


def _choose(page, elem_id: str, option: str) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(option)
    page.get_by_role("option", name=re.compile(f"^{re.escape(option)}")).first.click()


def _tab(page, name: str) -> None:
    """Open the tab ``name``: in the tab bar, or behind "More tabs" when the bar is full."""
    page.get_by_role("tab").first.wait_for()
    tab = page.get_by_role("tab", name=name, exact=True)
    if tab.count() and tab.first.is_visible():
        tab.first.click()
        return
    page.get_by_role("button", name="More tabs").click()
    page.locator(".overflow-dropdown button", has_text=name).first.click()


def _open_runs_tab(page, names: list[str]) -> None:
    from playwright.sync_api import expect

    _tab(page, "Runs")
    for n in names:
        expect(page.locator("#runs-table").get_by_role("gridcell", name=n, exact=True).first).to_be_visible()


def _expect_overlay(page, before: str | None = None) -> str:
    """The curves figure is drawn (a new image when ``before`` was the last one); returns its source."""
    from playwright.sync_api import expect

    img = page.locator("#runs-curves img").first
    expect(img).to_be_visible()
    if before is not None:
        expect(img).not_to_have_attribute("src", before)
    page.wait_for_timeout(1000)  # let it settle for the screenshot
    return img.get_attribute("src")


def test_browser_runs_tab_and_start_form(served, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    from app.catalog import recipes_for, task_view
    from app.main import recipe_form
    from vision_peft.recipe import find_recipe

    expect.set_options(timeout=60_000)
    url, state, names = served
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as p:
        browser, page = open_page(p, url, 1500)
        _open_runs_tab(page, names)
        pick = page.locator("#runs-pick")
        expect(pick.get_by_text(names[1], exact=True).first).to_be_visible()  # nothing chosen yet: the newest run
        one = _expect_overlay(page)
        pick.get_by_role("button", name="Clear").click()
        before = _stored(page)
        for n in names:
            _choose(page, "runs-pick", n)
        page.keyboard.press("Escape")
        for n in names:
            expect(pick.get_by_text(n, exact=True).first).to_be_visible()
        both = _expect_overlay(page, one)  # redrawn with both runs' curves
        page.screenshot(path=str(shots / "1-runs-selected.png"), full_page=True)

        # a reload re-attaches: the rows come back and so do the chosen runs and their curves
        _wait_stored_settles(page, before)  # the choice has reached the browser storage (no fixed sleep)
        page.reload()
        _open_runs_tab(page, names)
        for n in names:  # the rows come back
            expect(page.get_by_role("gridcell", name=n, exact=True).first).to_be_visible()
        for n in names:  # … and so do the chosen runs (from the browser's storage only) and their curves
            expect(page.locator("#runs-pick").get_by_text(n, exact=True).first).to_be_visible(timeout=20_000)
        assert _expect_overlay(page) == both  # the same two runs' curves again
        page.screenshot(path=str(shots / "2-runs-after-reload.png"), full_page=True)

        # the Start form: the first recipe's values on load, another recipe's when it is chosen
        _tab(page, task_view("classification").title)
        first = recipe_form(recipes_for("classification")[0])
        expect(page.locator("#classification-epochs input")).to_have_value(str(first["epochs"]))
        _choose(page, "classification-recipe", RECIPE)
        raw = yaml.safe_load(find_recipe(RECIPE).read_text())["train"]
        expect(page.locator("#classification-epochs input")).to_have_value(str(raw["epochs"]))
        expect(page.locator("#classification-batch input")).to_have_value(str(raw["batch_size"]))
        expect(page.locator("#classification-lr input")).to_have_value(re.compile(rf"^{raw['lr']:g}$|^{raw['lr']}$"))
        spec = yaml.safe_load(find_recipe(RECIPE).read_text())["backbone"]["name"]
        expect(page.locator("#classification-backbone input")).to_have_value(re.compile(re.escape(spec)))
        expect(page.locator("#classification-device input")).to_have_value(raw["device"])
        expect(page.get_by_text("0 = recipe")).to_have_count(0)
        page.screenshot(path=str(shots / "3-start-form.png"), full_page=False)
        browser.close()
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shots / "2-runs-after-reload.png", RESULTS / "app_runs_tab.png")
    shutil.copy(shots / "3-start-form.png", RESULTS / "app_start_form.png")
    print(f"screenshots: {shots}")


def _stored(page) -> str | None:
    """The Runs tab's saved choice as the browser holds it (gr.BrowserState: encrypted, so compared, not read)."""
    from app.runs_tab import SELECTION_KEY

    return page.evaluate("k => window.localStorage.getItem(k)", SELECTION_KEY)


def _wait_stored_settles(page, before: str | None, timeout_s: float = 90.0) -> None:
    """Wait until the saved choice differs from ``before`` and has not changed for 3 s (a loaded box delays the
    events that write it)."""
    import time

    deadline, last, since = time.time() + timeout_s, _stored(page), time.time()
    while time.time() < deadline:
        page.wait_for_timeout(500)
        now = _stored(page)
        if now != last:
            last, since = now, time.time()
        elif now is not None and now != before and time.time() - since >= 3:
            return
    raise AssertionError(f"the Runs tab's choice never settled in localStorage within {timeout_s:.0f} s: {last!r}")

