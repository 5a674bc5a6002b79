"""The app reads every task from the registries: a task registered without any edit to app/ gets its tab, upload
rules, preview and predict panel from its declarations; the runs list reads run directories through RunInfo."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import test_app  # noqa: E402  (the zip helper and the layout walker are shared with the app's main tests)

make_zip = test_app.make_zip


# -- a task the app has never heard of ----------------------------------------------------------------------------
def test_a_newly_registered_task_gets_a_tab_without_app_edits(monkeypatch, tmp_path: Path) -> None:
    """Registering a task is all it takes: tab, title, upload rules, preview and panel come from its declarations."""
    import gradio as gr

    from app.catalog import backbone_specs, task_view
    from app.main import AppState, build_app
    from app.panels import predict_panel
    from app.uploads import UploadError, check_zip
    from vision_peft.registry import Entry
    from vision_peft.runtimes import RUNTIMES
    from vision_peft.tasks import TASKS

    base = TASKS.get("classification").builder

    class NewTask(base):
        name = "vp-new-task"
        upload_suffixes = (".xyz",)
        preview = "none"
        predict_options = ()

    entry = Entry(NewTask.name, NewTask, None, "a task the app never heard of, with a long help", requires=("tokens",))
    monkeypatch.setitem(TASKS._entries, NewTask.name, entry)  # removed again after the test
    view = task_view(NewTask.name)
    assert view.title == "A task the app never heard of" and view.upload_suffixes == (".xyz",)
    assert view.panel == RUNTIMES.get(base.runtime).builder.panel and view.preview == "none"
    specs = backbone_specs(view)  # only backbones whose registry entry provides the required "tokens"
    assert "timm:test_vit" in specs and "effnet_lite0" not in specs and "pointnet" not in specs
    ok = make_zip(tmp_path / "ok.zip", {"d/a.xyz": b"1", "d/b.XYZ": b"2"})
    assert [i.filename for i in check_zip(ok, NewTask.name)] == ["d/a.xyz", "d/b.XYZ"]
    with pytest.raises(UploadError, match=r"\.jpg files are not read by the vp-new-task task \(accepted: \.xyz\)"):
        check_zip(make_zip(tmp_path / "img.zip", {"d/a.jpg": b"1"}), NewTask.name)
    with pytest.raises(UploadError, match="unknown task 'vp-no-such-task'"):
        check_zip(ok, "vp-no-such-task")

    state = AppState(tmp_path / "runs", tmp_path / "uploads")
    try:
        config = build_app(state).config
    finally:
        state.jobs.close()
    by_elem = {c["props"]["elem_id"]: c for c in config["components"] if c.get("props", {}).get("elem_id")}
    tab = by_elem[f"{NewTask.name}-tab"]
    assert tab["props"]["label"] == view.title
    inside = test_app._layout_ids(config["layout"], tab["id"])
    panel = by_elem[f"{NewTask.name}-predict"]
    assert panel["id"] in inside and f"panel-{view.panel}" in panel["props"]["elem_classes"]
    assert by_elem[f"{NewTask.name}-recipe"]["id"] in inside

    unknown = dataclasses.replace(view, panel="hologram")
    with gr.Blocks(), pytest.raises(ValueError, match="declares panel 'hologram'.*known panel kinds: ranked_images"):
        predict_panel(unknown, state, gr.Dropdown())
    from app.previews import dataset_preview

    with pytest.raises(ValueError, match="unknown dataset preview kind 'hologram'"):
        dataset_preview("hologram", tmp_path)
    assert dataset_preview("none", tmp_path) == ([], [], [])


def test_runs_of_lists_finished_runs_of_the_task_only(tmp_path: Path) -> None:
    import json

    from app.main import AppState

    runs = tmp_path / "runs"
    for name, task, config in (
        ("a", "classification", None),
        ("b", "fewshot", None),
        ("broken", "classification", "{not json"),
        ("unfinished", "classification", None),
    ):
        (runs / name).mkdir(parents=True)
        cfg = config or json.dumps({"config": {"task": {"name": task}}})
        (runs / name / "config.json").write_text(cfg)
        if name != "unfinished":
            (runs / name / "adapter.safetensors").write_bytes(b"")
    state = AppState(runs, tmp_path / "uploads")
    try:
        assert state.runs_of("classification") == ["a"] and state.runs_of("fewshot") == ["b"]
    finally:
        state.jobs.close()
