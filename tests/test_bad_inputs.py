"""Bad inputs fail loudly, with the file or name at fault and the fix in the message (design.md §4, §6.7).

Names, recipes, image folders, run directories from another backbone, adapter files from another adapter or
rank, pickles with code in them, and missing weight files.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from vision_peft import checkpoint as ckpt
from vision_peft.adapters import ADAPTERS
from vision_peft.backbones import BACKBONES, WeightsNotFoundError, build_backbone
from vision_peft.backbones.base import load_state_file
from vision_peft.cli import main
from vision_peft.config import BackboneConfig, ConfigError, RunConfig
from vision_peft.data.folder import DatasetError, scan_image_folder
from vision_peft.predict import load_run
from vision_peft.recipe import build_run_config, load_recipe
from vision_peft.tasks import TASKS

pytestmark = [
    pytest.mark.usefixtures("vp_logging_reset"),
    pytest.mark.filterwarnings("ignore:Detected pickle protocol"),
]

REGISTRY_OF = {"backbone": BACKBONES, "adapter": ADAPTERS, "task": TASKS}
BAD_NAME = {"backbone": "timn:test_vit", "adapter": "lorra", "task": "clasification"}


def write_recipe(path: Path, cfg: RunConfig, **section_patches: dict) -> Path:
    """Write ``cfg`` as a YAML recipe, with some keys of some sections replaced."""
    data = cfg.to_dict()
    for section, patch in section_patches.items():
        data[section] = {**data[section], **patch}
    path.write_text(yaml.safe_dump(data))
    return path


def cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run the CLI in-process; returns (exit code, stderr)."""
    code = main(argv)
    return code, capsys.readouterr().err


# -- unknown names ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("section", sorted(REGISTRY_OF))
def test_unknown_name_in_config_lists_known_ones(section: str, run_cfg) -> None:
    with pytest.raises(ConfigError) as e:
        run_cfg(**{section: {"name": BAD_NAME[section]}})
    msg = str(e.value)
    assert f"{section}.name" in msg
    assert BAD_NAME[section].partition(":")[0] in msg
    for known in REGISTRY_OF[section].names():
        assert known in msg, f"{known!r} missing from: {msg}"
    assert "did you mean" in msg


@pytest.mark.parametrize("section", sorted(REGISTRY_OF))
def test_unknown_name_on_the_cli_is_one_line(section: str, run_cfg, tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path / "bad.yaml", run_cfg(), **{section: {"name": BAD_NAME[section]}})
    if section != "backbone":  # another adapter/task has other fields: give only the name
        data = yaml.safe_load(recipe.read_text())
        data[section] = {"name": BAD_NAME[section]}
        recipe.write_text(yaml.safe_dump(data))
    code, err = cli(["train", str(recipe), "--no-progress"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and BAD_NAME[section].partition(":")[0] in lines[0]
    assert all(k in lines[0] for k in REGISTRY_OF[section].names())
    assert not (tmp_path / "runs").exists(), "a bad recipe must fail before a run directory is made"


def test_unknown_name_as_dotted_override_on_the_cli(run_cfg, tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path / "ok.yaml", run_cfg())
    code, err = cli(["train", str(recipe), "--backbone.name=timm_vit"], capsys)
    assert code == 2 and "unknown backbone 'timm_vit'" in err and len(err.strip().splitlines()) == 1


# -- recipes ----------------------------------------------------------------------------------------------------
def test_misspelled_recipe_key(run_cfg, tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path / "typo.yaml", run_cfg())
    data = yaml.safe_load(recipe.read_text())
    data["train"]["lrr"] = data["train"].pop("lr")
    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_recipe(str(recipe))
    assert str(recipe) in str(e.value) and "train.lrr (did you mean train.lr?)" in str(e.value)
    code, err = cli(["train", str(recipe)], capsys)
    assert code == 2 and "train.lrr" in err and "did you mean train.lr?" in err
    assert len(err.strip().splitlines()) == 1


def test_misspelled_override_on_the_cli(run_cfg, tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path / "ok.yaml", run_cfg())
    code, err = cli(["train", str(recipe), "--train.batchsize=4"], capsys)
    assert code == 2 and "train.batchsize (did you mean train.batch_size?)" in err


def test_recipe_that_is_not_yaml(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("task: [unclosed\n")
    code, err = cli(["train", str(bad)], capsys)
    assert code == 2 and "is not valid YAML" in err and str(bad) in err


# -- image folders ----------------------------------------------------------------------------------------------
@pytest.fixture
def folder_with_bad_files(tiny_image_folder) -> tuple[Path, Path, Path, Path]:
    """(root, garbage x.jpg in beta, notes.txt in gamma, truncated JPEG in gamma)."""
    root = tiny_image_folder()
    corrupt = root / "beta" / "x.jpg"
    corrupt.write_bytes(b"this is not a JPEG \x00\x01\x02" * 10)
    notes = root / "gamma" / "notes.txt"
    notes.write_text("collected on a sunny day\n")
    good = sorted((root / "gamma").glob("*.jpg"))[0].read_bytes()
    truncated = root / "gamma" / "y_truncated.jpg"
    truncated.write_bytes(good[: len(good) // 3])
    (root / "gamma" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # ignored silently
    return root, corrupt, notes, truncated


def test_bad_files_are_skipped_with_a_warning(folder_with_bad_files, caplog, monkeypatch) -> None:
    root, corrupt, notes, truncated = folder_with_bad_files
    monkeypatch.setattr(logging.getLogger("vision_peft"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="vision_peft"):
        scan = scan_image_folder(root, bad_files="skip")
    paths = {p for p, _ in scan.samples}
    assert {str(corrupt), str(notes), str(truncated)}.isdisjoint(paths)
    assert len(scan.samples) == 12  # the 4 generated images per class (grayscale and RGBA included)
    assert {p for p, _ in scan.bad} == {str(corrupt), str(notes), str(truncated)}
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for f in (corrupt, notes, truncated):
        assert str(f) in warned, f"no warning names {f}"
    assert ".DS_Store" not in warned


def test_bad_files_fail_naming_the_file(folder_with_bad_files) -> None:
    root, corrupt, notes, truncated = folder_with_bad_files
    with pytest.raises(DatasetError) as e:
        scan_image_folder(root, bad_files="fail")
    assert str(corrupt) in str(e.value) and "bad_files=skip" in str(e.value)
    corrupt.unlink()
    with pytest.raises(DatasetError, match=r"notes\.txt is unusable \(not an image file"):
        scan_image_folder(root, bad_files="fail")
    notes.unlink()
    with pytest.raises(DatasetError, match="y_truncated.jpg is unusable"):
        scan_image_folder(root, bad_files="fail")


def test_bad_files_through_the_task(folder_with_bad_files, run_cfg) -> None:
    from vision_peft.tasks.classification import ClassificationTask

    root, corrupt, _, _ = folder_with_bad_files
    task = ClassificationTask(run_cfg(task={"data_root": str(root), "bad_files": "fail"}))
    with pytest.raises(DatasetError, match=str(corrupt)):
        task.scan()
    task = ClassificationTask(run_cfg(task={"data_root": str(root), "bad_files": "skip"}))
    assert task.classes == ["alpha", "beta", "gamma"] and len(task.scan().samples) == 12


def test_bad_files_value_is_validated(run_cfg) -> None:
    with pytest.raises(ConfigError, match="task.bad_files must be one of skip, fail, got 'ignore'"):
        run_cfg(task={"bad_files": "ignore"})


def test_empty_class_folder_is_named(tiny_image_folder) -> None:
    root = tiny_image_folder()
    (root / "empty_class").mkdir()
    with pytest.raises(DatasetError) as e:
        scan_image_folder(root)
    assert str(root / "empty_class") in str(e.value) and "no readable images" in str(e.value)


def test_class_of_only_bad_files_is_named(tiny_image_folder) -> None:
    root = tiny_image_folder()
    (root / "junk").mkdir()
    (root / "junk" / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"junk holds no readable images"):
        scan_image_folder(root, bad_files="skip")


def test_too_few_images_for_the_split(tiny_image_folder, run_cfg) -> None:
    from vision_peft.tasks.classification import ClassificationTask

    root = tiny_image_folder()
    for f in sorted((root / "beta").iterdir())[:2]:
        f.unlink()  # beta keeps 2 images
    task = ClassificationTask(run_cfg(task={"data_root": str(root), "split": {"train": 2, "val": 1, "test": 1}}))
    with pytest.raises(DatasetError) as e:
        task.splits()
    msg = str(e.value)
    assert "class 'beta' has 2 usable images but the split needs 4 (train 2, val 1, test 1)" in msg


def test_missing_data_root_and_missing_class(tiny_image_folder, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nowhere does not exist.*task.data_root"):
        scan_image_folder(tmp_path / "nowhere")
    root = tiny_image_folder()
    with pytest.raises(DatasetError, match=r"class folder\(s\) delta not found .*present: alpha, beta, gamma"):
        scan_image_folder(root, classes=["alpha", "delta"])


# -- run directories and adapter files --------------------------------------------------------------------------
@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


def test_finished_run_loads(run_copy: Path) -> None:
    cfg, task, model, info = load_run(run_copy)
    assert info.backbone.spec == "timm:test_vit" and cfg.adapter.name == "lora"
    assert task.classes == ["alpha", "beta", "gamma"]


def test_run_from_another_backbone_is_refused(run_copy: Path) -> None:
    path = run_copy / "config.json"
    info = json.loads(path.read_text())
    info["backbone"]["weights_id"] = "0" * 64  # the run was trained on other weights than those found now
    path.write_text(json.dumps(info))
    with pytest.raises(ckpt.CheckpointError) as e:
        load_run(run_copy)
    msg = str(e.value)
    assert "timm:test_vit" in msg and "000000000000" in msg and "backbone.weights" in msg


def test_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(ckpt.CheckpointError, match="is not a run directory"):
        load_run(tmp_path)


def test_adapter_file_from_another_rank_is_refused(run_copy: Path, run_cfg) -> None:
    from vision_peft.tasks.classification import ClassificationTask

    state = ckpt.load_tensors(run_copy / ckpt.ADAPTER_FILE)
    cfg = build_run_config(json.loads((run_copy / "config.json").read_text())["config"])
    task = ClassificationTask(build_run_config({**cfg.to_dict(), "adapter": {**cfg.to_dict()["adapter"], "r": 4}}))
    task.set_classes(["alpha", "beta", "gamma"])
    model = task.build_model()
    with pytest.raises(ckpt.CheckpointError, match=r"lora_[AB] has shape .*another backbone, rank or class count"):
        ckpt.load_adapter_into(model, state, "adapter.safetensors")
    # through load_run with an explicit adapter file of the other rank
    other = run_copy / "rank4.safetensors"
    ckpt.save_tensors(other, model.adapter_state_dict())
    with pytest.raises(ckpt.CheckpointError, match="rank4.safetensors"):
        load_run(run_copy, adapter_file=other)


def test_adapter_file_from_another_adapter_is_refused(run_copy: Path) -> None:
    from vision_peft.tasks.classification import ClassificationTask

    state = ckpt.load_tensors(run_copy / ckpt.ADAPTER_FILE)
    cfg = json.loads((run_copy / "config.json").read_text())["config"]
    cfg["adapter"] = {"name": "vpt", "num_tokens": 2}
    task = ClassificationTask(build_run_config(cfg))
    task.set_classes(["alpha", "beta", "gamma"])
    model = task.build_model()
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_adapter_into(model, state, "lora-run/adapter.safetensors")
    msg = str(e.value)
    assert "lora-run/adapter.safetensors does not fit" in msg
    assert "missing key(s) ['backbone.vpt.tokens']" in msg and "unexpected key(s)" in msg and "lora" in msg


def test_adapter_file_with_a_missing_key_is_refused(run_copy: Path) -> None:
    path = run_copy / ckpt.ADAPTER_FILE
    state = ckpt.load_tensors(path)
    dropped = sorted(state)[0]
    del state[dropped]
    ckpt.save_tensors(path, state)
    with pytest.raises(ckpt.CheckpointError, match=f"1 missing key.*{dropped}"):
        load_run(run_copy)


def test_adapter_file_that_is_not_safetensors(run_copy: Path) -> None:
    (run_copy / ckpt.ADAPTER_FILE).write_bytes(b"\x00" * 64)
    with pytest.raises(ckpt.CheckpointError, match="is not a readable safetensors file"):
        load_run(run_copy)


# -- pickles with code ------------------------------------------------------------------------------------------
def plant_marker(path: str) -> str:
    """What a malicious pickle would run: here it only writes a marker file (never executed by the tests)."""
    Path(path).write_text("the pickle ran code")
    return path


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (plant_marker, (self.marker,))


@pytest.fixture(params=["raw_pickle", "torch_save"])
def evil_file(request, tmp_path: Path) -> tuple[Path, Path]:
    """(checkpoint file whose unpickling would call ``plant_marker``, the marker path that must never appear)."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    if request.param == "raw_pickle":
        path.write_bytes(pickle.dumps({"weight": Evil(marker)}))
    else:
        torch.save({"weight": torch.zeros(2), "extra": Evil(marker)}, path)  # a zip checkpoint with code inside
    assert not marker.exists()
    return path, marker


def test_the_payload_is_real(evil_file) -> None:
    """Guard for the tests below: an unsafe load of the same file really runs the code."""
    path, marker = evil_file
    if path.read_bytes()[:2] == b"PK":  # torch.save zip
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.read_text() == "the pickle ran code"


def test_safe_torch_load_refuses_code(evil_file) -> None:
    path, marker = evil_file
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.safe_torch_load(path)
    assert f"refusing to load {path}" in str(e.value) and "never unpickles" in str(e.value)
    assert not marker.exists(), "the pickle's code ran"


def test_load_state_file_refuses_code(evil_file) -> None:
    path, marker = evil_file
    with pytest.raises(ValueError, match=r"could not be read safely.*safetensors"):
        load_state_file(path)
    assert not marker.exists(), "the pickle's code ran"


def test_resume_checkpoint_with_code_is_refused(run_copy: Path, evil_file) -> None:
    path, marker = evil_file
    shutil.copy(path, run_copy / ckpt.CKPT_DIR / "state.pt")
    with pytest.raises(ckpt.CheckpointError, match="refusing to load"):
        ckpt.load_checkpoint(run_copy)
    assert not marker.exists()


def test_backbone_weights_with_code_are_refused(evil_file, capsys) -> None:
    path, marker = evil_file
    with pytest.raises(ValueError, match=str(path)):
        build_backbone(BackboneConfig(name="effnet_lite0", weights=str(path)))
    assert not marker.exists()


def test_plain_state_dict_still_loads(tmp_path: Path) -> None:
    sd = {"weight": torch.arange(4.0)}
    torch.save(sd, tmp_path / "ok.pt")
    assert torch.equal(ckpt.safe_torch_load(tmp_path / "ok.pt")["weight"], sd["weight"])
    assert torch.equal(load_state_file(tmp_path / "ok.pt")["weight"], sd["weight"])


# -- missing weights --------------------------------------------------------------------------------------------
def test_missing_effnet_weights_offline_named() -> None:
    with pytest.raises(WeightsNotFoundError, match=r"backbone.weights=/nonexistent.pth does not exist"):
        build_backbone(BackboneConfig(name="effnet_lite0", weights="/nonexistent.pth"))


def test_missing_effnet_weights_on_the_cli(run_cfg, tmp_path: Path, capsys) -> None:
    recipe = write_recipe(
        tmp_path / "eff.yaml",
        run_cfg(),
        backbone={"name": "effnet_lite0", "weights": "/nonexistent.pth", "pretrained": True, "image_size": 32},
    )
    code, err = cli(["train", str(recipe), "--no-progress"], capsys)
    assert code == 2
    assert "error: backbone.weights=/nonexistent.pth does not exist" in err
    assert not list(tmp_path.glob("runs/*/config.json")), "a failed start must not look like a run"
    code, err = cli(["train", str(recipe), "--no-progress"], capsys)  # the same name can be tried again
    assert code == 2 and "already exists" not in err and "/nonexistent.pth" in err
