"""One built model, several finished runs: RunSwitcher (vision_peft.predict), ``predict <run> <run> … <inputs>`` and
the app's model cache switch adapter tensors between runs of one layout and rebuild for any other layout.

Every switched prediction is compared with a fresh ``load_run`` of the same run (exact equality of the logits),
including after switching away and back; the runs differ in their training seed, so a switch that kept the
previous run's tensors (or head, or class list) would fail the comparison.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from tests.conftest import make_run_cfg, reset_vision_peft_logging, write_image_folder
from vision_peft import checkpoint as ckpt
from vision_peft.predict import RunSwitcher, load_run, predict_files, switch_layout
from vision_peft.preprocess import load_image, preprocess_image
from vision_peft.recipe import build_run_config
from vision_peft.rundir import RunInfo


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Finished 2-step tiny runs (timm:test_vit, 32×32) under one runs root:

    a, b   LoRA r=2, classes alpha/beta/gamma, other train seeds (b also another LoRA init seed) — one layout
    two    LoRA r=2, classes alpha/beta only (head of another class count) — same layout, head rebuilt
    r4     LoRA r=4 — another layout (rank)
    vpt    VPT — another layout (adapter)
    """
    from vision_peft.train import run

    base = tmp_path_factory.mktemp("swap")
    data = write_image_folder(base / "data")
    specs = {
        "a": ("train.seed=1",),
        "b": ("train.seed=2", "adapter.seed=5"),
        "two": ("train.seed=3",),
        "r4": ("train.seed=1", "adapter.r=4"),
        "vpt": ("train.seed=1",),
    }
    out = {}
    try:
        for name, dotted in specs.items():
            sections = {"output": {"runs_root": str(base / "runs"), "name": name}}
            if name == "two":
                sections["task"] = {"classes": ["alpha", "beta"]}
            if name == "vpt":
                sections["adapter"] = {"name": "vpt", "num_tokens": 2}
            out[name] = Path(run(make_run_cfg(data, base / "runs", *dotted, **sections), progress=False))
    finally:
        reset_vision_peft_logging()
    out["data"] = data
    return out


def _images(runs) -> list[str]:
    return sorted(str(p) for p in runs["data"].rglob("*") if p.is_file())[:4]


def _logits(loaded, images: list[str]) -> torch.Tensor:
    """Logits of the loaded run's model on the images, preprocessed with the run's own task (its image spec)."""
    _, task, model, _ = loaded
    spec = task.image_spec(model)
    x = torch.stack([torch.from_numpy(preprocess_image(load_image(p), spec)) for p in images])
    with torch.no_grad():
        return model.logits(x)


def _fresh(run_dir: Path, images: list[str]) -> torch.Tensor:
    return _logits(load_run(run_dir, "cpu"), images)


def test_switch_equals_fresh_load_a_b_a(runs):
    """A → B → two → A → B on one built model: every output equals a fresh load_run's, labels included."""
    images = _images(runs)
    fresh = {n: _fresh(runs[n], images) for n in ("a", "b", "two")}
    assert not torch.equal(fresh["a"], fresh["b"])  # the comparison can tell the runs apart
    assert fresh["two"].shape[1] == 2 and fresh["a"].shape[1] == 3
    sw = RunSwitcher("cpu", max_layouts=1)
    models = set()
    for name in ("a", "b", "two", "a", "b"):
        with sw.use(runs[name]) as loaded:
            assert torch.equal(_logits(loaded, images), fresh[name]), name
            cfg, task, model, info = loaded
            models.add(id(model))
            assert task.classes == info.classes == RunInfo.read(runs[name]).classes
            recs = task.predict(model, images, torch.device("cpu"), top_k=2)
        assert recs == predict_files(runs[name], images, top_k=2)
    assert (sw.builds, sw.switches, len(models)) == (1, 4, 1)


def test_same_run_again_is_neither_built_nor_switched(runs):
    sw = RunSwitcher("cpu")
    first = sw.load(runs["a"])
    again = sw.load(runs["a"])
    assert again[2] is first[2] and (sw.builds, sw.switches) == (1, 0)


def test_other_rank_or_adapter_is_another_layout(runs):
    """r=4 LoRA and VPT never land on the r=2 model: each gets its own build, with fresh-load outputs."""
    infos = {n: RunInfo.read(runs[n]) for n in ("a", "b", "two", "r4", "vpt")}
    keys = {n: switch_layout(build_run_config(i.config), i)[0] for n, i in infos.items()}
    assert keys["a"] == keys["b"] == keys["two"]
    assert len({keys["a"], keys["r4"], keys["vpt"]}) == 3
    images = _images(runs)
    sw = RunSwitcher("cpu", max_layouts=2)
    for name in ("a", "r4", "a", "b"):  # a and r4 both stay built: a is not rebuilt, b switches on a's model
        with sw.use(runs[name]) as loaded:
            assert torch.equal(_logits(loaded, images), _fresh(runs[name], images)), name
    assert (sw.builds, sw.switches, sw.layouts) == (2, 1, 2)
    with sw.use(runs["vpt"]) as loaded:  # a third layout: the least recently used one (r4) goes
        assert torch.equal(_logits(loaded, images), _fresh(runs["vpt"], images))
    assert (sw.builds, sw.layouts) == (3, 2)
    sw.load(runs["b"])
    assert sw.builds == 3  # b's layout was kept
    sw.load(runs["r4"])
    assert sw.builds == 4  # r4's was evicted


def test_other_backbone_weights_are_never_switched_onto(runs, tmp_path):
    """A run recording another backbone weight hash is another layout: load_run's weight check refuses it, and
    the model of the layout it did not join is left intact."""
    other = tmp_path / "other"
    shutil.copytree(runs["a"], other)
    data = json.loads((other / "config.json").read_text())
    data["backbone"]["weights_id"] = "f" * 64
    (other / "config.json").write_text(json.dumps(data))
    info = RunInfo.read(other)
    assert (
        switch_layout(build_run_config(info.config), info)[0]
        != switch_layout(build_run_config(RunInfo.read(runs["a"]).config), RunInfo.read(runs["a"]))[0]
    )
    sw = RunSwitcher("cpu", max_layouts=2)
    sw.load(runs["b"])
    with pytest.raises(ckpt.CheckpointError, match="weights"):
        sw.load(other)
    images = _images(runs)
    with sw.use(runs["a"]) as loaded:
        assert torch.equal(_logits(loaded, images), _fresh(runs["a"], images))
    assert sw.switches == 1


def test_other_backbone_config_is_another_layout(runs):
    info = RunInfo.read(runs["a"])
    cfg = build_run_config(info.config)
    data = dict(info.config, backbone={**info.config["backbone"], "image_size": 48})
    assert switch_layout(build_run_config(data), info)[0] != switch_layout(cfg, info)[0]
    # fields that never reach the model do not split a layout
    data = dict(info.config, train={**info.config["train"], "lr": 0.5, "seed": 9})
    data["task"] = {**info.config["task"], "data_root": "/elsewhere", "augment": "standard", "split_seed": 4}
    assert switch_layout(build_run_config(data), info)[0] == switch_layout(cfg, info)[0]
    # model-building task options do
    data = dict(info.config, task={**info.config["task"], "head_dropout": 0.1})
    assert switch_layout(build_run_config(data), info)[0] != switch_layout(cfg, info)[0]
    data = dict(info.config, adapter={**info.config["adapter"], "alpha": 3.0})  # LoRA's float scale is no tensor
    assert switch_layout(build_run_config(data), info)[0] != switch_layout(cfg, info)[0]


@pytest.mark.parametrize("adapter", ["dora", "pvera", "kind"])
def test_unverified_adapters_load_on_their_own(runs, adapter):
    """Adapters with state outside the saved tensors are never switched: no layout key, a slot per run."""
    info = RunInfo.read(runs["a"])
    data = dict(info.config, adapter={"name": adapter})
    key, why = switch_layout(build_run_config(data), info)
    assert key is None and adapter in why


def test_unverified_run_is_loaded_with_load_run(runs, tmp_path, monkeypatch):
    """A run whose task/adapter is not verified gets a private slot through load_run (outputs as fresh)."""
    import vision_peft.predict as pred

    monkeypatch.setattr(pred, "SWITCH_ADAPTERS", {k: v for k, v in pred.SWITCH_ADAPTERS.items() if k != "lora"})
    images = _images(runs)
    sw = RunSwitcher("cpu", max_layouts=2)
    models = []
    for name in ("a", "b", "a"):
        with sw.use(runs[name]) as loaded:
            assert torch.equal(_logits(loaded, images), _fresh(runs[name], images))
            models.append(loaded[2])
    assert (sw.builds, sw.switches) == (2, 0)  # a's own slot was kept (2 slots), b got another model
    assert models[0] is models[2] and models[1] is not models[0]
    assert "lora" in sw.reasons[str(runs["a"])]


def test_retrained_adapter_file_is_reloaded(runs, tmp_path):
    """A run whose adapter.safetensors changed (re-finished) is loaded again, not served from the cache."""
    d = tmp_path / "x"
    shutil.copytree(runs["a"], d)
    images = _images(runs)
    sw = RunSwitcher("cpu")
    with sw.use(d) as loaded:
        assert torch.equal(_logits(loaded, images), _fresh(runs["a"], images))
    shutil.copy(runs["b"] / "adapter.safetensors", d / "adapter.safetensors")
    with sw.use(d) as loaded:
        assert torch.equal(_logits(loaded, images), _fresh(runs["b"], images))


def test_failed_switch_leaves_no_half_loaded_model(runs, tmp_path):
    """An adapter file that does not fit is refused (strict keys) and the slot is rebuilt on the next request."""
    bad = tmp_path / "bad"
    shutil.copytree(runs["a"], bad)
    state = ckpt.load_tensors(bad / "adapter.safetensors")
    state.pop(next(iter(state)))
    ckpt.save_tensors(bad / "adapter.safetensors", state)
    sw = RunSwitcher("cpu", max_layouts=1)
    sw.load(runs["b"])
    with pytest.raises(ckpt.CheckpointError, match="missing key"):
        sw.load(bad)
    images = _images(runs)
    with sw.use(runs["b"]) as loaded:
        assert torch.equal(_logits(loaded, images), _fresh(runs["b"], images))
    assert sw.builds == 2


def test_switch_waits_for_predictions_in_flight(runs):
    """While one thread predicts with run a, another asking for run b (same layout) waits; a's outputs stay a's."""
    images = _images(runs)
    want_a, want_b = _fresh(runs["a"], images), _fresh(runs["b"], images)
    sw = RunSwitcher("cpu")
    entered_b, release_a, seen = threading.Event(), threading.Event(), {}

    def second():
        with sw.use(runs["b"]) as loaded:
            entered_b.set()
            seen["b"] = _logits(loaded, images)

    with sw.use(runs["a"]) as loaded:
        t = threading.Thread(target=second)
        t.start()
        assert not entered_b.wait(0.5)  # b cannot switch the model under a's feet
        seen["a"] = _logits(loaded, images)
        release_a.set()
    t.join(60)
    assert entered_b.is_set()
    assert torch.equal(seen["a"], want_a) and torch.equal(seen["b"], want_b)


def test_cli_predict_several_runs(runs, capsys):
    """``predict a r4 b <images>``: one JSON line per (run, input) with a ``run`` field, in the order given, each
    equal to that run's own predict; a and b share one build (2 models for 3 runs)."""
    from vision_peft.cli import main

    images = _images(runs)[:2]
    order = ("a", "r4", "b")
    assert main(["predict", *(str(runs[n]) for n in order), *images, "--top-k", "2"]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(ln) for ln in out.splitlines()]
    want = [{"run": str(runs[n]), **rec} for n in order for rec in predict_files(runs[n], images, top_k=2)]
    assert lines == want
    assert "3 runs, 2 model(s) built, 1 adapter switch(es)" in err


def test_cli_predict_one_run_unchanged(runs, capsys):
    from vision_peft.cli import main

    images = _images(runs)[:2]
    assert main(["predict", str(runs["a"]), *images]) == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert lines == predict_files(runs["a"], images) and all("run" not in rec for rec in lines)


def test_cli_predict_runs_without_inputs(runs, capsys):
    from vision_peft.cli import main

    assert main(["predict", str(runs["a"]), str(runs["b"])]) == 2
    assert "no input files after the run directories" in capsys.readouterr().err


def test_app_cache_switches_within_a_layout(runs, tmp_path):
    """The app keeps one model per layout (at most 2) and switches adapters between runs of one layout."""
    from app.main import AppState

    state = AppState(runs["a"].parent, tmp_path / "uploads")
    images = _images(runs)
    for name in ("a", "b", "two", "a"):
        with state.using(name) as loaded:
            assert torch.equal(_logits(loaded, images), _fresh(runs[name], images)), name
    assert (state.switcher.builds, state.switcher.switches) == (1, 3)
    for name in ("r4", "vpt", "a"):
        _, task, model, _ = state.model(name)
        assert torch.equal(_logits((None, task, model, None), images), _fresh(runs[name], images))
    assert state.switcher.layouts <= 2 and state.switcher.builds == 4  # a's layout was evicted by vpt's
    with pytest.raises(ValueError, match="not a finished run"):
        (tmp_path / "runs_unfinished").mkdir()
        AppState(tmp_path, tmp_path / "uploads").model("runs_unfinished")


def test_multilabel_switch_carries_threshold_and_classes(tmp_path, data_root):
    """Multilabel runs (coco128-seg): the decision threshold (a saved buffer) and the class list switch with the
    run; records equal each run's own predict."""
    from vision_peft.recipe import build_run_config
    from vision_peft.train import run

    def cfg(name: str, seed: int, classes=None):
        task = {"name": "multilabel", "data_root": str(data_root / "coco128-seg"), "augment": "none"}
        if classes:
            task["classes"] = classes
        return build_run_config(
            {
                "task": task,
                "backbone": {"name": "timm:test_vit", "pretrained": False, "image_size": 32},
                "adapter": {"name": "lora", "r": 2, "targets": ["qkv"]},
                "train": {"epochs": 1, "max_steps": 2, "batch_size": 16, "device": "cpu", "seed": seed},
                "output": {"runs_root": str(tmp_path), "name": name},
            }
        )

    try:
        dirs = [run(cfg("m1", 1), progress=False), run(cfg("m2", 2, ["person", "car"]), progress=False)]
    finally:
        reset_vision_peft_logging()
    files = sorted(str(p) for p in (data_root / "coco128-seg" / "images").rglob("*.jpg"))[:3]
    sw = RunSwitcher("cpu", max_layouts=1)
    for d in (*dirs, dirs[0]):
        thr = float(ckpt.load_tensors(Path(d) / "adapter.safetensors")["threshold"])
        with sw.use(d) as (_, task, model, info):
            recs = task.predict(model, files, torch.device("cpu"), top_k=2)
            assert task.classes == info.classes
        assert recs == predict_files(d, files, top_k=2)
        assert all(r["threshold"] == pytest.approx(thr) for r in recs)
    assert (sw.builds, sw.switches) == (1, 2)
