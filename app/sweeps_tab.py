"""The Sweeps tab: compare methods on one recipe with ``python -m vision_peft sweep`` run as a child process.

Pick a recipe and its data, tick the methods (the adapter registry filtered by the sweep's own compatibility check,
:func:`vision_peft.recipe.compatible_adapters`, so the tab and the CLI agree); each ticked method gets a small
default search (a log range around the recipe's learning rate, its size fields at half/same/double, only values
its config accepts together and whose model builds on the backbone, and targets the backbone has) written
into a real space file in the sweep folder, validated by :func:`vision_peft.sweep_space.load_space` before the
sweep starts. The leaderboard and the Pareto plot (:mod:`vision_peft.leaderboard`) refresh from the study while it
runs; Export best exports the best trial's run directory. Sweeps re-attach after a reload (app/sweep_jobs.py).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from app.catalog import recipes_for, task_views  # noqa: E402
from app.errors import friendly  # noqa: E402
from app.sweep_jobs import RECIPE_IN, SPACE_IN, Sweep, SweepManager, export_best, leaderboard  # noqa: E402
from app.uploads import confine  # noqa: E402
from vision_peft.paths import REPO_ROOT, resolve_data_path  # noqa: E402

# tasks whose predict panel ranks class labels or answers queries: a val top-1 / accuracy to rank trials on
SWEEP_PANELS = ("ranked_images", "support_query", "ranked_points")
# size-like adapter fields searched at half / same / double (AdaLoRA's init_r stays: target_r is searched below it)
SIZE_FIELDS = ("r", "num_tokens", "pad", "target_r", "reduction", "hidden_dim")
WIDTH_FIELDS = ("hidden_dim",)  # size fields bounded by the backbone's feature width (Moment Probing's projection)
TARGET_GROUPS = ("qkv", "conv_pw", "mlp")  # portable groups tried in turn when the recipe names no targets
TABLE = ["rank", "trial", "method", "hyperparameters", "state", "val", "trainable", "step s", "note"]


def sweepable_recipes() -> list[str]:
    """Recipes (tasks/*.yaml) of the tasks a sweep can rank (see SWEEP_PANELS)."""
    return [r for v in task_views() if v.panel in SWEEP_PANELS for r in recipes_for(v.name)]


def recipe_facts(recipe: str) -> tuple[dict[str, Any], str, str]:
    """(recipe data, backbone name, task name) of a recipe name or path."""
    from vision_peft.recipe import build_run_config
    from vision_peft.sweep_space import recipe_data

    if not recipe:
        raise ValueError("choose a recipe")
    _, data = recipe_data(recipe)
    cfg = build_run_config(data)
    return data, cfg.backbone.name, cfg.task.name


def methods_for(recipe: str) -> list[str]:
    """The adapters the recipe's backbone and task can take (the sweep's own check)."""
    from vision_peft.recipe import compatible_adapters

    _, backbone, task = recipe_facts(recipe)
    return compatible_adapters(backbone, task)


@functools.lru_cache(maxsize=8)
def _random_backbone(backbone_json: str) -> Any:
    """The backbone of a config, built once with random weights (shapes and module names are all that matter)."""
    from vision_peft.backbones import build_backbone
    from vision_peft.config import BackboneConfig

    return build_backbone(
        dataclasses.replace(BackboneConfig(**json.loads(backbone_json)), pretrained=False, weights=None)
    )


def _backbone_json(rdata: dict[str, Any]) -> str:
    from vision_peft.recipe import build_run_config

    return json.dumps(dataclasses.asdict(build_run_config(rdata).backbone), sort_keys=True)


def backbone_facts(rdata: dict[str, Any]) -> tuple[int, frozenset[str]]:
    """(feature width ``embed_dim``, portable target groups) of the recipe's backbone (built once per config)."""
    bb = _random_backbone(_backbone_json(rdata))
    return int(bb.embed_dim), frozenset(bb.target_groups)


def _valid(cls: type, fields: dict[str, Any]) -> bool:
    """The adapter's config class accepts these field values (its ``__post_init__`` holds the joint rules)."""
    try:
        cls(**fields)
    except (TypeError, ValueError):
        return False
    return True


def size_choices(cls: type, own: dict[str, Any], width: int) -> dict[str, list[int]]:
    """Half / same / double of every SIZE_FIELDS field (the recipe's value, else the default; WIDTH_FIELDS first
    capped at the backbone's feature width), kept only where every combination is a config the class accepts and
    no width-bound value exceeds the width. Fields are added in declaration order, each value checked against every
    combination of the fields before it, so the sweep cannot sample an invalid pair (e.g. AdaLoRA target_r > init_r)."""
    base = {f.name: own[f.name] for f in dataclasses.fields(cls) if f.name in own and f.name != "name"}
    out: dict[str, list[int]] = {}
    for f in dataclasses.fields(cls):
        d = base.get(f.name, f.default)
        if f.name not in SIZE_FIELDS or isinstance(d, bool) or not isinstance(d, int):
            continue
        if f.name in WIDTH_FIELDS:
            d = min(d, width)
        combos = [dict(zip(out, c, strict=True)) for c in itertools.product(*out.values())]
        keep = [v for v in sorted({max(1, d // 2), d, 2 * d})
                if (f.name not in WIDTH_FIELDS or v <= width)
                and all(_valid(cls, {**base, **c, f.name: v}) for c in combos)]  # fmt: skip
        if keep:
            out[f.name] = keep
    return out


def default_search(method: str, rdata: dict[str, Any]) -> dict[str, Any]:
    """A method's small sub-space: ``train.lr`` log range [lr/3, 3·lr] around the recipe's, its size fields
    (:func:`size_choices`, from the recipe's values when it is the recipe's method, else the adapter's defaults;
    a value whose model does not build on the recipe's backbone is dropped, :func:`_builds`), and its targets: the recipe's carried over to another method that has targets, or — when the recipe names none
    and the adapter's default groups are not on this backbone — the first of TARGET_GROUPS the backbone has."""
    from vision_peft.adapters import ADAPTERS

    lr = float((rdata.get("train") or {}).get("lr") or 1e-3)
    out: dict[str, Any] = {"train.lr": {"low": float(f"{lr / 3:.3g}"), "high": float(f"{lr * 3:.3g}"), "log": True}}
    cls = ADAPTERS.get(method).config_cls
    if cls is None:
        return out
    section = rdata.get("adapter") if isinstance(rdata.get("adapter"), dict) else {}
    own = section if section.get("name") == method else {}
    width, groups = backbone_facts(rdata)
    targets = next((f for f in dataclasses.fields(cls) if f.name == "targets"), None)
    if targets is not None and not own:
        if section.get("targets"):
            out["adapter.targets"] = [list(section["targets"])]
        else:
            default = targets.default_factory() if targets.default_factory is not dataclasses.MISSING else []
            if default and not set(default) <= groups:
                pick = next((g for g in TARGET_GROUPS if g in groups), None)
                if pick is not None:
                    out["adapter.targets"] = [[pick]]
    fixed = {k: v[0] for k, v in out.items() if k.startswith("adapter.")}
    rjson = json.dumps(rdata, sort_keys=True, default=str)
    for k, values in size_choices(cls, own, width).items():
        built = [v for v in values if _builds(rjson, method, json.dumps({**fixed, f"adapter.{k}": v}))]
        if built:
            out[f"adapter.{k}"] = built
    return out


@functools.lru_cache(maxsize=512)
def _builds(rdata_json: str, method: str, overrides_json: str) -> bool:
    """The adapter with these dotted overrides applies to (a copy of) the recipe's backbone, so its own checks
    against the backbone pass: LST's reduction divides every tapped width, a pad leaves an image, MP's hidden_dim
    fits the feature width … (random weights; the task's data is not read)."""
    import copy

    from vision_peft.adapters import apply_adapter
    from vision_peft.config import ConfigError
    from vision_peft.sweep_space import trial_config

    rdata = json.loads(rdata_json)
    try:
        cfg = trial_config(rdata, {"adapter.name": method, **json.loads(overrides_json)})
        apply_adapter(copy.deepcopy(_random_backbone(_backbone_json(rdata))), cfg.adapter)
    except (ConfigError, ValueError, RuntimeError):
        return False
    return True


def build_space(rdata: dict[str, Any], methods: list[str], epochs: int = 0, max_steps: int = 0) -> str:
    """The space file's text for the ticked methods (each with :func:`default_search`)."""
    space: dict[str, Any] = {"adapter.name": list(methods)}
    for m in methods:
        space[m] = default_search(m, rdata)
    fixed = {k: int(v) for k, v in (("train.epochs", epochs), ("train.max_steps", max_steps)) if v and v == v}
    if fixed:
        space["fixed"] = fixed
    space.update(pruner="median", methods="round_robin")
    head = "# written by the app's Sweeps tab: each ticked method with its default search (vision_peft.sweep_space)\n"
    return head + yaml.safe_dump(space, sort_keys=False, default_flow_style=None)


def manager(state: Any) -> SweepManager:
    """The app's sweep manager (one per AppState, made on first use; it re-attaches from the state file)."""
    if getattr(state, "sweeps", None) is None:
        state.sweeps = SweepManager(state.runs_root, env={"PYTHONPATH": str(REPO_ROOT)})
    return state.sweeps


def _int(v: Any, name: str, low: int) -> int:
    if v is None or v != v or float(v) != int(v) or int(v) < low:
        raise ValueError(f"{name} must be a whole number ≥ {low}, got {v!r}")
    return int(v)


def start_sweep(state: Any, recipe: str, data: str | None, methods: list[str] | None, trials: Any,
                minutes: Any, device: str, workers: Any, epochs: Any = 0, max_steps: Any = 0) -> Sweep:  # fmt: skip
    """Validate the inputs, write the recipe and the space into a new sweep folder, start the sweep."""
    from vision_peft.recipe import compatible_adapters
    from vision_peft.sweep_space import compatible, load_space

    rdata, backbone, task = recipe_facts(recipe)
    if not methods:
        raise ValueError("tick at least one method to compare")
    bad = [m for m in methods if not compatible(m, backbone, task)]
    if bad:
        raise ValueError(
            f"{', '.join(bad)} cannot adapt backbone {backbone!r} for task {task!r}; compatible methods: "
            f"{', '.join(compatible_adapters(backbone, task))}"
        )
    n = _int(trials, "trials", 1)
    k = _int(workers, "workers", 1)
    ep, steps = _int(epochs or 0, "epochs per trial", 0), _int(max_steps or 0, "max steps per trial", 0)
    if minutes is not None and minutes == minutes and minutes < 0:
        raise ValueError(f"minutes must be ≥ 0 (0 = no time limit), got {minutes}")
    if data:
        root = confine(data, state.data_root)
        if not root.is_dir():
            raise ValueError(f"{data} is not a folder inside {state.data_root}")
        own = str((rdata.get("task") or {}).get("data_root") or "")
        if not own or resolve_data_path(own).resolve() != root:
            rdata["task"].pop("classes", None)  # another folder: its own classes
        rdata["task"]["data_root"] = str(root)
    mgr = manager(state)
    sid, d = mgr.new_dir(Path(recipe).stem)
    from vision_peft import rundir

    rundir.atomic_write_text(d / RECIPE_IN, yaml.safe_dump(rdata, sort_keys=False))
    rundir.atomic_write_text(d / SPACE_IN, build_space(rdata, list(methods), ep, steps))
    load_space(d / SPACE_IN, d / RECIPE_IN)  # a bad space shows in the page, not in a log
    form = {"recipe": recipe, "data": data or "", "methods": list(methods), "trials": n,
            "minutes": float(minutes) if minutes else 0, "device": device or "cpu", "workers": k, "epochs": ep,
            "max_steps": steps}  # fmt: skip
    return mgr.start(sid, Path(recipe).stem, n, k, float(minutes) if minutes else None, device or "cpu", form)


FORM_FIELDS = ("recipe", "data", "methods", "trials", "minutes", "device", "workers", "epochs", "max_steps")


def form_of(sw: Sweep) -> dict[str, Any]:
    """The Sweeps form a sweep was started from: its record's ``form``, or — for a sweep recorded before the form
    was kept — read back from its command line and its space file (the data folder is then the recipe's own)."""
    if sw.form:
        return {k: sw.form.get(k) for k in FORM_FIELDS}
    cmd = list(sw.cmd)

    def opt(flag: str, default: Any) -> Any:
        return cmd[cmd.index(flag) + 1] if flag in cmd[:-1] else default

    try:
        space = yaml.safe_load((Path(sw.sweep_dir) / SPACE_IN).read_text()) or {}
    except (OSError, yaml.YAMLError):
        space = {}
    fixed = space.get("fixed") if isinstance(space.get("fixed"), dict) else {}
    names = space.get("adapter.name")
    return {"recipe": sw.recipe, "data": "", "methods": list(names) if isinstance(names, list) else [],
            "trials": int(opt("--trials", sw.trials)), "minutes": float(opt("--timeout", 0)),
            "device": opt("--device", "cpu"), "workers": int(opt("--workers", 1)),
            "epochs": int(fixed.get("train.epochs") or 0), "max_steps": int(fixed.get("train.max_steps") or 0)}  # fmt: skip


def best_run(state: Any, sid: str) -> Path:
    """The best trial's run directory: best.json's selection once the sweep selected, else the top complete row."""
    from vision_peft.sweep_study import BEST_FILE, read_json

    sw = manager(state).get(sid)
    picked = (read_json(Path(sw.sweep_dir) / BEST_FILE).get("selected") or {}).get("run_dir")
    if not picked:
        lb = leaderboard(sw)
        done = [r for r in (lb or {}).get("rows", []) if r["state"] == "complete"]
        if not done:
            raise ValueError(f"sweep {sid} has no complete trial yet; wait for one")
        picked = done[0]["run_dir"]
    return Path(picked)


def view(state: Any, sid: str | None, last_plot: tuple | None = None) -> dict[str, Any]:
    """What the page shows for a sweep: status, table rows, the Pareto PNG (rewritten when trials finished)."""
    mgr = manager(state)
    sid = sid or mgr.current()
    if not sid:
        return {"sid": None, "html": "no sweep yet", "table": pd.DataFrame(columns=TABLE), "png": None, "log": "",
                "command": "", "plot_key": last_plot}  # fmt: skip
    sw = mgr.get(sid)
    lb = leaderboard(sw)
    done, total = (lb["done"], lb["total"]) if lb else (0, sw.trials)
    rows = lb["rows"] if lb else []
    table = pd.DataFrame([[r["rank"], r["trial"], r["method"], r["hyperparameters"], r["state"],
                           None if r["val"] is None else round(r["val"], 4), r["trainable"],
                           None if r["step_time_median_s"] is None else round(r["step_time_median_s"], 4),
                           r["note"][:80]] for r in rows], columns=TABLE)  # fmt: skip
    key = (sid, tuple((r["trial"], r["state"]) for r in rows))
    png = Path(sw.sweep_dir) / "leaderboard.png"
    if lb and any(r["state"] == "complete" for r in rows) and (key != last_plot or not png.is_file()):
        from vision_peft.leaderboard import write_leaderboard

        png = write_leaderboard(lb["study"], sw.sweep_dir)["png"]
    metric = next((r["metric"] for r in rows if r.get("metric")), "val")
    pct = 100 * done / max(total, 1)
    html = (f"<div id='sweep-status'><b>{sid}</b> — {sw.status}, trials {done} / {total} ({pct:.0f} %)"
            f"<progress value='{done}' max='{max(total, 1)}' style='width:100%'></progress>"
            f"<small>ranked on val {metric}; folder {sw.sweep_dir}</small></div>")  # fmt: skip
    return {"sid": sid, "html": html, "table": table, "png": str(png) if png.is_file() else None,
            "log": sw.log_tail(), "command": sw.command_line, "plot_key": key}  # fmt: skip


def sweeps_tab(demo: gr.Blocks, state: Any) -> None:
    """The tab's components and handlers (called inside ``with gr.Tab("Sweeps")`` by build_app)."""
    from app.main import devices

    mgr = manager(state)
    recipes = sweepable_recipes()
    first = recipes[0] if recipes else None
    folders = sorted(p.name for p in state.data_root.iterdir() if p.is_dir()) if state.data_root.is_dir() else []
    gr.Markdown("Compare methods on one recipe: an Optuna sweep (`python -m vision_peft sweep`), every trial a run.")
    with gr.Row():
        recipe = gr.Dropdown(recipes, value=first, label="recipe (tasks/*.yaml)", elem_id="sweeps-recipe")
        data = gr.Dropdown([("the recipe's data", ""), *folders], value="", allow_custom_value=True,
                           label=f"data folder (inside {state.data_root})", elem_id="sweeps-data")  # fmt: skip
        backbone = gr.Textbox(label="backbone (the recipe's)", interactive=False)
    methods = gr.CheckboxGroup([], label="methods to compare (compatible with the backbone)", elem_id="sweeps-methods")
    with gr.Row():
        trials = gr.Number(value=6, label="trials", precision=0, minimum=0, elem_id="sweeps-trials")
        minutes = gr.Number(value=0, label="minutes (0 = no limit)", minimum=0)
        device = gr.Dropdown(devices(), value="cpu", label="device")
        workers = gr.Number(value=1, label="workers", precision=0, minimum=0)
        epochs = gr.Number(value=0, label="epochs per trial (0 = recipe)", precision=0, minimum=0,
                           elem_id="sweeps-epochs")
        max_steps = gr.Number(value=0, label="max steps per trial (0 = no cap)", precision=0, minimum=0,
                              elem_id="sweeps-steps")
    space = gr.Code(language="yaml", label="space file (written into the sweep folder)", interactive=False)
    with gr.Row():
        start = gr.Button("Start sweep", variant="primary", elem_id="sweeps-start")
        stop = gr.Button("Stop sweep", variant="stop")
    sweep = gr.Dropdown([s.id for s in mgr.list()], label="sweep", allow_custom_value=True, elem_id="sweeps-pick")
    status = gr.HTML()
    command = gr.Textbox(label="CLI command that reruns this sweep", interactive=False)
    table = gr.Dataframe(headers=TABLE, label="leaderboard (ranked on val)", interactive=False,
                         elem_id="sweeps-leaderboard")  # fmt: skip
    # the Pareto figure (two panels side by side) gets the full width, the log goes below it
    plot = gr.Image(label="Pareto: val vs trainable parameters / step time", type="filepath",
                    elem_id="sweeps-pareto", height=420)  # fmt: skip
    log = gr.Textbox(label="sweep log", lines=10, max_lines=14)
    with gr.Row():
        export = gr.Button("Export best", elem_id="sweeps-export")
        bundle = gr.File(label="best trial's bundle (zip)", elem_id="sweeps-bundle")
        parity = gr.JSON(label="parity report")
    plot_key = gr.State(None)

    @friendly
    def on_recipe(name, ticked):
        rdata, bb, _ = recipe_facts(name)
        ok = methods_for(name)
        own = (rdata.get("adapter") or {}).get("name")
        keep = [m for m in ticked or [] if m in ok] or [m for m in (own, "linear") if m in ok]
        return gr.update(choices=ok, value=keep), bb

    @friendly
    def on_space(name, ticked, n_epochs, steps):
        if not name or not ticked:
            return ""
        return build_space(recipe_facts(name)[0], list(ticked), int(n_epochs or 0), int(steps or 0))

    recipe.change(on_recipe, [recipe, methods], [methods, backbone], api_name="sweeps_recipe")
    for comp in (recipe, methods, epochs, max_steps):
        comp.change(on_space, [recipe, methods, epochs, max_steps], [space], api_visibility="private")

    outs = [sweep, status, table, plot, log, command, plot_key]

    def _show(v: dict[str, Any], choices: bool = False, same_plot: bool = False):
        pick = gr.update(choices=[s.id for s in mgr.list()], value=v["sid"]) if choices else gr.skip()
        png = gr.skip() if same_plot else v["png"]
        return pick, v["html"], v["table"], png, v["log"], v["command"], v["plot_key"]

    @friendly
    def on_start(name, folder, ticked, n, mins, dev, k, n_epochs, steps):
        sw = start_sweep(state, name, folder, ticked, n, mins, dev, k, n_epochs, steps)
        return _show(view(state, sw.id), choices=True)

    start.click(on_start, [recipe, data, methods, trials, minutes, device, workers, epochs, max_steps], outs,
                api_name="sweeps_start")  # fmt: skip

    @friendly
    def on_refresh(sid, last):
        v = view(state, sid, last)
        return _show(v, same_plot=v["plot_key"] == last and v["png"] is not None)

    timer = gr.Timer(2.0)
    timer.tick(on_refresh, [sweep, plot_key], outs, api_visibility="private")
    sweep.change(lambda sid: _show(view(state, sid)), [sweep], outs, api_name="sweeps_view")

    @friendly
    def on_stop(sid):
        if not sid:
            raise ValueError("no sweep selected")
        sw = mgr.stop(sid)
        return _show(view(state, sw.id))

    stop.click(on_stop, [sweep], outs, api_name="sweeps_stop")

    numbers = [trials, minutes, device, workers, epochs, max_steps]  # FORM_FIELDS[3:], in that order

    def restored(sid: str | None) -> dict[str, Any] | None:
        """The re-attached sweep's form, where its recipe still exists here (else the form keeps its defaults)."""
        if not sid:
            return None
        f = form_of(mgr.get(sid))
        if f["recipe"] not in recipes:
            return None
        if f["data"] and not (state.data_root / str(f["data"])).is_dir():
            f["data"] = ""  # the folder is gone: the recipe's own data
        if f["device"] not in devices():
            f["device"] = "cpu"
        return f

    @friendly
    def on_load(name, ticked):
        v = view(state, None)
        f = restored(v["sid"])
        if f is not None:  # a reload shows the settings of the sweep it re-attaches to
            name, ticked = f["recipe"], f["methods"]
        methods_update, bb = on_recipe(name, ticked) if name else (gr.skip(), "")
        rest = [gr.skip()] * len(numbers) if f is None else [f[k] for k in FORM_FIELDS[3:]]
        head = [gr.skip(), gr.skip()] if f is None else [f["recipe"], f["data"]]
        return (*head, methods_update, bb, *rest, *_show(v, choices=True))

    demo.load(on_load, [recipe, methods], [recipe, data, methods, backbone, *numbers, *outs],
              api_name="sweeps_reattach")  # fmt: skip

    @friendly
    def on_export(sid):
        if not sid:
            raise ValueError("no sweep selected")
        run = best_run(state, sid)
        return export_best(run, dict(os.environ, PYTHONPATH=str(REPO_ROOT)))

    export.click(on_export, [sweep], [bundle, parity], api_name="sweeps_export")
