"""Predict panels by kind: what a task's ``predict`` needs as input, shown the way its output reads best.

A task's runtime declares its panel kind (``Runtime.panel``, :data:`vision_peft.runtimes.RUNTIMES`); the task
declares its ``predict_options``. :data:`PANELS` maps each kind to its builder:

| panel kind | inputs | outputs |
|---|---|---|
| ranked_images | image(s) (predicts on upload); Monte Carlo samples when ``mc_samples`` is an option | top classes + JSON |
| support_query | support set (zip or server folder, one sub-folder per class) + query images | class + probabilities per query |
| image_phrase_mask | image + referring phrase | mask overlay + mask statistics (area, box, probabilities) |
| ranked_points | one point file (predicts on upload) | class + probabilities + a rendering of the cloud |
| class_grid | classes of the run, images per class, steps, guidance, seed | image grid (one row per class) |

Every handler predicts inside ``AppState.using`` (cached, CPU; runs of one layout share a built model and switch
adapter tensors, and a switch waits for the predictions in flight), so building the page imports no model code
beyond the registries. Each panel registers one ``<task>_predict`` API endpoint and sits in a column with
``elem_id="<task>-predict"`` and the class ``panel-<kind>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from app.catalog import TaskView
from app.errors import friendly
from app.previews import image_grid, load_points_for_view, mask_stats, overlay_mask, render_views
from app.uploads import UploadError, confine, extract_zip
from vision_peft.rundir import RunInfo

MAX_GENERATED = 64  # images one class-grid request may ask for (classes × images per class)
POINT_FILE_TYPES = [".pcd", ".ply", ".off", ".npy", ".npz", ".h5", ".hdf5"]


def _path(f: Any) -> str:
    """A gradio file value (a path string, or an object with ``.name`` in older versions) as a path."""
    return f if isinstance(f, str) else f.name


def _ranked_label(pred: dict[str, Any]) -> dict[str, float]:
    """A task's ranked prediction record as a gr.Label value {class: probability}."""
    return {d["label"]: d["prob"] for d in pred.get("top", [])}


def predict_panel(view: TaskView, state, run: gr.Dropdown) -> None:
    """Build the predict panel of ``view``'s task (its runtime's panel kind) under the finished-run dropdown ``run``.

    Raises:
        ValueError: the runtime declares a panel kind the app has no builder for (the message lists the kinds).
    """
    if view.panel not in PANELS:
        raise ValueError(
            f"task {view.name!r}: its runtime declares panel {view.panel!r}, which app/panels.py does not build; "
            f"known panel kinds: {', '.join(PANELS)}"
        )
    with gr.Column(elem_id=f"{view.name}-predict", elem_classes=["predict-panel", f"panel-{view.panel}"]):
        PANELS[view.panel](view, state, run)


def _top_k(view: TaskView) -> dict[str, int]:
    """``top_k=5`` for tasks whose ``predict`` takes it, else nothing."""
    return {"top_k": 5} if "top_k" in view.predict_options else {}


def _files_panel(view: TaskView, state, run: gr.Dropdown) -> None:
    """Images → ``task.predict`` → JSON (and top classes when the records carry them).

    Tasks with the ``mc_samples`` predict option also offer Monte Carlo prediction for runs whose adapter samples
    a latent (PVeRA): the probabilities are the mean of that many sampled forwards and the JSON carries their
    spread."""
    with gr.Row():
        inputs = gr.File(label="input files", file_count="multiple")
        result = gr.JSON(label="prediction")
        label = gr.Label(label="top classes", num_top_classes=5)
    mc = gr.Slider(
        0, 64, value=0, step=1, visible="mc_samples" in view.predict_options,
        label="Monte Carlo samples (runs with a sampled adapter such as PVeRA; 0 = off)",
    )  # fmt: skip

    @friendly
    def on_predict(run_name, files, mc_samples=0):
        if not files:
            raise ValueError("upload input files first")
        import torch

        extra = {"mc_samples": int(mc_samples)} if mc_samples else {}
        with state.using(run_name) as (_, t, model, _):
            preds = t.predict(model, [_path(f) for f in files], torch.device("cpu"), **_top_k(view), **extra)
        first = preds[0]
        return preds, (_ranked_label(first) if isinstance(first, dict) else None) or None

    inputs.upload(on_predict, [run, inputs, mc], [result, label], api_name=f"{view.name}_predict")


def _support_query_panel(view: TaskView, state, run: gr.Dropdown) -> None:
    """Support set + query images → nearest-prototype class and probabilities per query."""
    with gr.Row():
        support_zip = gr.File(label="support set zip (one sub-folder of images per class)", file_types=[".zip"])
        support_folder = gr.Textbox(label=f"…or a support folder on the server (inside {state.data_root})")
        queries = gr.File(label="query images", file_count="multiple", file_types=["image"])
    classify = gr.Button("Classify queries")
    with gr.Row():
        label = gr.Label(label="first query: top classes", num_top_classes=5)
        gallery = gr.Gallery(label="queries → predicted class", columns=6, height=220)
        result = gr.JSON(label="prediction")
    extracted: dict[str, Path] = {}  # uploaded zip → its extracted folder (re-classifying does not re-extract)

    def support_root(zip_file, server_folder) -> Path:
        if zip_file:
            key = _path(zip_file)
            if key not in extracted:
                extracted[key] = extract_zip(key, view.name, state.uploads_root)
            return extracted[key]
        if server_folder:
            root = confine(server_folder, state.data_root)
            if not root.is_dir():
                raise UploadError(f"{server_folder} is not a folder inside {state.data_root}")
            return root
        raise ValueError("give a support set: a zip with one sub-folder of images per class, or a server folder")

    @friendly
    def on_classify(run_name, zip_file, server_folder, files):
        if not files:
            raise ValueError("upload one or more query images")
        root = support_root(zip_file, server_folder)
        import torch

        paths = [_path(f) for f in files]
        with state.using(run_name) as (_, t, model, _):
            preds = t.predict(model, [str(root), *paths], torch.device("cpu"), **_top_k(view))
        shown = [(p, f"{r['label']} ({r['prob']:.0%})") for p, r in zip(paths, preds)]
        return preds, _ranked_label(preds[0]), shown

    classify.click(
        on_classify,
        [run, support_zip, support_folder, queries],
        [result, label, gallery],
        api_name=f"{view.name}_predict",
    )


def _image_phrase_panel(view: TaskView, state, run: gr.Dropdown) -> None:
    """Image + phrase → the predicted mask over the image, with its area, box and probabilities."""
    with gr.Row():
        image = gr.Image(label="image", type="filepath")
        with gr.Column():
            phrase = gr.Textbox(label="referring phrase", placeholder="e.g. the dog on the left")
            segment = gr.Button("Segment", variant="primary")
    with gr.Row():
        overlay = gr.Image(label="predicted mask (overlay)", type="pil", format="png")
        stats = gr.JSON(label="mask statistics")

    @friendly
    def on_segment(run_name, image_path, text):
        if not image_path:
            raise ValueError("upload an image first")
        if not text or not text.strip():
            raise ValueError("type a referring phrase, e.g. 'the person on the left'")
        with state.using(run_name) as (_, t, model, _):
            res = t.predict_mask(model, image_path, text.strip(), "cpu")
        info = {"phrase": text.strip(), **mask_stats(res["mask"], res["prob"], t.cfg.task.threshold)}
        return overlay_mask(res["image"], res["mask"]), info

    segment.click(on_segment, [run, image, phrase], [overlay, stats], api_name=f"{view.name}_predict")
    phrase.submit(on_segment, [run, image, phrase], [overlay, stats])


def _points_panel(view: TaskView, state, run: gr.Dropdown) -> None:
    """One point file → class + probabilities, and four views of the uploaded cloud."""
    with gr.Row():
        points = gr.File(label=f"point file ({' '.join(POINT_FILE_TYPES)})", file_types=POINT_FILE_TYPES)
        label = gr.Label(label="top classes", num_top_classes=5)
    classify = gr.Button("Classify again (after choosing another run)")
    with gr.Row():
        render = gr.Image(label="uploaded cloud (front, side, top, 3/4; the run's up axis)", type="pil", format="png")
        result = gr.JSON(label="prediction")

    @friendly
    def on_points(run_name, file):
        if not file:
            raise ValueError("upload a point file first")
        import torch

        path = _path(file)
        with state.using(run_name) as (cfg, t, model, _):
            pred = t.predict(model, [path], torch.device("cpu"), **_top_k(view))[0]
        picture = render_views(load_points_for_view(path, cfg.task.up_axis), ("front", "side", "top", "3/4"), 200)
        return _ranked_label(pred), pred, picture

    points.upload(on_points, [run, points], [label, result, render], api_name=f"{view.name}_predict")
    classify.click(on_points, [run, points], [label, result, render])


def _class_grid_panel(view: TaskView, state, run: gr.Dropdown) -> None:
    """Class names + n, steps, guidance, seed → a grid of generated images, one row per class."""
    with gr.Row():
        classes = gr.Dropdown([], multiselect=True, label="classes (empty = every class of the run)")
        per_class = gr.Slider(1, 8, value=4, step=1, label="images per class")
    with gr.Row():
        steps = gr.Slider(1, 100, value=25, step=1, label="DDIM steps")
        guidance = gr.Slider(0.0, 20.0, value=2.0, step=0.25, label="guidance scale (1 = no guidance)")
        seed = gr.Number(value=0, precision=0, minimum=0, label="seed")
    generate = gr.Button("Generate", variant="primary")
    with gr.Row():
        grid = gr.Image(label="samples (one row per class)", type="pil", format="png")
        info = gr.JSON(label="sampling")

    @friendly
    def on_run(run_name):
        if not run_name:
            return gr.update(choices=[], value=[]), gr.update(), gr.update()
        info = RunInfo.read(state.run_dir(run_name))  # config.json, without loading the model
        t = info.config["task"]
        names = info.classes
        return gr.update(choices=names, value=[]), t.get("sample_steps", 25), t.get("guidance", 2.0)

    run.change(on_run, [run], [classes, steps, guidance], api_name=f"{view.name}_classes")

    @friendly
    def on_generate(run_name, names, n, n_steps, scale, seed_value):
        import torch

        with state.using(run_name) as (_, t, model, _):
            names = list(names or t.classes)
            unknown = [c for c in names if c not in t.classes]
            if unknown:
                raise ValueError(f"class(es) {unknown} were not trained in {run_name}; known: {', '.join(t.classes)}")
            n = int(n)
            if n < 1 or n * len(names) > MAX_GENERATED:
                raise ValueError(
                    f"{n} image(s) × {len(names)} class(es) is outside 1…{MAX_GENERATED} images per request; "
                    "choose fewer classes or images"
                )
            seed_int = int(seed_value or 0)
            ys = torch.tensor([t.classes.index(c) for c in names]).repeat_interleave(n)  # (C*n,) class ids
            images = model.sample(ys, int(n_steps), float(scale), seed_int)  # (C*n, 3, H, W) in [0, 1]
        arr = images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # (C*n,3,H,W)->(C*n,H,W,3)
        facts = {"classes": names, "per_class": n, "steps": int(n_steps), "guidance": float(scale), "seed": seed_int}
        return image_grid(arr, n, names), {**facts, "image_size": list(arr.shape[1:3])}

    generate.click(
        on_generate, [run, classes, per_class, steps, guidance, seed], [grid, info], api_name=f"{view.name}_predict"
    )


PANELS = {  # a runtime's declared ``panel`` kind -> the builder of its predict panel
    "ranked_images": _files_panel,  # images → label panel, predicting on upload
    "support_query": _support_query_panel,
    "image_phrase_mask": _image_phrase_panel,
    "ranked_points": _points_panel,
    "class_grid": _class_grid_panel,
}
