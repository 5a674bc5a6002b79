"""The command line: ``python -m vision_peft train|eval|predict|export|import-peft|merge|list|serve|app|sweep|leaderboard``.

Only this module reads argv. Every command is a thin call into the library, so the CLI, the app and the
Python API cannot drift apart. Errors that are the user's to fix print one line (no traceback) and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from vision_peft import sweep_cli  # the sweep/leaderboard arguments: optuna loads only when they run
from vision_peft.rundir import CONFIG_FILE, CheckpointError, WriteError

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, LookupError, FileNotFoundError, FileExistsError)


def _train(args: argparse.Namespace) -> int:
    from vision_peft.config import EXECUTION_KEYS
    from vision_peft.recipe import apply_overrides, build_run_config, load_recipe, load_run_config, parse_overrides
    from vision_peft.rundir import RunInfo
    from vision_peft.train import run

    if args.resume:
        changed = parse_overrides(args.overrides)
        other = [k for k in _dotted(changed) if k.removeprefix("train.") not in EXECUTION_KEYS or k[:6] != "train."]
        if args.recipe or other:
            raise ValueError(
                "--resume continues a run with its own config.json; give no recipe or overrides other than how it "
                f"executes ({', '.join('--train.' + k for k in EXECUTION_KEYS)}); got "
                + (" ".join(f"--{k}" for k in other) if other else f"the recipe {args.recipe}")
            )
        if changed:  # how it executes, e.g. --train.tensorboard=false once the event files hit a full disk
            cfg = build_run_config(apply_overrides(RunInfo.read(args.resume).config, changed))
        else:
            cfg = load_run_config(args.resume)
    else:
        if not args.recipe:
            raise ValueError(
                "train needs a recipe (a YAML file or a name from tasks/); see `python -m vision_peft list recipes`"
            )
        if args.recipe.endswith(CONFIG_FILE):  # re-run from a run directory's resolved config
            cfg_data = RunInfo.read(args.recipe).config
            cfg = build_run_config(apply_overrides(cfg_data, parse_overrides(args.overrides)))
        else:
            cfg = load_recipe(args.recipe, args.overrides)
    run_dir = run(cfg, resume=args.resume, progress=not args.no_progress)
    print(run_dir)
    return 0


def _dotted(tree: dict, prefix: str = "") -> list[str]:
    """The dotted keys of nested overrides: {"train": {"lr": 1}} -> ["train.lr"]."""
    return [k for key, v in tree.items()
            for k in (_dotted(v, f"{prefix}{key}.") if isinstance(v, dict) and v else [f"{prefix}{key}"])]  # fmt: skip


def _eval(args: argparse.Namespace) -> int:
    from vision_peft.engine import eval_loader, resolve_device
    from vision_peft.predict import load_run

    device = resolve_device(args.device)
    cfg, task, model, _ = load_run(args.run, device)
    data = task.datasets(model)
    if args.split not in data:
        raise ValueError(f"split {args.split!r} not available; splits: {', '.join(data)}")
    res = task.evaluate(model, eval_loader(task, data[args.split], cfg.train, device), device)
    if not args.full:
        res = {k: v for k, v in res.items() if not isinstance(v, list)}
    print(json.dumps(res, indent=2))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from vision_peft.predict import RunSwitcher, is_run_dir, predict_files, predict_runs

    runs, inputs = [args.run], list(args.inputs)
    while inputs and is_run_dir(inputs[0]):  # leading directories holding config.json are further runs
        runs.append(inputs.pop(0))
    if not inputs:
        raise ValueError(f"predict: no input files after the run directories {' '.join(runs)}; give images to predict")
    if len(runs) == 1:
        recs = predict_files(args.run, inputs, device=args.device, top_k=args.top_k, mc_samples=args.mc_samples)
    else:
        sw = RunSwitcher(args.device, max_layouts=1)
        recs = predict_runs(runs, inputs, args.device, args.top_k, args.mc_samples, switcher=sw)
        print(
            f"predict: {len(runs)} runs, {sw.builds} model(s) built, {sw.switches} adapter switch(es)"
            + "".join(f"; {r} loaded on its own: {why}" for r, why in sw.reasons.items()),
            file=sys.stderr,
        )
    for rec in recs:
        print(json.dumps(rec))
    return 0


def _export_pack(args: argparse.Namespace, out: str | None) -> int:
    """``export <run> <run> … --pack --bundle DIR`` and ``export <run> --adapter-for <pack>``."""
    from vision_peft.pack import export_adapter_for, export_pack

    names = args.names.split(",") if args.names else None
    if args.adapter_for:
        if len(args.run) != 1:
            raise SystemExit("--adapter-for takes one run directory")
        meta = export_adapter_for(args.run[0], args.adapter_for, out, name=names[0] if names else None,
                                  atol=args.atol)  # fmt: skip
        print(json.dumps({"adapter": meta["name"], "out": str(Path(out) if out else Path(args.run[0]) / "adapter"),
                          "parity": meta["parity"]["max_abs_diff"]}, indent=2))  # fmt: skip
        return 0
    if not out:
        raise SystemExit("export --pack needs --bundle DIR (the pack folder)")
    man = export_pack(args.run, out, names=names, exporter=args.exporter, atol=args.atol)
    files = {p.name: p.stat().st_size for p in sorted(Path(out).iterdir()) if p.is_file()}
    summary = {
        "bundle": out,
        "format": man["format"],
        "adapters": {n: {"source_run": a["source_run"], "max_abs_diff": a["parity"]["max_abs_diff"],
                         "classes": len(a["labels"])} for n, a in man["adapters"].items()},
        "bytes": sum(files.values()),
        "files": files,
    }  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    if getattr(args, "peft", None):  # export <run> --peft DIR: a peft adapter folder (vision_peft.peft_interop)
        from vision_peft.peft_interop import export_peft

        if len(args.run) != 1 or args.pack or args.adapter_for:
            raise SystemExit("export --peft takes one run directory (no --pack / --adapter-for)")
        print(json.dumps(export_peft(args.run[0], args.peft, atol=args.atol), indent=2))
        return 0
    from vision_peft.export import export_run

    out = args.bundle or args.out
    if args.pack or args.adapter_for:
        return _export_pack(args, out)
    if len(args.run) != 1:
        raise SystemExit(f"{len(args.run)} runs given: export several runs as one pack with --pack --bundle DIR")
    args.run = args.run[0]
    man = export_run(args.run, out, exporter=args.exporter, atol=args.atol, device=args.device, int8=args.int8,
                     fp16=args.fp16, calib=args.calib, calib_method=args.calib_method)  # fmt: skip
    p = man["parity"]
    summary = {
        "bundle": str(Path(out) if out else Path(args.run) / "export"),
        "max_abs_diff": p["max_abs_diff"],
        "passed": p["passed"],
        "files": man["files"],
    }
    if "graphs" in p:  # several graphs (e.g. diffusion denoiser + decoder): one report each
        summary["graphs"] = {
            g: {"max_abs_diff": r["max_abs_diff"], "providers": r["providers"]} for g, r in p["graphs"].items()
        }
    else:
        summary.update(per_batch=p["per_batch"], providers=p["providers"])
    for key in ("int8", "int8_static", "fp16"):  # the variants' reports, their two metric blocks as top-1s
        if key in p:
            summary[key] = {k: v for k, v in p[key].items() if k not in ("fp32", key)}
            summary[key].update({f"{k}_top1": (p[key][k] or {}).get("top1") for k in ("fp32", key)})
    print(json.dumps(summary, indent=2))
    return 0


def _import_peft(args: argparse.Namespace) -> int:
    from vision_peft.peft_import import import_peft

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    summary = import_peft(args.peft_dir, args.backbone, args.task, args.out, classes=classes,
                          overrides=list(args.set or []))  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from vision_peft.merge import MergeError, merge_runs

    if (args.method != "ties" and args.k is not None) or (args.method != "pcb" and args.r is not None):
        raise MergeError(f"--k belongs to --method ties and --r to --method pcb, not to --method {args.method}")
    logging.getLogger("vision_peft").setLevel(logging.INFO)
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    man = merge_runs(args.runs, args.out, args.method, args.lam, args.k, args.r, args.device, splits,
                     progress=not args.no_progress)  # fmt: skip
    per_task = {n: {s: {k: m[k] for k in ("top1", "n") if k in m} for s, m in r.items()}
                for n, r in man["results"].items()}  # fmt: skip
    print(json.dumps({"out": args.out, "method": man["method"], "options": man["options"], "results": per_task},
                     indent=2))  # fmt: skip
    return 0


def _list(args: argparse.Namespace) -> int:
    from vision_peft.adapters import ADAPTERS
    from vision_peft.backbones import BACKBONES
    from vision_peft.data import DATASETS
    from vision_peft.recipe import recipe_dirs
    from vision_peft.tasks import TASKS

    what = args.what
    regs = {"backbones": BACKBONES, "adapters": ADAPTERS, "tasks": TASKS, "datasets": DATASETS}
    if what in regs:
        for name, e in regs[what].items():
            print(f"{name:16s} {e.help}")
    elif what == "recipes":
        seen = set()
        for d in recipe_dirs():
            for f in sorted(d.glob("*.yaml")) if d.is_dir() else []:
                if f.stem not in seen:
                    seen.add(f.stem)
                    print(f"{f.stem:28s} {f}")
    else:
        for k in list(regs) + ["recipes"]:
            print(f"== {k}")
            _list(argparse.Namespace(what=k))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from vision_peft.serve import serve

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: reachable beyond this machine", file=sys.stderr)
    serve(args.bundle, host=args.host, port=args.port, device=args.device, strict=args.strict)
    return 0


def _app(args: argparse.Namespace) -> int:
    try:
        from app.main import launch
    except ImportError as e:
        raise ValueError(f"the browser app is not available in this installation ({e})") from None
    launch(host=args.host, port=args.port, auth=args.auth)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vision_peft", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a recipe; dotted overrides like --train.lr=5e-4")
    t.add_argument("recipe", nargs="?", help="YAML recipe path or name in tasks/ (or a run's config.json)")
    t.add_argument("--resume", help="continue an interrupted run directory from its checkpoint/")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    e = sub.add_parser("eval", help="evaluate a finished run on a split")
    e.add_argument("run")
    e.add_argument("--split", default="test")
    e.add_argument("--device", default="auto")
    e.add_argument("--full", action="store_true", help="include the confusion matrix")
    pr = sub.add_parser("predict", help="predict with one or several finished runs")
    pr.add_argument("run", help="run directory; further run directories may follow (one backbone load per layout)")
    pr.add_argument(
        "inputs", nargs="+",
        help="[more run directories] then input files, as the run's task reads them (images, point clouds …)",
    )  # fmt: skip
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--top-k", type=int, default=5)
    pr.add_argument(
        "--mc-samples", type=int, default=0,
        help="PVeRA runs: average this many predictions with the latent sampled, and report their spread",
    )  # fmt: skip
    x = sub.add_parser("export", help="export a run to an ONNX bundle with a parity check (several runs: --pack)")
    x.add_argument("run", nargs="+", help="run directory; several with --pack (one backbone, one adapter each)")
    x.add_argument("--pack", action="store_true", help="one base graph + one .onnx_adapter per run (needs --bundle)")
    x.add_argument("--names", help="adapter names for --pack / --adapter-for, comma-separated (default: run folders)")
    x.add_argument("--adapter-for", metavar="PACK", help="write this run's adapter pair for an existing pack")
    x.add_argument("--out", help="bundle folder (default <run>/export)")
    x.add_argument("--bundle", help="same as --out")
    x.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    x.add_argument("--atol", type=float, default=1e-4)
    x.add_argument("--device", default="cpu", help="onnxruntime device for the parity check (cpu|cuda)")
    x.add_argument(
        "--int8", nargs="?", const="dynamic", default=None, metavar="dynamic|static",
        help="also write an int8 graph (bare --int8 = dynamic; static = QDQ calibrated on --calib train images) "
        "and report its latency vs fp32 and task-metric change",
    )  # fmt: skip
    x.add_argument("--fp16", action="store_true", help="also write an fp16 graph for the CUDA provider (fp32 I/O)")
    x.add_argument("--calib", type=int, default=256, help="train images calibrating --int8 static (default 256)")
    x.add_argument("--calib-method", default="minmax", help="--int8 static calibration: minmax|entropy|percentile")
    x.add_argument("--peft", metavar="DIR", help="write a peft adapter folder (adapter_config.json + "
                   "adapter_model.safetensors) for PeftModel.from_pretrained instead of an ONNX bundle "
                   "(lora, dora, pvera, adalora runs)")  # fmt: skip
    ip = sub.add_parser("import-peft", help="build a run directory from a peft LoRA or AdaLoRA adapter folder")
    ip.add_argument("peft_dir", help="folder with adapter_config.json + adapter_model.safetensors")
    ip.add_argument("--backbone", required=True, help="the base model: timm:<name> or open_clip:<arch>@<tag>")
    ip.add_argument("--task", required=True, help="recipe (file or name in tasks/) or task name (classification …)")
    ip.add_argument("--out", required=True, help="the run directory to write (e.g. runs/imported)")
    ip.add_argument("--classes", help="class names in the head's logit order, comma-separated (default: the data)")
    ip.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="recipe override, repeatable (e.g. --set task.data_root=data/aid)")  # fmt: skip
    mg = sub.add_parser("merge", help="merge several runs' adapters into one backbone (task arithmetic, TIES, PCB)")
    mg.add_argument("runs", nargs="+", help="finished run directories: one backbone, one re-parameterising adapter")
    mg.add_argument("--method", required=True, choices=["task_arithmetic", "ties", "pcb"])
    mg.add_argument("--lam", type=float, help="scale λ of the merged update (default 1.0)")
    mg.add_argument("--k", type=float, help="ties: fraction of each task vector's entries kept (default 0.2)")
    mg.add_argument("--r", type=float, help="pcb: fraction of each task's balancing scores kept (default 0.1)")
    mg.add_argument("--out", required=True, help="the merge folder to write (e.g. runs/merged); heads stay per task")
    mg.add_argument("--device", default="cpu")
    mg.add_argument("--splits", default="val,test", help="splits every merged task is evaluated on")
    mg.add_argument("--no-progress", action="store_true", help="no progress bar")
    ls = sub.add_parser("list", help="list backbones, adapters, tasks, datasets or recipes")
    ls.add_argument(
        "what", nargs="?", default="all", choices=["all", "backbones", "adapters", "tasks", "datasets", "recipes"]
    )
    s = sub.add_parser("serve", help="serve an exported bundle over HTTP (torch-free runtime)")
    s.add_argument("bundle")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--strict", action="store_true", help="refuse to start when CUDA was asked for but is not used")
    a = sub.add_parser("app", help="start the browser app")
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, default=7860)
    a.add_argument("--auth", help="user:password (required when binding beyond localhost)")
    sweep_cli.add_sweep_parser(sub)
    sweep_cli.add_leaderboard_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "train":
        args.overrides = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    handlers = {
        "train": _train,
        "eval": _eval,
        "predict": _predict,
        "export": _export,
        "import-peft": _import_peft,
        "merge": _merge,
        "list": _list,
        "app": _app,
        "serve": _serve,
        "sweep": sweep_cli.cli_main,
        "leaderboard": sweep_cli.leaderboard_main,
    }
    try:
        return handlers[args.cmd](args)
    except (*USER_ERRORS, CheckpointError, WriteError) as e:  # a full disk is the user's to fix, too
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
