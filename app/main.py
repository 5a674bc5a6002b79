"""The vision_peft browser app (Gradio): upload data → train → predict → export, one tab per task.

The app never trains in its own process: Start writes a recipe and runs ``python -m vision_peft train``
as a child process (app/jobs.py); progress, the loss plot and the log come from the run directory, so the
CLI and the app cannot drift apart and a page reload re-attaches. Export also runs as a child process.
Only this package imports gradio. Start it with ``python -m vision_peft app`` (127.0.0.1:7860).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from app.catalog import (  # noqa: E402
    TaskView,
    backbone_specs,
    is_test_backbone,
    recipes_for,
    run_task,
    task_views,
    weights_status,
)
from app.errors import friendly  # noqa: E402
from app.jobs import JobManager  # noqa: E402
from app.panels import predict_panel  # noqa: E402
from app.previews import dataset_preview, preview_kind  # noqa: E402
from app.runs_tab import runs_tab, selection_store  # noqa: E402
from app.sweeps_tab import sweeps_tab  # noqa: E402
from app.uploads import UploadError, confine, extract_zip  # noqa: E402
from vision_peft.paths import REPO_ROOT, data_root  # noqa: E402
from vision_peft.recipe import build_run_config, find_recipe  # noqa: E402

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def devices() -> list[str]:
    try:
        import torch

        return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    except ImportError:
        return ["cpu"]


def form_device(train_device: str, available: list[str]) -> str:
    """The device slot for a recipe's ``train.device``: its GPU when the recipe asks for one (``cuda``, ``cuda:N``,
    ``auto``) and it exists here, else ``cpu``."""
    gpus = [d for d in available if d.startswith("cuda:")]
    if train_device.startswith("cuda:"):
        return train_device if train_device in gpus else "cpu"
    return gpus[0] if train_device in ("cuda", "auto") and gpus else "cpu"


def recipe_form(recipe_name: str, available: list[str] | None = None) -> dict[str, Any]:
    """The Start form's values for ``recipe_name``: what the resolved recipe trains with (its defaults filled in),
    so an unchanged form trains exactly the recipe. ``max_steps`` None means no cap.

    Raises:
        vision_peft.config.ConfigError: the recipe is missing or invalid (the message names it and the key).
    """
    data = yaml.safe_load(find_recipe(recipe_name).read_text())
    cfg = build_run_config({**data, "output": {}})
    t = cfg.train
    return {
        "backbone": cfg.backbone.name,
        "adapter": cfg.adapter.name,
        "device": form_device(t.device, devices() if available is None else available),
        "epochs": t.epochs,
        "batch_size": t.batch_size,
        "lr": t.lr,
        "max_steps": t.max_steps,
    }


class AppState:
    """Roots and the job manager shared by every session of the page."""

    def __init__(self, runs_root: str | Path, uploads_root: str | Path, data: str | Path | None = None) -> None:
        self.runs_root = Path(runs_root).resolve()
        self.uploads_root = Path(uploads_root).resolve()
        self.uploads_root.mkdir(parents=True, exist_ok=True)
        self.data_root = Path(data or data_root()).resolve()
        self.jobs = JobManager(self.runs_root, env={"PYTHONPATH": str(REPO_ROOT)})
        # finished runs for prediction: one built model per layout (at most 2, least recently used goes), runs of
        # one layout switch by loading their adapter tensors; concurrent requests for one run load it once
        self._switcher: Any = None
        self._load_lock = threading.Lock()

    def runs_of(self, task: str) -> list[str]:
        """Names of the finished runs of ``task`` in the runs root."""
        dirs = sorted(self.runs_root.iterdir()) if self.runs_root.exists() else []
        return [d.name for d in dirs if run_task(d) == task]

    def run_dir(self, name: str) -> Path:
        if not name:
            raise ValueError("choose a finished run first")
        linked = self.runs_root / name
        if name not in (".", "..") and Path(name).name == name and linked.is_symlink() and linked.is_dir():
            return linked  # a run the operator linked into the runs root (runs_of lists it): trusted, no traversal
        return confine(name, self.runs_root)

    @property
    def switcher(self):
        """The :class:`vision_peft.predict.RunSwitcher` holding the loaded runs (CPU, at most 2 layouts)."""
        with self._load_lock:
            if self._switcher is None:
                from vision_peft.predict import RunSwitcher

                self._switcher = RunSwitcher("cpu", max_layouts=2)
            return self._switcher

    def _finished(self, run_name: str) -> Path:
        path = self.run_dir(run_name)
        if not (path / "adapter.safetensors").is_file():
            raise ValueError(f"{run_name} is not a finished run (no adapter.safetensors in {path})")
        return path

    def model(self, run_name: str):
        """A loaded run (cached) as (config, task, model, info): prediction happens here, training never does. The
        model may be shared with other runs of its layout and holds this run's tensors until another of them is
        loaded; handlers predict inside :meth:`using` instead."""
        return self.switcher.load(self._finished(run_name))

    @contextmanager
    def using(self, run_name: str) -> Iterator[tuple]:
        """``with state.using(run) as (cfg, task, model, info):`` — the model holds ``run``'s tensors for the whole
        block, whatever other sessions pick meanwhile (a switch to another run of its layout waits for it)."""
        with self.switcher.use(self._finished(run_name)) as loaded:
            yield loaded


def progress_html(p: dict[str, Any]) -> str:
    step, total = p["step"], p["total"] or 0
    pct = 100 * step / total if total else 0
    status = p["job"]["status"]
    queue = ", ".join(p["queue"]) or "empty"
    return (
        f"<div><b>{p['job']['id']}</b> — {status}, step {step} / {total or '?'} ({pct:.0f} %)"
        f"<progress value='{step}' max='{max(total, 1)}' style='width:100%'></progress>"
        f"<small>queue: {queue}</small></div>"
    )


def build_app(state: AppState) -> gr.Blocks:
    """The page: one tab per registered task (``vision_peft.tasks.TASKS``), each built from its :class:`TaskView`."""
    from vision_peft.adapters import ADAPTERS

    with gr.Blocks(title="vision_peft") as demo:
        gr.Markdown("# vision_peft\nTrain a few parameters on a frozen backbone, predict, export to ONNX.")
        chosen_runs = selection_store()  # page level: mounted before the page-load event reads it
        for view in task_views():
            with gr.Tab(view.title, elem_id=f"{view.name}-tab"):
                gr.Markdown(f"`{view.name}`: {view.help}")
                _task_tab(demo, state, view, ADAPTERS)
        with gr.Tab("Runs", elem_id="runs-tab"):
            runs_tab(demo, state, chosen_runs)
        with gr.Tab("Sweeps", elem_id="sweeps-tab"):
            sweeps_tab(demo, state)
    return demo


def _task_tab(demo: gr.Blocks, state: AppState, view: TaskView, ADAPTERS) -> None:
    task = view.name
    recipes = recipes_for(task)
    choices = [(f"{s} — {weights_status(s)}", s) for s in backbone_specs(view)]
    preview = preview_kind(view.preview)
    available = devices()

    def form_updates(recipe_name: str | None) -> tuple:
        """The form's components showing ``recipe_name``'s values (the recipe's backbone joins the choices)."""
        f = recipe_form(recipe_name, available)
        specs = choices if f["backbone"] in [c[1] for c in choices] else [(f["backbone"], f["backbone"]), *choices]
        return (
            gr.Dropdown(choices=specs, value=f["backbone"]),
            gr.Dropdown(value=f["adapter"]),
            gr.Dropdown(value=f["device"]),
            f["epochs"],
            f["batch_size"],
            f["lr"],
            f["max_steps"],
        )

    try:
        first = recipe_form(recipes[0], available) if recipes else {}
    except (OSError, ValueError, yaml.YAMLError) as e:  # a broken first recipe: the page builds, Start says why
        first = {}
        print(f"vision_peft app: recipe {recipes[0]!r} of {task} cannot be read: {e}", file=sys.stderr)
    if first.get("backbone") and first["backbone"] not in [c[1] for c in choices]:
        choices = [(first["backbone"], first["backbone"]), *choices]
    with gr.Row():
        recipe = gr.Dropdown(
            recipes, value=recipes[0] if recipes else None, label="recipe (tasks/*.yaml)", elem_id=f"{task}-recipe"
        )
        backbone = gr.Dropdown(choices, value=first.get("backbone"), label="backbone", elem_id=f"{task}-backbone")
        adapter = gr.Dropdown(ADAPTERS.names(), value=first.get("adapter"), label="adapter", elem_id=f"{task}-adapter")
        device = gr.Dropdown(available, value=first.get("device", "cpu"), label="device", elem_id=f"{task}-device")
    with gr.Row():
        epochs = gr.Number(first.get("epochs"), label="epochs", precision=0, minimum=1, elem_id=f"{task}-epochs")
        batch = gr.Number(first.get("batch_size"), label="batch size", precision=0, minimum=1, elem_id=f"{task}-batch")
        lr = gr.Number(first.get("lr"), label="learning rate", minimum=0, elem_id=f"{task}-lr")
        max_steps = gr.Number(
            first.get("max_steps"), label="max steps (empty = no cap)", precision=0, minimum=0, elem_id=f"{task}-steps"
        )
    with gr.Row():
        upload = gr.File(label="dataset zip (folder-per-class or the task's layout)", file_types=[".zip"])
        folder = gr.Textbox(label=f"…or a data folder on the server (inside {state.data_root})")
    data_path = gr.Textbox(label="dataset used", interactive=False)
    with gr.Row(visible=preview.visible):
        counts = gr.Dataframe(headers=preview.headers or None, label=preview.table_label, interactive=False)
        gallery = gr.Gallery(label=preview.gallery_label, columns=6, height=240)
    with gr.Row():
        start = gr.Button("Start", variant="primary")
        stop = gr.Button("Stop", variant="stop")
        resume = gr.Button("Resume from checkpoint")
    job = gr.Dropdown([j.id for j in state.jobs.list() if j.task == task], label="job", allow_custom_value=True)
    bar = gr.HTML()
    with gr.Row():
        plot = gr.LinePlot(x="step", y="loss", title="training loss", height=220)
        log = gr.Textbox(label="log", lines=8, max_lines=12)
    command = gr.Textbox(label="CLI command that reproduces this run", interactive=False)
    gr.Markdown("### Predict and export")
    with gr.Row():
        run = gr.Dropdown(  # value=None: no run preselected, so choosing one fires run.change (class-grid classes)
            state.runs_of(task), value=None, label="finished run", allow_custom_value=False
        )
        refresh = gr.Button("Refresh runs")
    predict_panel(view, state, run)
    with gr.Row():
        export = gr.Button("Export ONNX bundle")
        bundle_file = gr.File(label="bundle (zip)")
        parity = gr.JSON(label="parity report")

    @friendly
    def on_data(zip_file, server_folder):
        if zip_file:
            root = extract_zip(zip_file if isinstance(zip_file, str) else zip_file.name, task, state.uploads_root)
        elif server_folder:
            root = confine(server_folder, state.data_root)
            if not root.is_dir():
                raise UploadError(f"{server_folder} is not a folder inside {state.data_root}")
        else:
            return "", None, []
        columns, rows, items = dataset_preview(view.preview, root)
        return str(root), pd.DataFrame(rows, columns=columns), items

    recipe.input(
        friendly(form_updates), [recipe], [backbone, adapter, device, epochs, batch, lr, max_steps],
        api_name=f"{task}_recipe",
    )  # fmt: skip
    upload.upload(on_data, [upload, folder], [data_path, counts, gallery], api_name=f"{task}_upload")
    folder.submit(on_data, [upload, folder], [data_path, counts, gallery], api_name=f"{task}_folder")

    @friendly
    def on_start(recipe_name, spec, adapter_name, dev, n_epochs, n_batch, rate, steps, dataset):
        if not recipe_name:
            raise ValueError("choose a recipe")
        data = yaml.safe_load(find_recipe(recipe_name).read_text())
        if dataset:
            data["task"]["data_root"] = dataset
            data["task"].pop("classes", None)
        if spec and spec != (data.get("backbone") or {}).get("name"):
            data["backbone"] = {**data.get("backbone", {}), "name": spec}
            if is_test_backbone(spec):
                data["backbone"]["pretrained"] = False
        if adapter_name and adapter_name != data["adapter"]["name"]:
            data["adapter"] = {"name": adapter_name}
        train = data.setdefault("train", {})
        train.setdefault("log_every", 1)  # a point per step for the live loss plot (logging only, same training)
        for key, val in (("epochs", n_epochs), ("batch_size", n_batch), ("lr", rate)):
            if val not in (None, "") and val == val:  # the form shows the recipe's values: used as shown
                train[key] = int(val) if key != "lr" else float(val)
            # empty (an API call that leaves it out) keeps the recipe's value
        train["max_steps"] = int(steps) if steps not in (None, "") and steps == steps and steps > 0 else None  # no cap
        build_run_config({**data, "output": {}})  # validate here: errors show in the page, not in a log
        j = state.jobs.submit(data, device=dev)
        ids = [x.id for x in state.jobs.list() if x.task == task]
        return gr.update(choices=ids, value=j.id), j.command_line

    start.click(
        on_start,
        [recipe, backbone, adapter, device, epochs, batch, lr, max_steps, data_path],
        [job, command],
        api_name=f"{task}_start",
    )

    @friendly
    def on_progress(job_id):
        if not job_id:
            running = [j for j in state.jobs.list() if j.task == task]
            if not running:
                return "", None, "", ""
            job_id = running[-1].id
        p = state.jobs.progress(job_id)
        df = pd.DataFrame({"step": p["steps"], "loss": p["losses"]})
        return progress_html(p), df, p["log"], p["command"]

    timer = gr.Timer(1.0)
    timer.tick(on_progress, [job], [bar, plot, log, command])
    job.change(on_progress, [job], [bar, plot, log, command], api_name=f"{task}_progress")

    @friendly
    def on_stop(job_id):
        if not job_id:
            raise ValueError("no job selected")
        j = state.jobs.stop(job_id)
        return f"{j.id}: {j.status}"

    stop.click(on_stop, [job], [log], api_name=f"{task}_stop")

    @friendly
    def on_resume(job_id):
        if not job_id:
            raise ValueError("no job selected")
        j = state.jobs.resume(job_id)
        return f"{j.id}: {j.status} (resuming)"

    resume.click(on_resume, [job], [log], api_name=f"{task}_resume")

    @friendly
    def on_jobs():
        ids = [j.id for j in state.jobs.list() if j.task == task]
        active = [j.id for j in state.jobs.list() if j.task == task and j.status in ("running", "queued")]
        return gr.update(choices=ids, value=(active or ids or [None])[-1]), gr.update(choices=state.runs_of(task))

    demo.load(on_jobs, None, [job, run], api_name=f"{task}_reattach")  # a page reload re-attaches
    refresh.click(lambda: gr.update(choices=state.runs_of(task)), None, [run], api_name=f"{task}_runs")

    @friendly
    def on_export(run_name):
        path = state.run_dir(run_name)
        out = path / "export"
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        res = subprocess.run(
            [sys.executable, "-m", "vision_peft", "export", str(path), "--bundle", str(out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
        )
        if res.returncode != 0:
            raise RuntimeError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "export failed")
        report = json.loads(res.stdout)
        archive = shutil.make_archive(str(Path(tempfile.mkdtemp()) / f"{path.name}-bundle"), "zip", out)
        return archive, report

    export.click(on_export, [run], [bundle_file, parity], api_name=f"{task}_export")


def launch(
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: str | None = None,
    runs_root: str = "runs",
    uploads_root: str | None = None,
    block: bool = True,
):
    """Start the app. Binding beyond loopback requires ``auth`` as ``user:password``."""
    if host not in LOOPBACK and not auth:
        raise ValueError(f"binding to {host} exposes the app beyond this machine; pass --auth user:password")
    creds = None
    if auth:
        user, _, pw = auth.partition(":")
        if not user or not pw:
            raise ValueError("--auth must look like user:password")
        creds = (user, pw)
    state = AppState(runs_root, uploads_root or Path(runs_root) / ".uploads")
    demo = build_app(state)
    demo.queue(default_concurrency_limit=4)
    demo.launch(
        server_name=host,
        server_port=port,
        auth=creds,
        prevent_thread_lock=not block,
        show_error=True,
        allowed_paths=[str(state.runs_root), str(state.uploads_root), str(state.data_root)],
    )
    return demo, state
