"""The browser app through gradio_client on loopback: upload → train → progress → predict → export, Stop,
re-attach, and the upload safety rules."""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from app.uploads import UploadError, UploadLimits, check_zip, confine, extract_zip  # noqa: E402


def make_zip(path: Path, entries: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16  # a symlink entry
            zf.writestr(info, target)
    return path


def aid_zip(tmp: Path, aid_root: Path, classes=("Beach", "Forest", "Port"), n: int = 16) -> Path:
    entries = {}
    for c in classes:
        for f in sorted((aid_root / c).glob("*.jpg"))[:n]:
            entries[f"mini/{c}/{f.name}"] = f.read_bytes()
    return make_zip(tmp / "mini.zip", entries)


# -- upload safety -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("entries", "links", "fragment"),
    [
        ({"/etc/evil.jpg": b"x"}, None, "absolute path"),
        ({"a/../../evil.jpg": b"x"}, None, "escapes the upload folder"),
        ({"ok/a.jpg": b"x"}, {"ok/link.jpg": "/etc/passwd"}, "symlink"),
        ({"a/b.exe": b"x"}, None, ".exe files are not read"),
        ({"a/.DS_Store": b"x"}, None, "holds no classification files"),
    ],
)
def test_malicious_zips_refused(tmp_path: Path, entries, links, fragment) -> None:
    z = make_zip(tmp_path / "bad.zip", entries, links)
    with pytest.raises(UploadError, match=fragment):
        extract_zip(z, "classification", tmp_path / "uploads")
    assert not (tmp_path / "uploads").exists() or not any((tmp_path / "uploads").iterdir())


def test_zip_bomb_and_count_limits(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/huge.jpg", b"\0" * (8 * 2**20))
    with pytest.raises(UploadError, match="zip bomb"):
        check_zip(bomb, "classification")
    with pytest.raises(UploadError, match="unpacks to more than"):
        check_zip(bomb, "classification", UploadLimits(max_total_bytes=2**20, max_ratio=1e9))
    many = make_zip(tmp_path / "many.zip", {f"a/{i}.jpg": b"x" for i in range(12)})
    with pytest.raises(UploadError, match="limit is 10"):
        check_zip(many, "classification", UploadLimits(max_files=10))
    with pytest.raises(UploadError, match="not a zip"):
        check_zip(_garbage(tmp_path), "classification")


def _garbage(tmp: Path) -> Path:
    p = tmp / "garbage.zip"
    p.write_bytes(b"not a zip at all")
    return p


def test_uploads_land_in_their_own_folder_and_paths_are_confined(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "ok.zip", {"set/A/1.jpg": b"1", "set/B/2.png": b"2"})
    a, b = extract_zip(z, "classification", tmp_path / "up"), extract_zip(z, "classification", tmp_path / "up")
    assert a != b and a.name == "set" and (a / "A" / "1.jpg").read_bytes() == b"1"
    assert confine("x/y", tmp_path) == (tmp_path / "x" / "y").resolve()
    with pytest.raises(UploadError, match="outside"):
        confine("../../etc", tmp_path)
    with pytest.raises(UploadError, match="outside"):
        confine("/etc/passwd", tmp_path)


# -- the app end to end through gradio_client ----------------------------------------------------------------
@pytest.fixture(scope="module")
def app_client(tmp_path_factory, aid_root: Path):
    from gradio_client import Client

    from app.main import AppState, build_app

    root = tmp_path_factory.mktemp("app")
    state = AppState(root / "runs", root / "uploads")
    demo = build_app(state)
    demo.queue()
    demo.launch(
        server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True, allowed_paths=[str(root)]
    )
    client = Client(demo.local_url, verbose=False)
    yield client, state, root, demo
    demo.close()
    state.jobs.close()


def _wait(
    state, job_id: str, statuses=("done", "failed", "stopped"), timeout: float = 600
) -> str:  # a loaded box is slow
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = state.jobs.get(job_id).status
        if s in statuses:
            return s
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {state.jobs.get(job_id).status}")


def test_app_train_predict_export(app_client, aid_root: Path, tmp_path: Path) -> None:
    from gradio_client import handle_file

    client, state, root, _ = app_client
    path, counts, gallery = client.predict(
        handle_file(str(aid_zip(tmp_path, aid_root))), "", api_name="/classification_upload"
    )
    assert Path(path).is_dir() and str(state.uploads_root) in path
    assert {r[0]: r[1] for r in counts["data"]} == {"Beach": 16, "Forest": 16, "Port": 16}
    assert len(gallery) == 3
    job, command = client.predict(
        "classification-tiny", "timm:test_vit", None, "cpu", 2, 8, None, None, path, api_name="/classification_start"
    )
    job_id = job if isinstance(job, str) else job["value"]
    assert "vision_peft train" in command and ".app_recipes" in command
    assert _wait(state, job_id) == "done", state.jobs.progress(job_id)["log"]
    html, plot, log, cmd = client.predict(job_id, api_name="/classification_progress")
    p = state.jobs.progress(job_id)
    assert p["step"] == p["total"] > 0 and "100 %" in html and cmd == state.jobs.get(job_id).command_line
    assert cmd.endswith(f"{state.jobs.get(job_id).run_dir}/recipe.yaml") and Path(cmd.split()[-1]).is_file()
    assert len(plot["data"]) == len(p["steps"]) if isinstance(plot, dict) and "data" in plot else True
    # predict on a real image with the finished run
    client.predict(api_name="/classification_runs")
    img = sorted((aid_root / "Beach").glob("*.jpg"))[-1]
    preds, label = client.predict(job_id, [handle_file(str(img))], api_name="/classification_predict")
    assert preds[0]["label"] in ("Beach", "Forest", "Port")
    assert label["label"] == preds[0]["label"]
    # export: the bundle comes back as a zip with the ONNX graph and a passing parity report
    archive, report = client.predict(job_id, api_name="/classification_export")
    assert report["max_abs_diff"] < 1e-4
    with zipfile.ZipFile(archive) as zf:
        assert {"model.onnx", "manifest.json"} <= set(zf.namelist())


def test_app_stop_reattach_resume(app_client, aid_root: Path) -> None:
    client, state, root, _ = app_client
    folder = str(aid_root)
    state.jobs.env["VISION_PEFT_STEP_DELAY"] = "0.5"  # keep the run alive long enough to stop it
    try:
        job, _ = client.predict(
            "classification-tiny",
            "timm:test_vit",
            None,
            "cpu",
            6,
            4,
            None,
            None,
            folder,
            api_name="/classification_start",
        )
    finally:
        state.jobs.env.pop("VISION_PEFT_STEP_DELAY")
    job_id = job if isinstance(job, str) else job["value"]
    assert _wait(state, job_id, ("running",), 240) == "running"
    meta = Path(state.jobs.get(job_id).run_dir) / "checkpoint" / "meta.json"
    deadline = time.time() + 300  # generous: on a loaded 2-core machine the child's imports alone take minutes
    while not meta.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert meta.exists(), f"no checkpoint after 300 s: {state.jobs.progress(job_id)['log'][-2000:]}"
    # a second connection (a page reload) re-attaches to the running job
    from gradio_client import Client

    other = Client(app_client[3].local_url, verbose=False)
    jobs_update, _ = other.predict(api_name="/classification_reattach")
    assert (jobs_update if isinstance(jobs_update, str) else jobs_update.get("value")) == job_id
    pid = state.jobs.get(job_id).pid
    msg = client.predict(job_id, api_name="/classification_stop")
    assert msg.endswith("stopped")
    from app.jobs import _alive

    assert not _alive(pid), "Stop must end the training process"
    # resume from the checkpoint finishes the run
    client.predict(job_id, api_name="/classification_resume")
    assert _wait(state, job_id) == "done"
    assert json.loads((Path(state.jobs.get(job_id).run_dir) / "final_metrics.json").read_text())["step"] > 0


def test_app_errors_are_messages_and_server_keeps_serving(app_client, tmp_path: Path) -> None:
    from gradio_client import handle_file

    client, state, root, _ = app_client
    bad = make_zip(tmp_path / "evil.zip", {"../../evil.jpg": b"x"})
    with pytest.raises(Exception, match="escapes the upload folder"):
        client.predict(handle_file(str(bad)), "", api_name="/classification_upload")
    with pytest.raises(Exception, match="outside"):
        client.predict(None, "../../etc", api_name="/classification_folder")
    with pytest.raises(Exception, match="unknown key|must be|recipe"):
        client.predict(
            "no-such-recipe", None, None, "cpu", None, None, None, None, "", api_name="/classification_start"
        )
    assert client.predict(api_name="/classification_runs") is not None  # still serving


def _layout_ids(node: dict, under: int | None = None, inside: bool = False) -> set[int]:
    """Component ids in the layout subtree of component ``under`` (every id when ``under`` is None)."""
    here = inside or under is None or node.get("id") == under
    out = {node["id"]} if here and "id" in node else set()
    for child in node.get("children", []):
        out |= _layout_ids(child, under, here)
    return out


def test_every_registered_task_has_a_tab_with_recipes_and_its_panel(app_client) -> None:
    """One tab per registered task; in it a recipe dropdown listing that task's recipes and the predict panel of
    the kind its runtime declares, with its ``<task>_predict`` endpoint (no task is named in app/)."""
    from app.catalog import recipes_for
    from vision_peft.runtimes import RUNTIMES
    from vision_peft.tasks import TASKS

    client, demo = app_client[0], app_client[3]
    components = demo.config["components"]
    by_elem = {c["props"]["elem_id"]: c for c in components if c.get("props", {}).get("elem_id")}
    tabs = [c for c in components if c["type"] == "tabitem"]
    task_tabs = [t for t in tabs if t["props"].get("elem_id", "").removesuffix("-tab") in TASKS.names()]
    assert len(task_tabs) == len(TASKS.names()) > 0  # one per task, besides the app-wide tabs (Runs …)
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    for name in TASKS.names():
        task_cls = TASKS.get(name).builder
        kind = RUNTIMES.get(task_cls.runtime).builder.panel
        assert f"{name}-tab" in by_elem, f"no tab for the registered task {name!r}"
        inside = _layout_ids(demo.config["layout"], by_elem[f"{name}-tab"]["id"])
        recipe = by_elem[f"{name}-recipe"]
        assert recipe["type"] == "dropdown" and recipe["id"] in inside
        choices = [c[0] if isinstance(c, (list, tuple)) else c for c in recipe["props"]["choices"]]
        assert choices == recipes_for(name) and choices, f"{name}: its tab lists no recipe (tasks/*.yaml)"
        panel = by_elem[f"{name}-predict"]
        assert panel["id"] in inside and f"panel-{kind}" in panel["props"]["elem_classes"], (name, kind)
        assert {f"/{name}_predict", f"/{name}_upload", f"/{name}_start"} <= endpoints


def test_launch_refuses_public_bind_without_auth() -> None:
    from app.main import launch

    with pytest.raises(ValueError, match="--auth"):
        launch(host="0.0.0.0", port=0)
    with pytest.raises(ValueError, match="user:password"):
        launch(host="0.0.0.0", port=0, auth="justuser")


def test_zip_bytes_helper_roundtrip(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("d/A/x.jpg", b"1")
    (tmp_path / "z.zip").write_bytes(buf.getvalue())
    assert [i.filename for i in check_zip(tmp_path / "z.zip", "classification")] == ["d/A/x.jpg"]
