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
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from app.errors import friendly  # noqa: E402
from app.jobs import JobManager  # noqa: E402
from app.panels import predict_panel  # noqa: E402
from app.previews import dataset_preview  # noqa: E402
from app.uploads import UploadError, confine, extract_zip  # noqa: E402
from vision_peft.config import REPO_ROOT, data_root, find_recipe, recipe_dirs  # noqa: E402

TASK_TABS = [  # (registry name, tab title, issue that brings it)
    ("classification", "Classification", 2),
    ("fewshot", "Few-shot remote sensing", 3),
    ("refseg", "Referring segmentation", 4),
    ("pointcloud", "Point clouds", 5),
    ("diffusion", "Diffusion", 6),
]
LOOPBACK = ("127.0.0.1", "localhost", "::1")
PREVIEW_LABELS = {  # task -> (dataset table headers, table label, gallery label); see app/previews.py
    "classification": (["class", "files"], "class counts", "samples (one per class)"),
    "pointcloud": (["class", "train", "test"], "shapes per class and split", "sample shapes (one per class, 3/4 view)"),
    "refseg": (["statistic", "value"], "dataset summary", "targets: mask overlay + phrase"),
}


def weights_status(spec: str) -> str:
    """'available' or how to provide the weights, without building the model."""
    from vision_peft.backbones.base import WeightsNotFoundError
    from vision_peft.config import BackboneConfig

    family, _, arg = spec.partition(":")
    cfg = BackboneConfig(name=spec)
    try:
        if family == "effnet_lite0":
            from vision_peft.backbones.effnet_lite import find_weights

            find_weights(cfg)
        elif family == "minilm":
            from vision_peft.backbones.minilm import find_model_dir

            find_model_dir(cfg)
        elif family == "timm":
            from vision_peft.backbones.timm_models import _hf_cached_file, _local_candidates

            if arg.startswith("test_"):
                return "random weights (tests)"
            if not any(c.is_file() for c in _local_candidates(arg)) and _hf_cached_file(arg) is None:
                return f"weights missing: put them at {_local_candidates(arg)[0]} or allow downloads"
        elif family in ("open_clip", "open_clip_text"):
            if arg.startswith("vp-tiny"):
                return "random weights (tests)"
            return "needs a local checkpoint: backbone.weights=<file> or $VISION_PEFT_WEIGHTS/open_clip/"
        elif family in ("pointnet",):
            from vision_peft.config import weights_root

            f = weights_root() / "pointnet-modelnet40" / "pointnet_classifier_modelnet40.safetensors"
            return "available" if f.is_file() else f"weights missing: {f}"
        return "available"
    except WeightsNotFoundError as e:
        return f"weights missing: {e}"


def recipes_for(task: str) -> list[str]:
    out = []
    for d in recipe_dirs():
        for f in sorted(d.glob("*.yaml")) if d.is_dir() else []:
            try:
                data = yaml.safe_load(f.read_text()) or {}
            except yaml.YAMLError:
                continue
            t = data.get("task")
            name = t if isinstance(t, str) else (t or {}).get("name")
            if name == task and f.stem not in out:
                out.append(f.stem)
    return out


def devices() -> list[str]:
    try:
        import torch

        return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    except ImportError:
        return ["cpu"]


class AppState:
    """Roots and the job manager shared by every session of the page."""

    def __init__(self, runs_root: str | Path, uploads_root: str | Path, data: str | Path | None = None) -> None:
        self.runs_root = Path(runs_root).resolve()
        self.uploads_root = Path(uploads_root).resolve()
        self.uploads_root.mkdir(parents=True, exist_ok=True)
        self.data_root = Path(data or data_root()).resolve()
        self.jobs = JobManager(self.runs_root, env={"PYTHONPATH": str(REPO_ROOT)})
        self._loaded: dict[str, Any] = {}
        self._load_lock = threading.Lock()  # concurrent requests for one run load it once

    def runs_of(self, task: str) -> list[str]:
        out = []
        for d in sorted(self.runs_root.iterdir()) if self.runs_root.exists() else []:
            cfg = d / "config.json"
            if d.is_dir() and (d / "adapter.safetensors").exists() and cfg.exists():
                if json.loads(cfg.read_text())["config"]["task"]["name"] == task:
                    out.append(d.name)
        return out

    def run_dir(self, name: str) -> Path:
        if not name:
            raise ValueError("choose a finished run first")
        linked = self.runs_root / name
        if name not in (".", "..") and Path(name).name == name and linked.is_symlink() and linked.is_dir():
            return linked  # a run the operator linked into the runs root (runs_of lists it): trusted, no traversal
        return confine(name, self.runs_root)

    def model(self, run_name: str):
        """A loaded run (cached): prediction happens here, training never does."""
        from vision_peft.predict import load_run

        path = self.run_dir(run_name)
        if not (path / "adapter.safetensors").is_file():
            raise ValueError(f"{run_name} is not a finished run (no adapter.safetensors in {path})")
        key = f"{path}:{(path / 'adapter.safetensors').stat().st_mtime}"
        with self._load_lock:
            if key not in self._loaded:
                self._loaded = {key: load_run(path, "cpu")}  # one run in memory at a time
            return self._loaded[key]


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
    from vision_peft.adapters import ADAPTERS
    from vision_peft.backbones import BACKBONES
    from vision_peft.tasks import TASKS

    with gr.Blocks(title="vision_peft") as demo:
        gr.Markdown("# vision_peft\nTrain a few parameters on a frozen backbone, predict, export to ONNX.")
        for task, title, issue in TASK_TABS:
            with gr.Tab(title):
                if task not in TASKS:
                    gr.Markdown(f"**Unavailable**: the `{task}` task has not landed in this version (issue {issue}).")
                    continue
                _task_tab(demo, state, task, ADAPTERS, BACKBONES)
    return demo


def _task_tab(demo: gr.Blocks, state: AppState, task: str, ADAPTERS, BACKBONES) -> None:
    recipes = recipes_for(task)
    specs = ["effnet_lite0", "timm:test_vit", "timm:vit_small_patch16_224", "open_clip:ViT-B-32@openai"]
    if task == "pointcloud":
        specs = [s for s in BACKBONES.names() if s.startswith("point")]
    choices = [(f"{s} — {weights_status(s)}", s) for s in specs]
    with gr.Row():
        recipe = gr.Dropdown(recipes, value=recipes[0] if recipes else None, label="recipe (tasks/*.yaml)")
        backbone = gr.Dropdown(choices, value=None, label="backbone (empty = the recipe's)")
        adapter = gr.Dropdown(ADAPTERS.names(), value=None, label="adapter (empty = the recipe's)")
        device = gr.Dropdown(devices(), value="cpu", label="device")
    with gr.Row():
        epochs = gr.Number(value=0, label="epochs (0 = recipe)", precision=0, minimum=0)
        batch = gr.Number(value=0, label="batch size (0 = recipe)", precision=0, minimum=0)
        lr = gr.Number(value=0, label="learning rate (0 = recipe)", minimum=0)
        max_steps = gr.Number(value=0, label="max steps (0 = no cap)", precision=0, minimum=0)
    with gr.Row():
        upload = gr.File(label="dataset zip (folder-per-class or the task's layout)", file_types=[".zip"])
        folder = gr.Textbox(label=f"…or a data folder on the server (inside {state.data_root})")
    data_path = gr.Textbox(label="dataset used", interactive=False)
    headers, table_label, gallery_label = PREVIEW_LABELS.get(task, PREVIEW_LABELS["classification"])
    with gr.Row():
        counts = gr.Dataframe(headers=headers, label=table_label, interactive=False)
        gallery = gr.Gallery(label=gallery_label, columns=6, height=240)
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
        run = gr.Dropdown(  # value=None: no run preselected, so choosing one fires run.change (diffusion classes)
            state.runs_of(task), value=None, label="finished run", allow_custom_value=False
        )
        refresh = gr.Button("Refresh runs")
    predict_panel(task, state, run)
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
        columns, rows, items = dataset_preview(task, root)
        return str(root), pd.DataFrame(rows, columns=columns), items

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
        if spec:
            data["backbone"] = {**data.get("backbone", {}), "name": spec}
            if spec.startswith(("timm:test_", "open_clip:vp-tiny")):
                data["backbone"]["pretrained"] = False
        if adapter_name and adapter_name != data["adapter"]["name"]:
            data["adapter"] = {"name": adapter_name}
        train = data.setdefault("train", {})
        train.setdefault("log_every", 1)  # a point per step for the live loss plot
        for key, val in (("epochs", n_epochs), ("batch_size", n_batch), ("lr", rate), ("max_steps", steps)):
            if val not in (None, "", 0) and val == val:  # 0, empty and NaN keep the recipe's value
                train[key] = int(val) if key != "lr" else float(val)
        from vision_peft.config import RunConfig

        RunConfig.from_dict({**data, "output": {}})  # validate here: errors show in the page, not in a log
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
