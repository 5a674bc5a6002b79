"""Training-free merging: the math on hand-checkable tensors, merges of identical runs, an end-to-end merge of two
tiny runs (classification-tiny on two AID class subsets) that evals, predicts and exports, and every refusal."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vision_peft import merge_math as mm
from vision_peft.bundle import sha256_file
from vision_peft.merge import MergeError, merge_runs

REPO = Path(__file__).resolve().parent.parent


# -- the math --------------------------------------------------------------------------------------------------
def test_task_arithmetic_is_the_scaled_sum() -> None:
    tvs = torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, -1.0]])
    assert torch.allclose(mm.task_arithmetic(tvs, 0.5), torch.tensor([2.0, -0.5, -0.5]))


TIES_TVS = torch.tensor([[0.5, -0.1, 0.3, -0.8], [-0.4, 0.2, 0.6, 0.1], [0.2, -0.3, -0.1, 0.9]])


def test_ties_steps_by_hand() -> None:
    trimmed = mm.ties_trim(TIES_TVS, 0.5)  # the two largest magnitudes of each row survive
    want = torch.tensor([[0.5, 0.0, 0.0, -0.8], [-0.4, 0.0, 0.6, 0.0], [0.0, -0.3, 0.0, 0.9]])
    assert torch.equal(trimmed, want)
    sign = mm.ties_elect(trimmed)  # column sums 0.1, -0.3, 0.6, 0.1
    assert sign.tolist() == [1.0, -1.0, 1.0, 1.0]
    # column 0: only 0.5 agrees with +; column 3: 0.9 agrees, -0.8 is outvoted
    assert torch.allclose(mm.ties_disjoint_mean(trimmed, sign), torch.tensor([0.5, -0.3, 0.6, 0.9]))
    assert torch.allclose(mm.ties(TIES_TVS, k=0.5, lam=2.0), torch.tensor([1.0, -0.6, 1.2, 1.8]))


def test_ties_matches_a_direct_loop() -> None:
    g = torch.Generator().manual_seed(0)
    tvs = torch.randn(4, 37, generator=g)
    k, lam = 0.3, 0.7
    n = math.ceil(k * 37)
    trimmed = []
    for row in tvs.tolist():
        cut = sorted((abs(v) for v in row), reverse=True)[n - 1]
        trimmed.append([v if abs(v) >= cut else 0.0 for v in row])
    want = []
    for col in zip(*trimmed, strict=True):
        s = math.copysign(1.0, sum(col)) if sum(col) else 0.0
        agree = [v for v in col if v != 0 and math.copysign(1.0, v) == s]
        want.append(lam * sum(agree) / len(agree) if agree else 0.0)
    assert torch.allclose(mm.ties(tvs, k, lam), torch.tensor(want), atol=1e-6)


def test_pcb_balancing_matrices() -> None:
    g = torch.Generator().manual_seed(1)
    tvs = torch.randn(3, 50, generator=g)
    intra, inter = mm.pcb_intra(tvs), mm.pcb_inter(tvs)
    assert torch.allclose(intra.sum(1), torch.ones(3), atol=1e-5)  # a softmax over each task's entries
    assert torch.allclose(inter.sum(1), torch.full((3,), 3.0), atol=1e-5)  # N softmaxes summed
    assert (intra > 0).all() and (inter > 0).all()
    # intra by hand for one task vector [0, 1, 2]: Norm(τ²) = [0, .25, 1], temperature N = 1
    e = [math.exp(v) for v in (0.0, 0.25, 1.0)]
    assert torch.allclose(mm.pcb_intra(torch.tensor([[0.0, 1.0, 2.0]])), torch.tensor([[v / sum(e) for v in e]]))
    # with two tasks the temperature doubles: larger entries are favoured more sharply
    two = mm.pcb_intra(torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]))
    e2 = [math.exp(2 * v) for v in (0.0, 0.25, 1.0)]
    assert torch.allclose(two[0], torch.tensor([v / sum(e2) for v in e2]))


def test_pcb_drop_ratio_and_weighted_mean() -> None:
    g = torch.Generator().manual_seed(2)
    tvs = torch.randn(3, 40, generator=g)
    beta = mm.pcb_scores(tvs)
    mask = mm.keep_top(beta, 0.25)
    assert mask.sum(1).tolist() == [10, 10, 10]
    assert all(beta[i][mask[i]].min() >= beta[i][~mask[i]].max() for i in range(3))  # the top scores are kept
    merged = mm.pcb(tvs, r=0.25, lam=1.0)
    kept_by_none = ~mask.any(0)
    assert (merged[kept_by_none] == 0).all()
    for j in torch.nonzero(~kept_by_none).flatten().tolist():  # a weighted mean of the tasks that kept entry j
        vals = tvs[mask[:, j], j]
        assert vals.min() - 1e-6 <= merged[j] <= vals.max() + 1e-6
    one = mm.pcb(tvs, r=0.25, lam=1.0)
    assert torch.allclose(mm.pcb(tvs, r=0.25, lam=0.5), 0.5 * one)


def test_identical_vectors_merge_to_themselves() -> None:
    v = torch.randn(1, 30, generator=torch.Generator().manual_seed(3))
    tvs = v.repeat(3, 1)
    assert torch.allclose(mm.ties(tvs, k=1.0, lam=1.0), v[0])
    assert torch.allclose(mm.pcb(tvs, r=1.0, lam=1.0), v[0], atol=1e-6)
    assert torch.allclose(mm.task_arithmetic(tvs, 1 / 3), v[0], atol=1e-6)


def test_math_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="fraction"):
        mm.ties(TIES_TVS, k=0.0)
    with pytest.raises(ValueError, match="fraction"):
        mm.pcb(TIES_TVS, r=1.5)
    with pytest.raises(ValueError, match="unknown merge method"):
        mm.merge_vectors(TIES_TVS, "average")


# -- runs ------------------------------------------------------------------------------------------------------
def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "vision_peft", *args], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    if check:
        assert res.returncode == 0, f"{args}: {res.stderr[-3000:]}"
    return res


def _train(root: Path, name: str, *overrides: str) -> Path:
    res = cli("train", "classification-tiny", f"--output.runs_root={root}", f"--output.name={name}", "--no-progress",
              *overrides)  # fmt: skip
    return Path(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, aid_root: Path) -> dict[str, Path]:
    """Two tiny LoRA runs on disjoint AID class subsets, and a linear-probe run."""
    root = tmp_path_factory.mktemp("merge")
    linear = yaml.safe_load((REPO / "tasks" / "classification-tiny.yaml").read_text())
    linear["adapter"] = {"name": "linear"}
    (root / "linear.yaml").write_text(yaml.safe_dump(linear))
    res = cli("train", str(root / "linear.yaml"), f"--output.runs_root={root}", "--output.name=lin", "--no-progress")
    return {
        "a": _train(root, "a"),
        "b": _train(root, "b", "--task.classes=[Desert,Meadow,River]"),
        "lin": Path(res.stdout.strip().splitlines()[-1]),
        "root": root,
    }


def _logits(run_dir: Path, images: list[str]) -> torch.Tensor:
    from vision_peft.predict import load_run
    from vision_peft.preprocess import load_image, preprocess_image

    _, task, model, _ = load_run(run_dir)
    spec = task.image_spec(model)
    x = torch.stack([torch.from_numpy(preprocess_image(load_image(p), spec)) for p in images])
    with torch.no_grad():
        return model.logits(x)


@pytest.mark.parametrize("method,opts", [("task_arithmetic", {"lam": 0.5}), ("ties", {"k": 1.0}), ("pcb", {"r": 1.0})])
def test_merging_a_run_with_itself_gives_the_run(runs: dict[str, Path], method: str, opts: dict) -> None:
    twin = runs["root"] / f"twin-{method}"
    shutil.copytree(runs["a"], twin)
    out = runs["root"] / f"self-{method}"
    man = merge_runs([runs["a"], twin], out, method, splits=("test",), progress=False, **opts)
    images = json.loads((runs["a"] / "split.json").read_text())["test"][:6]
    want = _logits(runs["a"], images)
    for sub in ("a", twin.name):
        assert torch.allclose(_logits(out / sub, images), want, atol=1e-4)
    src = json.loads((runs["a"] / "final_metrics.json").read_text())["test"]
    assert man["results"]["a"]["test"]["top1"] == pytest.approx(src["top1"])


def test_end_to_end_merge_evals_predicts_exports(runs: dict[str, Path]) -> None:
    out = runs["root"] / "merged"
    res = cli("merge", str(runs["a"]), str(runs["b"]), "--method", "ties", "--k", "0.5", "--out", str(out))
    assert "merge: evaluate" in res.stderr  # the progress bar / log lines
    man = json.loads((out / "merge.json").read_text())
    assert man["method"] == "ties" and man["options"] == {"lam": 1.0, "k": 0.5}
    assert man["delta_file"]["sha256"] == sha256_file(out / "merged_delta.safetensors")
    for src, key in zip(man["sources"], ("a", "b"), strict=True):
        assert src["adapter_sha256"] == sha256_file(runs[key] / "adapter.safetensors")
        assert set(man["results"][src["sub_run"]]) == {"val", "test"}
    # every sub-run holds the same merged backbone and its own head
    from safetensors.torch import load_file

    ta, tb = load_file(str(out / "a" / "adapter.safetensors")), load_file(str(out / "b" / "adapter.safetensors"))
    backbone = [k for k in ta if k.startswith("backbone.")]
    assert backbone and all(torch.equal(ta[k], tb[k]) for k in backbone)
    assert torch.equal(ta["head.weight"], load_file(str(runs["a"] / "adapter.safetensors"))["head.weight"])
    assert not torch.equal(ta["head.weight"], tb["head.weight"])

    ev = json.loads(cli("eval", str(out / "b"), "--split", "test").stdout)
    assert ev["top1"] == pytest.approx(man["results"]["b"]["test"]["top1"])
    images = json.loads((runs["b"] / "split.json").read_text())["test"][:3]
    preds = [json.loads(ln) for ln in cli("predict", str(out / "b"), *images).stdout.splitlines()]
    assert [p["file"] for p in preds] == images and {p["label"] for p in preds} <= {"Desert", "Meadow", "River"}
    rep = json.loads(cli("export", str(out / "b"), "--bundle", str(out / "bundle-b")).stdout)
    assert rep["passed"] and rep["max_abs_diff"] < 1e-4
    assert json.loads((out / "bundle-b" / "manifest.json").read_text())["labels"] == ["Desert", "Meadow", "River"]


# -- refusals ----------------------------------------------------------------------------------------------------
def _copy_with(runs: dict[str, Path], name: str, edit) -> Path:
    d = runs["root"] / name
    if not d.exists():
        shutil.copytree(runs["b"], d)
        info = json.loads((d / "config.json").read_text())
        edit(info)
        (d / "config.json").write_text(json.dumps(info))
    return d


def test_refusals(runs: dict[str, Path]) -> None:
    a, out = runs["a"], runs["root"] / "refused"
    with pytest.raises(MergeError, match="at least two runs"):
        merge_runs([a], out, "ties")
    unfinished = runs["root"] / "unfinished"
    shutil.copytree(runs["b"], unfinished)
    (unfinished / "adapter.safetensors").unlink()
    with pytest.raises(MergeError, match=f"{unfinished}/adapter.safetensors is missing"):
        merge_runs([a, unfinished], out, "ties")

    def weights(i):
        i["backbone"]["weights_id"] = "0" * 64

    with pytest.raises(MergeError, match=f"{a} and .*other-weights use different backbones"):
        merge_runs([a, _copy_with(runs, "other-weights", weights)], out, "ties")

    def size(i):
        i["config"]["backbone"]["image_size"] = 32

    with pytest.raises(MergeError, match="different backbones"):
        merge_runs([a, _copy_with(runs, "other-size", size)], out, "ties")

    def dora(i):
        i["config"]["adapter"]["name"] = "dora"

    with pytest.raises(MergeError, match=r"different adapter types \(lora vs dora\)"):
        merge_runs([a, _copy_with(runs, "other-adapter", dora)], out, "ties")

    def targets(i):
        i["config"]["adapter"]["targets"] = ["qkv", "mlp"]

    with pytest.raises(MergeError, match="adapt different targets"):
        merge_runs([a, _copy_with(runs, "other-targets", targets)], out, "ties")
    lin2 = runs["root"] / "lin2"
    shutil.copytree(runs["lin"], lin2, dirs_exist_ok=True)
    with pytest.raises(MergeError, match="adapter linear does not fold"):
        merge_runs([runs["lin"], lin2], out, "pcb")
    with pytest.raises(MergeError, match="unknown merge method"):
        merge_runs([a, runs["b"]], out, "average")
    assert not out.exists()  # nothing written by any refusal
    out.mkdir()
    (out / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        merge_runs([a, runs["b"]], out, "ties")
    res = cli("merge", str(a), "--method", "pcb", "--out", str(runs["root"] / "one"), check=False)
    assert res.returncode == 2 and "at least two runs" in res.stderr
    res = cli("merge", str(a), str(runs["b"]), "--method", "pcb", "--k", "0.3", "--out", str(out), check=False)
    assert res.returncode == 2 and "--k belongs to --method ties" in res.stderr
