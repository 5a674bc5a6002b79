"""The Sweeps tab in a real browser (Debian's Chromium, headless, Playwright).

A real tiny sweep (classification-tiny: timm's test ViT on real AID images, two methods, two trials of two steps)
is started from the page; the live leaderboard and the Pareto plot show the finished trials and agree with the
sweep folder's leaderboard.csv; a page reload re-attaches (the same sweep is shown, the form
holds its settings); Export best gives the bundle.
The last screenshot is copied to bench/results/app_sweeps_tab.png.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from tests.test_app_browser import open_page, serving  # noqa: E402
from tests.test_app_browser_runs import RESULTS, _choose, _tab  # noqa: E402

RECIPE = "classification-tiny"
METHODS = ["linear", "lora"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, aid_root: Path):
    from app.main import AppState
    from app.sweeps_tab import manager

    root = tmp_path_factory.mktemp("browser_sweeps")
    state = AppState(root / "runs", root / "uploads", data=aid_root.parent)
    with serving(state, root) as url:
        try:
            yield url, state
        finally:
            manager(state).close()


def _number(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")


def _csv_rows(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "leaderboard.csv", newline="") as f:
        return list(csv.DictReader(f))


def _expect_table_matches(page, sweep_dir: Path) -> list[dict[str, str]]:
    """Each of the CSV's rows is a page row (rank, trial, method, hyperparameters, state), and no other rows."""
    from playwright.sync_api import expect

    rows = _csv_rows(sweep_dir)
    table = page.locator("#sweeps-leaderboard")
    for r in rows:  # a page row's name is its cells: rank, trial, method, hyperparameters, state, …
        name = re.compile(rf"^{r['rank']} {r['trial']} {r['method']} {re.escape(r['hyperparameters'])} {r['state']}\b")
        expect(table.get_by_role("row", name=name)).to_have_count(1)
    expect(table.get_by_role("row")).to_have_count(len(rows) + 1)  # the header and the CSV's rows, no others
    return rows


def test_browser_sweeps_tab_start_leaderboard_reattach_export(served, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    from app.sweeps_tab import manager

    expect.set_options(timeout=60_000)
    url, state = served
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as p:
        browser, page = open_page(p, url, 2000)
        _tab(page, "Sweeps")
        _choose(page, "sweeps-recipe", RECIPE)
        _choose(page, "sweeps-data", "aid")
        page.keyboard.press("Escape")
        group = page.locator("#sweeps-methods")
        for m in METHODS:  # the recipe's own method and linear come ticked; make sure of both
            box = group.get_by_label(m, exact=True)
            expect(box).to_be_visible()
            if not box.is_checked():
                box.check()
            expect(box).to_be_checked()
        _number(page, "sweeps-trials", 2)
        _number(page, "sweeps-epochs", 1)
        _number(page, "sweeps-steps", 2)
        expect(page.get_by_text("max_steps: 2").first).to_be_visible()  # the space file shown follows the form
        page.locator("#sweeps-start").click()

        status = page.locator("#sweep-status")
        expect(status).to_contain_text("running", timeout=120_000)
        sid = manager(state).current()
        assert sid and sid.startswith(RECIPE)
        sweep_dir = Path(manager(state).get(sid).sweep_dir)
        expect(status).to_contain_text(re.compile(r"done, trials 2 / 2"), timeout=600_000)
        pareto = page.locator("#sweeps-pareto img").first
        expect(pareto).to_be_visible()
        rows = _expect_table_matches(page, sweep_dir)
        assert sorted(r["method"] for r in rows) == METHODS and {r["state"] for r in rows} == {"complete"}
        page.wait_for_timeout(1500)  # the image settles for the screenshot
        page.screenshot(path=str(shots / "1-sweep-done.png"), full_page=True)

        # a reload re-attaches: the same sweep is selected and shown, its table and plot come back
        page.reload()
        _tab(page, "Sweeps")
        expect(page.locator("#sweeps-pick input").first).to_have_value(sid)
        expect(page.locator("#sweep-status")).to_contain_text(sid)
        expect(page.locator("#sweeps-pareto img").first).to_be_visible()
        _expect_table_matches(page, sweep_dir)
        # … and the form shows that sweep's settings again, not its defaults (6 trials, recipe epochs, no cap)
        for elem_id, value in (("sweeps-trials", "2"), ("sweeps-epochs", "1"), ("sweeps-steps", "2")):
            expect(page.locator(f"#{elem_id} input").first).to_have_value(value)
        expect(page.locator("#sweeps-data input").first).to_have_value("aid")
        for m in METHODS:
            expect(page.locator("#sweeps-methods").get_by_label(m, exact=True)).to_be_checked()
        expect(page.get_by_text("max_steps: 2").first).to_be_visible()  # the space shown is the sweep's

        # Export best: the best trial's bundle is offered as a zip, and its folder is on disk
        page.locator("#sweeps-export").click()
        link = page.locator("#sweeps-bundle").get_by_role("row", name=re.compile(r"best-bundle\.zip")).get_by_role("link")
        expect(link).to_be_visible(timeout=300_000)
        exported = [d for d in (sweep_dir / "trials").glob("*/export") if (d / "model.onnx").is_file()]
        assert len(exported) == 1 and (exported[0] / "manifest.json").is_file()
        page.wait_for_timeout(1500)
        page.screenshot(path=str(shots / "2-after-reload-exported.png"), full_page=True)
        browser.close()
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shots / "2-after-reload-exported.png", RESULTS / "app_sweeps_tab.png")
    print(f"screenshots: {shots}")
