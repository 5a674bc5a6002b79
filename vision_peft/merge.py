"""Training-free merging of several runs' adapters into one shared backbone: ``python -m vision_peft merge``.

Each source run's *task vector* is its adapter folded into the frozen backbone (``AdapterHandle.merge``) minus the
frozen weights, on the adapted tensors only — so only re-parameterising adapters that fold exactly (LoRA, DoRA,
PVeRA …: a merge function, nothing left beside the plain backbone) can be merged. The vectors are combined by
task arithmetic, TIES or PCB (:mod:`vision_peft.merge_math`) into one update Δ; heads stay per task.

The output folder (``--out``, e.g. ``runs/merged``)::

    merge.json                 method, options, backbone, the adapted tensors, every source (run, sha256 of its
                               config.json and adapter.safetensors, its own final metrics) and the merged
                               sub-runs' val/test metrics, evaluated through the ordinary eval path
    merged_delta.safetensors   Δ: one tensor per adapted backbone weight (the backbone state-dict key)
    <source run name>/         one ordinary run directory per source task

A sub-run is the source's ``config.json`` with ``adapter`` set to ``{"name": "full"}`` (the registered full
fine-tuning adapter, whose saved tensors are every backbone tensor + the head): its ``adapter.safetensors`` holds
the merged backbone W0 + Δ and the source's own head, so ``eval``, ``predict``, ``export`` (and the app) load it
like any finished run, with the backbone-weight hash check intact. Each sub-run carries its own copy of the
backbone (the price of using the existing loaders unchanged); Δ itself is stored once, in the merge folder.

Refused, naming the runs and the reason: fewer than two runs, a missing config.json / adapter.safetensors,
different backbones (spec, weights or backbone config), different adapter types, an adapter that does not fold
exactly, different targets or adapted tensors, an output folder that already holds files.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from vision_peft import checkpoint as ckpt
from vision_peft import rundir
from vision_peft.bundle import sha256_file
from vision_peft.engine import count_parameters, eval_loader, resolve_device
from vision_peft.export import staged_folder
from vision_peft.merge_math import METHODS, merge_vectors
from vision_peft.predict import load_run
from vision_peft.recipe import build_run_config
from vision_peft.rundir import ADAPTER_FILE, CONFIG_FILE, RunInfo
from vision_peft.tasks import TASKS

log = logging.getLogger("vision_peft")

MERGE_FILE = "merge.json"
DELTA_FILE = "merged_delta.safetensors"
MERGE_FORMAT = "vision_peft.merge/1"
DEFAULTS = {"lam": 1.0, "k": 0.2, "r": 0.1}  # λ, TIES's kept fraction k, PCB's kept fraction r (the papers' values)
_WEIGHT_LOCATION_FIELDS = ("weights", "allow_download")  # where the weights are found; the hash pins them


class MergeError(ValueError):
    """Runs that cannot be merged; the message names the runs and the reason."""


# -- checks ------------------------------------------------------------------------------------------------------
def read_sources(run_dirs: list[str | Path]) -> list[tuple[Path, RunInfo]]:
    """(run dir, config.json) of each source, after the checks that need no model: at least two runs, finished,
    one backbone, one adapter type, one target list."""
    dirs = [Path(d) for d in run_dirs]
    if len(dirs) < 2:
        raise MergeError(f"merge needs at least two runs, got {len(dirs)} ({', '.join(map(str, dirs)) or 'none'})")
    out = []
    for d in dirs:
        info = RunInfo.read(d)
        if not (d / ADAPTER_FILE).is_file():
            raise MergeError(f"{d / ADAPTER_FILE} is missing: {d} has not finished (resume it with --resume {d})")
        out.append((d, info))
    (d0, i0), key0 = out[0], _backbone_key(out[0][1])
    for d, info in out[1:]:
        if _backbone_key(info) != key0:
            raise MergeError(
                f"{d0} and {d} use different backbones ({i0.backbone.spec} weights {i0.backbone.weights_id[:12]}… vs "
                f"{info.backbone.spec} weights {info.backbone.weights_id[:12]}…, or another backbone config): "
                "task vectors only add up on one frozen backbone"
            )
        if info.adapter_name != i0.adapter_name:
            raise MergeError(
                f"{d0} and {d} use different adapter types ({i0.adapter_name} vs {info.adapter_name}); merge runs "
                "of one adapter type"
            )
        t0, t = i0.config["adapter"].get("targets"), info.config["adapter"].get("targets")
        if t != t0:
            raise MergeError(f"{d0} and {d} adapt different targets ({t0} vs {t}); merge runs with one target list")
    return out


def _backbone_key(info: RunInfo) -> str:
    bb = {k: v for k, v in info.config["backbone"].items() if k not in _WEIGHT_LOCATION_FIELDS}
    return json.dumps([info.backbone.spec, info.backbone.weights_id, bb], sort_keys=True, default=str)


def task_vector(run_dir: Path, base: dict[str, torch.Tensor], device: torch.device) -> tuple[dict, dict, list]:
    """(Δ per adapted backbone tensor, the run's non-backbone tensors (its head), the adapted modules) of a run.

    Raises:
        MergeError: the adapter does not fold into plain backbone weights, or changes tensors outside its targets.
    """
    cfg, _, model, info = load_run(run_dir, device)
    handle = model.adapter
    if not handle.mergeable or handle.unload_fn is not None or not handle.touched or "" in handle.touched:
        raise MergeError(
            f"{run_dir}: adapter {cfg.adapter.name} does not fold exactly into the backbone's weights (no "
            "re-parameterisation to merge); merging takes re-parameterising adapters such as lora, dora, pvera"
        )
    head = {k: v.detach().cpu() for k, v in model.adapter_state_dict().items() if not k.startswith("backbone.")}
    handle.merge()
    merged = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
    if set(merged) != set(base) or any(merged[k].shape != base[k].shape for k in base):
        raise MergeError(
            f"{run_dir}: after folding adapter {cfg.adapter.name} the backbone's tensors differ from the plain "
            f"backbone's ({len(set(merged) ^ set(base))} keys differ); it does not merge into plain weights"
        )
    touched = set(handle.touched)
    deltas = {}
    for k, w0 in base.items():
        if k.rpartition(".")[0] in touched and w0.is_floating_point():
            deltas[k] = merged[k].float() - w0.float()
        elif not torch.equal(merged[k], w0):
            raise MergeError(f"{run_dir}: adapter {cfg.adapter.name} changes {k}, outside its targets; cannot merge")
    return deltas, head, sorted(touched)


# -- the merge ---------------------------------------------------------------------------------------------------
def merge_runs(
    run_dirs: list[str | Path], out: str | Path, method: str, lam: float | None = None, k: float | None = None,
    r: float | None = None, device: str = "cpu", splits: tuple[str, ...] = ("val", "test"), progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Merge ``run_dirs`` with ``method`` into ``out`` (layout in the module docstring), evaluate every sub-run on
    ``splits`` and return ``merge.json``'s content. The folder appears only complete (assembled beside it)."""
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    opts = {"lam": DEFAULTS["lam"] if lam is None else float(lam)}
    if method == "ties":
        opts["k"] = DEFAULTS["k"] if k is None else float(k)
    if method == "pcb":
        opts["r"] = DEFAULTS["r"] if r is None else float(r)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out or remove it")
    sources = read_sources(run_dirs)
    dev = resolve_device(device)
    names = _sub_names([d for d, _ in sources])
    with staged_folder(out, prefix=".merge-") as tmp:
        # the plain backbone W0: a sub-run model (adapter "full") before anything is loaded into it
        first = _sub_info(sources[0][1], out, names[0])
        base = {k: v.detach().cpu().clone() for k, v in _build(first).backbone.state_dict().items()}
        vectors, heads, touched0 = [], [], None
        for d, _ in sources:
            deltas, head, touched = task_vector(d, base, dev)
            if touched0 is not None and (touched != touched0 or list(deltas) != list(vectors[0])):
                raise MergeError(
                    f"{sources[0][0]} and {d} adapt different modules ({len(touched0)} vs {len(touched)}); "
                    "their task vectors do not line up"
                )
            touched0 = touched0 or touched
            vectors.append(deltas)
            heads.append(head)
            log.info("merge: task vector of %s (%d tensors)", d, len(deltas))
        moved = [key for key in vectors[0] if any(bool(v[key].any()) for v in vectors)]  # e.g. untouched biases out
        if not moved:
            raise MergeError(f"the runs {', '.join(str(d) for d, _ in sources)} do not change the backbone (all task "
                             "vectors are zero); nothing to merge")  # fmt: skip
        delta = _merge_deltas([{key: v[key] for key in moved} for v in vectors], method, opts)
        ckpt.save_tensors(tmp / DELTA_FILE, delta, metadata={"format": MERGE_FORMAT, "method": method})
        for (d, info), name, head in zip(sources, names, heads, strict=True):
            _write_sub_run(tmp / name, d, _sub_info(info, out, name), base, delta, head)
        results = evaluate_sub_runs(tmp, names, splits, device, progress)
        man = {
            "format": MERGE_FORMAT,
            "method": method,
            "options": opts,
            "backbone": {"spec": sources[0][1].backbone.spec, "weights_id": sources[0][1].backbone.weights_id},
            "adapter": sources[0][1].adapter_name,
            "targets": sources[0][1].config["adapter"].get("targets"),
            "tensors": {key: list(t.shape) for key, t in delta.items()},
            "delta_file": {"path": DELTA_FILE, "sha256": sha256_file(tmp / DELTA_FILE)},
            "sources": [_source_record(d, info, name) for (d, info), name in zip(sources, names, strict=True)],
            "results": results,
        }
        rundir.atomic_write_json(tmp / MERGE_FILE, man)
        for name in names:
            _write_card(tmp / name, man, name)
    log.info("merge: wrote %s", out)
    return man


def _sub_names(dirs: list[Path]) -> list[str]:
    names: list[str] = []
    for d in dirs:
        base = d.resolve().name or "run"
        name, i = base, 2
        while name in names or name in (MERGE_FILE, DELTA_FILE):
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def _merge_deltas(vectors: list[dict[str, torch.Tensor]], method: str, opts: dict[str, float]) -> dict:
    keys = list(vectors[0])
    tvs = torch.stack([torch.cat([v[key].reshape(-1) for key in keys]) for v in vectors])  # (T, D)
    flat = merge_vectors(tvs, method, **opts)
    out, at = {}, 0
    for key in keys:
        n = vectors[0][key].numel()
        out[key] = flat[at : at + n].reshape(vectors[0][key].shape).contiguous()
        at += n
    return out


def _sub_info(info: RunInfo, out: Path, name: str) -> RunInfo:
    """The sub-run's config.json: the source's, with the full adapter (its saved tensors: backbone + head)."""
    data = info.to_dict()
    data["config"]["adapter"] = {"name": "full"}
    data["config"]["output"] = {**data["config"].get("output", {}), "runs_root": str(out), "name": name}
    data["adapter_touched"] = [""]
    return RunInfo.from_dict(data, f"{out / name / CONFIG_FILE}")


def _build(info: RunInfo):
    cfg = build_run_config(info.config)
    task = TASKS.get(cfg.task.name).builder(cfg)
    if task.has_classes and "classes" in info.task_state:
        task.set_classes(info.task_state["classes"])
    return task.build_model()


def _write_sub_run(sub: Path, src: Path, info: RunInfo, base: dict, delta: dict, head: dict) -> None:
    model = _build(info)
    state = {f"backbone.{k}": (base[k] + delta[k].to(base[k].dtype)) if k in delta else base[k] for k in base}
    state.update(head)
    ckpt.load_adapter_into(model, state, f"the merged tensors for {sub}")  # strict: exactly the model's keys
    info.parameters = count_parameters(model)
    info.write(sub)
    ckpt.save_tensors(sub / ADAPTER_FILE, model.adapter_state_dict(), metadata={"merged_by": MERGE_FORMAT})
    if (src / rundir.SPLIT_FILE).is_file():
        rundir.atomic_write_text(sub / rundir.SPLIT_FILE, (src / rundir.SPLIT_FILE).read_text())


def _source_record(d: Path, info: RunInfo, name: str) -> dict[str, Any]:
    final = d / rundir.FINAL_FILE
    own = json.loads(final.read_text()) if final.is_file() else {}
    return {
        "run": str(d),
        "sub_run": name,
        "task": info.task_name,
        "classes": info.classes,
        "config_sha256": sha256_file(d / CONFIG_FILE),
        "adapter_sha256": sha256_file(d / ADAPTER_FILE),
        "source_metrics": {s: _scalars(own.get(s) or {}) for s in ("val", "test") if own.get(s)},
    }


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# -- evaluation --------------------------------------------------------------------------------------------------
def evaluate_run(run_dir: str | Path, splits: tuple[str, ...] = ("val", "test"), device: str = "cpu") -> dict:
    """``eval``'s numbers (scalars) of a finished run on each of ``splits`` it has: {split: metrics}."""
    cfg, task, model, _ = load_run(run_dir, resolve_device(device))
    data = task.datasets(model)
    dev = resolve_device(device)
    return {s: _scalars(task.evaluate(model, eval_loader(task, data[s], cfg.train, dev), dev)) for s in splits
            if s in data}  # fmt: skip


def evaluate_sub_runs(root: Path, names: list[str], splits: tuple[str, ...], device: str, progress: bool) -> dict:
    """Every sub-run on ``splits`` (one log line each; a progress bar on stderr when ``progress``); each sub-run
    also gets ``final_metrics.json``."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(names), desc="merge: evaluate", unit="task", dynamic_ncols=True, file=sys.stderr)
    results = {}
    for name in names:
        res = evaluate_run(root / name, splits, device)
        results[name] = res
        rundir.atomic_write_json(root / name / rundir.FINAL_FILE, {**res, "merged": True})
        log.info("merge: %s %s", name, " ".join(f"{s}.top1={m.get('top1', float('nan')):.4f}" for s, m in
                                                 res.items()))  # fmt: skip
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(name)
    if bar is not None:
        bar.close()
    return results


def _num(v: float) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _write_card(sub: Path, man: dict[str, Any], name: str) -> None:
    src = next(s for s in man["sources"] if s["sub_run"] == name)
    opts = ", ".join(f"{k}={v}" for k, v in man["options"].items())
    lines = [f"# {name} (merged)", "", f"- task `{src['task']}` of {src['run']}, head kept; backbone "
             f"`{man['backbone']['spec']}` with the {man['method']} merge ({opts}) of {len(man['sources'])} "
             f"{man['adapter']} task vectors (../{MERGE_FILE})", "", "| split | metric | merged | source |",
             "|---|---|---|---|"]  # fmt: skip
    for split, res in man["results"][name].items():
        for key, v in res.items():
            own = src["source_metrics"].get(split, {}).get(key)
            lines.append(f"| {split} | {key} | {_num(v)} | {'' if own is None else _num(own)} |")
    sources = " ".join(s["run"] for s in man["sources"])
    opt_flags = " ".join(f"--{k} {v}" for k, v in man["options"].items())
    lines += ["", f"Reproduce: `python -m vision_peft merge {sources} --method {man['method']} {opt_flags} --out "
              "<folder>`", ""]  # fmt: skip
    rundir.atomic_write_text(sub / rundir.CARD_FILE, "\n".join(lines))


__all__ = ["MergeError", "evaluate_run", "merge_runs", "read_sources", "task_vector"]
