"""Screenshots of every app tab after a real prediction on the shared data (issue 7 acceptance).

Links finished real runs into a fresh runs root, starts the app on a free loopback port (``app.main.launch``),
and drives Debian's Chromium (headless, Playwright) through each tab: preview a dataset from a server folder
under ``$VISION_PEFT_DATA``, pick the finished run, predict on real shared data, take a full-page screenshot.
Any error toast in the page fails the tab. Prints a table: tab, screenshot, what the prediction returned, seconds.

    export VISION_PEFT_DATA=/work/shared/data VISION_PEFT_WEIGHTS=/work/shared/weights
    python bench/app_screenshots.py                     # screenshots land in runs/app-screenshots/
    python bench/app_screenshots.py --run refseg=runs/other-detris --tabs refseg
    python bench/app_screenshots.py --run multilabel=runs/ml-lora --tabs multilabel   # any registered task

Each tab is driven by its predict-panel kind (the runtime's ``panel``), so a new task needs only a ``--run``
(and ``--preview`` for a dataset table).

CPU only; on a loaded machine loading one model can take 30 s, hence the long timeouts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import sys
import time
import zipfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
RUNS = {  # task -> finished real run on the shared data
    "classification": "runs/speed-lora",  # EfficientNet-Lite0 + LoRA on AID (30 classes)
    "fewshot": "runs/fewshot-bench/mvp-1shot-per",  # MVP meta-trained on the AID base classes
    "pointcloud": "runs/deploy-bench/pointcloud-k16",  # PPT on ModelNet10, 16 shots per class
    "refseg": "runs/bench-refseg/detris",  # DETRIS on coco128-seg (generated phrases)
    "diffusion": "runs/bench-diffusion-aid/adapt-sara",  # SaRA-adapted latent DiT, AID novel classes
}
PREVIEW = {  # task -> (server folder under the data root, a table cell the preview must show); --preview adds more
    "classification": ("aid", "Beach"),
    "fewshot": ("aid", "Airport"),
    "pointcloud": ("modelnet10", "chair"),
    "refseg": ("coco128-seg", "coco128_seg"),
    "diffusion": ("aid", "Mountain"),
}
MS = 1000
NATURAL_SIZE = "i => [i.naturalWidth, i.naturalHeight]"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def link_runs(root: Path, runs: dict[str, Path]) -> None:
    """A fresh runs root holding one symlink per finished run (named after the run's folder)."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for task, run in runs.items():
        cfg = run / "config.json"
        if not (run / "adapter.safetensors").is_file() or not cfg.is_file():
            raise SystemExit(f"{run} is not a finished run (needs config.json and adapter.safetensors)")
        found = json.loads(cfg.read_text())["config"]["task"]["name"]
        if found != task:
            raise SystemExit(f"{run} is a {found} run, not {task}")
        (root / run.name).symlink_to(run.resolve(), target_is_directory=True)


def run_config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def title(task: str) -> str:
    """The task's tab title, as the app writes it."""
    from app.catalog import task_view

    return task_view(task).title


def panel(task: str) -> str:
    """The predict-panel kind of the task's tab (its runtime's declared ``panel``)."""
    from app.catalog import task_view

    return task_view(task).panel


# -- inputs: real shared data -----------------------------------------------------------------------------------
def test_image(run: Path, data: Path, prefer: str = "Beach") -> Path:
    """An image from the run's held-out test split, from a ``prefer`` class folder when there is one (an AID
    Beach image when the run has no test split)."""
    split = run / "split.json"
    test = json.loads(split.read_text()).get("test", []) if split.is_file() else []
    test = [p if isinstance(p, str) else p[0] for p in test]  # entries: a path, or [path, label]
    preferred = [p for p in test if Path(p).parent.name == prefer]
    if preferred or test:
        return Path((preferred or test)[0])
    return sorted((data / "aid" / prefer).glob("*.jpg"))[-1]


def fewshot_inputs(run: Path, data: Path, out: Path, ways: int, shots: int) -> tuple[Path, list[Path], list[str]]:
    """A support zip of ``ways`` novel classes × ``shots`` AID images; queries: one unseen image of the first two."""
    novel = run_config(run)["task_state"]["class_split"]["novel"][:ways]
    support = out / "fewshot-support.zip"
    queries = []
    with zipfile.ZipFile(support, "w") as zf:
        for c in novel:
            files = sorted((data / "aid" / c).glob("*.jpg"))
            for f in files[:shots]:
                zf.write(f, f"support/{c}/{f.name}")
            if len(queries) < 2:
                queries.append(files[-1])  # never in the support set
    return support, queries, novel


# -- page helpers -------------------------------------------------------------------------------------------------
def _errors(page) -> list[str]:
    return [t.strip() for t in page.locator(".toast-body.error").all_inner_texts() if t.strip()]


def wait_until(page, ok, what: str, timeout_s: float) -> float:
    """Poll ``ok()`` until true; an error toast or the timeout raises. Returns the seconds waited.

    ``ok`` may also be a dict of named checks: the timeout message then names the ones still false.
    """
    checks = ok if isinstance(ok, dict) else {what: ok}
    t0 = time.perf_counter()
    while True:
        errs = _errors(page)
        if errs:
            raise RuntimeError(f"{what}: the page shows an error: {errs[0]}")
        pending = [name for name, check in checks.items() if not check()]
        if not pending:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"{what}: still waiting for {', '.join(pending)} after {timeout_s:.0f} s")
        page.wait_for_timeout(500)


def block(tab, label: str | re.Pattern):
    """The component whose label reads ``label`` (gradio wraps each component in a div.block)."""
    return tab.locator("div.block").filter(has=tab.page.get_by_text(label, exact=isinstance(label, str))).last


def choose(tab, label: str, option: str) -> None:
    """Pick ``option`` in the dropdown labelled ``label``."""
    box = tab.get_by_label(label, exact=True).first
    box.click()
    box.fill(option)
    tab.page.get_by_role("option", name=option, exact=True).first.click()


def images_loaded(page) -> None:
    page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=60 * MS)


# -- one tab ----------------------------------------------------------------------------------------------------
def preview(page, tab, folder: str, cell: str, timeout_s: float) -> float:
    """Type a server folder, press Enter, wait for the table and the gallery."""
    box = tab.get_by_label(re.compile(r"data folder on the server")).first
    box.fill(folder)
    box.press("Enter")
    used = tab.get_by_label("dataset used", exact=True).first

    checks = {
        "dataset used": lambda: used.input_value().endswith("/" + folder),
        f"table row {cell}": lambda: tab.get_by_role("gridcell", name=cell, exact=True).count() > 0,
        "gallery thumbnails": lambda: tab.locator(".thumbnail-item img").count() > 0,
    }
    return wait_until(page, checks, f"preview of {folder}", timeout_s)


def predict(page, tab, task: str, run_name: str, inputs: dict, timeout_s: float) -> tuple[str, float]:
    """Run one prediction in the task's panel (driven by its panel kind); returns (what it returned, seconds)."""
    choose(tab, "finished run", run_name)
    return DRIVERS[panel(task)](page, tab, inputs, timeout_s)


def _ranked_images(page, tab, inputs: dict, timeout_s: float) -> tuple[str, float]:
    text = tab.inner_text
    t0 = time.perf_counter()
    block(tab, "input files").locator("input[type=file]").set_input_files(str(inputs["image"]))
    wait_until(page, lambda: '"label"' in text(), "image predict", timeout_s)
    return f"{Path(inputs['image']).name} → {_top(text())}", time.perf_counter() - t0


def _support_query(page, tab, inputs: dict, timeout_s: float) -> tuple[str, float]:
    text = tab.inner_text
    block(tab, "support set zip (one sub-folder of images per class)").locator("input[type=file]").set_input_files(
        str(inputs["support"])
    )
    block(tab, "query images").locator("input[type=file]").set_input_files([str(q) for q in inputs["queries"]])
    wait_until(page, lambda: block(tab, "query images").locator("img, a, td").count() > 0, "queries", 60)
    t0 = time.perf_counter()
    tab.get_by_role("button", name="Classify queries").click()
    wait_until(page, lambda: '"label"' in text(), "few-shot classify", timeout_s)
    captions = block(tab, "queries → predicted class").locator(".caption-label").all_inner_texts()
    got = ", ".join(f"{q.parent.name} → {c}" for q, c in zip(inputs["queries"], captions))
    return f"{len(inputs['ways'])}-way × {inputs['shots']}-shot: {got}", time.perf_counter() - t0


def _ranked_points(page, tab, inputs: dict, timeout_s: float) -> tuple[str, float]:
    text = tab.inner_text
    t0 = time.perf_counter()
    block(tab, re.compile(r"point file \(")).locator("input[type=file]").set_input_files(str(inputs["points"]))
    wait_until(page, lambda: '"label"' in text(), "point-cloud classify", timeout_s)
    return f"{Path(inputs['points']).name} → {_top(text())}", time.perf_counter() - t0


def _image_phrase_mask(page, tab, inputs: dict, timeout_s: float) -> tuple[str, float]:
    text = tab.inner_text
    block(tab, "image").locator("input[type=file]").set_input_files(str(inputs["image"]))
    wait_until(page, lambda: block(tab, "image").locator("img").count() > 0, "image upload", 60)
    tab.get_by_label("referring phrase", exact=True).fill(inputs["phrase"])
    t0 = time.perf_counter()
    tab.get_by_role("button", name="Segment").click()
    wait_until(page, lambda: '"mask_area_px"' in text(), "segment", timeout_s)
    area = re.search(r'"mask_area_px"[^0-9]*(\d+)', text()).group(1)
    frac = float(re.search(r'"area_fraction"[^0-9]*([0-9.eE-]+)', text()).group(1))
    w, h = block(tab, "predicted mask (overlay)").locator("img").first.evaluate(NATURAL_SIZE)
    return (
        f'{Path(inputs["image"]).name} "{inputs["phrase"]}" → mask {area} px ({frac:.1%} of the {w}×{h} image)',
        time.perf_counter() - t0,
    )


def _class_grid(page, tab, inputs: dict, timeout_s: float) -> tuple[str, float]:
    text = tab.inner_text
    for c in inputs["classes"]:
        choose(tab, "classes (empty = every class of the run)", c)
    page.keyboard.press("Escape")
    for label, value in (("images per class", inputs["per_class"]), ("DDIM steps", inputs["steps"])):
        num = tab.get_by_label(f"number input for {label}")
        num.fill(str(value))
        num.press("Tab")
    t0 = time.perf_counter()
    tab.get_by_role("button", name="Generate").click()
    wait_until(page, lambda: '"per_class"' in text(), "generate", timeout_s)
    img = block(tab, "samples (one row per class)").locator("img").first
    w, h = img.evaluate(NATURAL_SIZE)
    return (
        f"{len(inputs['classes'])} classes ({', '.join(inputs['classes'])}) × {inputs['per_class']} images, "
        f"{inputs['steps']} steps → {len(inputs['classes'])}×{inputs['per_class']} grid, {w}×{h} px",
        time.perf_counter() - t0,
    )


DRIVERS = {  # predict-panel kind (app/panels.py PANELS) -> how the bench drives it
    "ranked_images": _ranked_images,
    "support_query": _support_query,
    "ranked_points": _ranked_points,
    "image_phrase_mask": _image_phrase_mask,
    "class_grid": _class_grid,
}


def _top(text: str) -> str:
    label = re.search(r'"label"[^"]*"([^"]+)"', text).group(1)
    prob = float(re.search(r'"prob"[^0-9]*([0-9.eE-]+)', text).group(1))
    return f"{label} ({prob:.1%})"


# -- main -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/app-screenshots", help="screenshots (and the support zip) go here")
    ap.add_argument("--runs-root", default=None, help="runs root to build (default: <out>/runs)")
    ap.add_argument("--run", action="append", default=[], metavar="TASK=DIR", help="a task's run (any registered task)")
    ap.add_argument(
        "--preview",
        action="append",
        default=[],
        metavar="TASK=FOLDER:CELL",
        help="preview FOLDER (under the data root) in TASK's tab and wait for a table cell CELL; tasks without one "
        "skip the preview",
    )
    ap.add_argument("--tabs", default=",".join(RUNS), help="comma-separated tasks to shoot")
    ap.add_argument("--refseg-image", default="coco128-seg/images/000000000154.jpg", help="under the data root")
    ap.add_argument("--refseg-phrase", default="the biggest zebra")
    ap.add_argument("--points", default="modelnet10/chair/test/chair_0890.pcd", help="under the data root")
    ap.add_argument("--diffusion-classes", default="Beach,Mountain")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one preview or prediction may take")
    args = ap.parse_args(argv)

    from vision_peft.paths import data_root

    data = data_root().resolve()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):  # no stale screenshot from an earlier run
        old.unlink()
    shutil.rmtree(out / "uploads", ignore_errors=True)  # support sets extracted by an earlier run
    runs = {t: Path(p) for t, p in RUNS.items()}
    from vision_peft.tasks import TASKS

    for item in args.run:
        task, _, path = item.partition("=")
        if task not in TASKS or not path:
            raise SystemExit(f"--run wants TASK=DIR with TASK in {', '.join(TASKS.names())}; got {item!r}")
        runs[task] = Path(path)
    for item in args.preview:
        task, _, rest = item.partition("=")
        folder, _, cell = rest.partition(":")
        if task not in TASKS or not folder or not cell:
            raise SystemExit(f"--preview wants TASK=FOLDER:CELL with TASK in {', '.join(TASKS.names())}; got {item!r}")
        PREVIEW[task] = (folder, cell)
    tasks = [t for t in args.tabs.split(",") if t]
    missing = [t for t in tasks if t not in runs]
    if missing:
        raise SystemExit(f"no run for tab(s) {', '.join(missing)}: pass --run TASK=DIR")
    runs = {t: runs[t].resolve() for t in tasks}
    runs_root = Path(args.runs_root or out / "runs").resolve()
    link_runs(runs_root, runs)
    if not Path(CHROMIUM).exists():
        raise SystemExit("Debian's chromium is missing: apt-get install chromium")

    inputs: dict[str, dict] = {}
    for task, run in runs.items():
        kind = panel(task)
        if kind == "ranked_images":
            inputs[task] = {"image": test_image(run, data)}
        elif kind == "support_query":
            support, queries, ways = fewshot_inputs(run, data, out, ways=5, shots=2)
            inputs[task] = {"support": support, "queries": queries, "ways": ways, "shots": 2}
        elif kind == "ranked_points":
            inputs[task] = {"points": data / args.points}
        elif kind == "image_phrase_mask":
            inputs[task] = {"image": data / args.refseg_image, "phrase": args.refseg_phrase}
        elif kind == "class_grid":
            inputs[task] = {"classes": args.diffusion_classes.split(","), "per_class": 2, "steps": 10}
        else:
            raise SystemExit(f"{task}: this bench does not drive panel kind {kind!r}; known: {', '.join(DRIVERS)}")
    for task, values in inputs.items():
        for v in values.values():
            if isinstance(v, Path) and not v.exists():
                raise SystemExit(f"{task}: input {v} does not exist")

    from playwright.sync_api import sync_playwright

    from app.main import launch

    port = free_port()
    demo, state = launch(port=port, runs_root=str(runs_root), uploads_root=str(out / "uploads"), block=False)
    url = f"http://127.0.0.1:{port}/"
    rows, failures = [], []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.set_default_timeout(120 * MS)
            page.goto(url)
            page.get_by_role("tab", name=title(tasks[0])).wait_for()
            for task in tasks:
                t0 = time.perf_counter()
                shot = out / f"{task}.png"
                try:
                    page.get_by_role("tab", name=title(task), exact=True).click()
                    tab = page.locator("[role=tabpanel]:visible").first
                    if task in PREVIEW:
                        preview(page, tab, *PREVIEW[task], args.timeout)
                    got, pred_s = predict(page, tab, task, runs[task].name, inputs[task], args.timeout)
                    images_loaded(page)
                    page.wait_for_timeout(500)  # let the last component settle before the picture
                    if _errors(page):
                        raise RuntimeError(f"error toast: {_errors(page)[0]}")
                    page.screenshot(path=str(shot), full_page=True)
                    rows.append((task, shot, got, pred_s, time.perf_counter() - t0))
                except Exception as e:  # noqa: BLE001 - keep the evidence, go on with the next tab
                    page.screenshot(path=str(out / f"{task}-FAILED.png"), full_page=True)
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    failures.append(f"{task}: {type(e).__name__}: {e}")
                    rows.append(
                        (
                            task,
                            out / f"{task}-FAILED.png",
                            f"FAILED: {type(e).__name__}: {first}",
                            float("nan"),
                            time.perf_counter() - t0,
                        )
                    )
                page.reload()  # a clean page (no leftover toasts) for the next tab
                page.get_by_role("tab", name=title(tasks[0])).wait_for()
            browser.close()
    finally:
        demo.close()
        state.jobs.close()

    print(f"\napp on {url}, runs root {runs_root} (data {data})\n")
    print("| tab | screenshot | prediction | predict s | tab s |")
    print("|---|---|---|---|---|")
    for task, shot, got, pred_s, tab_s in rows:
        rel = os.path.relpath(shot, REPO) if shot.is_relative_to(REPO) else shot
        print(f"| {title(task)} | {rel} | {got} | {pred_s:.1f} | {tab_s:.1f} |")
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
