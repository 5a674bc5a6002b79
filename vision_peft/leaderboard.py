"""Who wins a sweep: selection on val with one test evaluation, the leaderboard (CSV) and a Pareto plot.

:func:`select_best` ranks the COMPLETE trials on the val metric only (ties: fewer trainable parameters, then the
earlier trial), evaluates the test split once for the winner and, labelled post hoc, for each method's best, and
writes ``best.json`` (every test evaluation listed with why it was made; a winner already evaluated is not evaluated
again).

``python -m vision_peft leaderboard <sweep dir>`` (or ``--storage URL --study NAME``) reads the Optuna study (every
trial's parameters, state and the figures its worker recorded: val metrics, trainable parameters with and without
the head, median step time, peak memory) and prints a table ranked on the val metric — never on test. The val
metric's 95 % interval is a Wilson interval where the metric is a proportion of ``n`` val items (``top1``), else
``<metric>_ci95`` when the task reports one. The PNG has two panels, val metric vs trainable parameters and vs median
step time, one colour per method, the Pareto front (best val for fewer parameters / less time) drawn as a line.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from vision_peft import rundir, sweep_cli
from vision_peft.sweep_study import (
    BEST_FILE,
    DB_FILE,
    TRIALS_DIR,
    SweepError,
    load_study,
    read_json,
    read_state,
    storage_url,
)

CSV_FILE = "leaderboard.csv"
PNG_FILE = "leaderboard.png"
COLUMNS = ["rank", "trial", "method", "hyperparameters", "state", "val", "val_ci_low", "val_ci_high", "val_n",
           "trainable", "trainable_no_head", "step_time_median_s", "peak_memory_mb", "train_seconds", "run_dir",
           "note"]  # fmt: skip


# -- selection: val only; test once for the best ------------------------------------------------------------------
def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def evaluate_test(run_dir: str | Path, hidden_test: int | None, device: str = "cpu") -> dict[str, Any]:
    """The test split of a trial's run (what ``python -m vision_peft eval <run> --split test`` computes); a trial
    that trained without its test split gets the recipe's test count back, with train/val checked unchanged.

    Raises:
        SweepError: the restored split's train/val differ from the run's ``split.json`` (the test count cannot be
            restored without moving images between splits).
    """
    from vision_peft.engine import eval_loader, resolve_device
    from vision_peft.predict import load_run
    from vision_peft.recipe import build_run_config, deep_merge
    from vision_peft.tasks import TASKS

    run_dir = Path(run_dir)
    dev = resolve_device(device)
    cfg, task, model, info = load_run(run_dir, dev)
    if hidden_test is not None:
        cfg = build_run_config(deep_merge(info.config, {"task": {"split": {"test": hidden_test}}}))
        task = TASKS.get(cfg.task.name).builder(cfg)
        if task.has_classes and info.classes:
            task.set_classes(info.classes)
        saved = read_json(run_dir / rundir.SPLIT_FILE)
        now = {k: [p for p, _ in v] for k, v in task.splits().items()}
        for k in ("train", "val"):
            if k in saved and saved[k] != now.get(k):
                raise SweepError(f"{run_dir}: restoring task.split.test={hidden_test} changes the {k} split")
    data = task.datasets(model)
    if "test" not in data:
        raise SweepError(f"{run_dir}: the recipe has no test split to evaluate")
    res = task.evaluate(model, eval_loader(task, data["test"], cfg.train, dev), dev)
    out = {k: v for k, v in res.items() if isinstance(v, (int, float))}
    if "top1" in out and "n" in out:
        out["top1_ci95"] = list(wilson(round(out["top1"] * out["n"]), int(out["n"])))
    return out


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None with fewer than 3 pairs."""
    if len(a) < 3:
        return None

    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va and vb else None


def _rank_key(t: optuna.trial.FrozenTrial, maximize: bool) -> tuple:
    params = (t.user_attrs.get("parameters") or {}).get("trainable", 0)
    return (-t.value if maximize else t.value, params, t.number)  # ties: fewer trainable parameters, then earlier


def select_best(study: optuna.Study, sweep_dir: Path, posthoc: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Pick the best COMPLETE trial on val, evaluate test once for it (and, post hoc, for each method's best);
    writes ``best.json``. A best already evaluated (same trial) is not evaluated again.

    Raises:
        SweepError: no trial completed.
    """
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: _rank_key(t, maximize))
    if not done:
        raise SweepError(
            f"study {study.study_name!r}: no trial completed; see {sweep_dir / TRIALS_DIR}/*/sweep_trial.json"
        )
    hidden = study.user_attrs.get("hidden_test")
    old = read_json(sweep_dir / BEST_FILE)
    cache = {int(k): v for k, v in (old.get("test_by_trial") or {}).items()}
    evaluations = list(old.get("test_evaluations") or [])

    def test_of(t: optuna.trial.FrozenTrial, why: str) -> dict[str, Any]:
        if t.number not in cache:
            cache[t.number] = evaluate_test(t.user_attrs["run_dir"], hidden, device)
            evaluations.append({"trial": t.number, "why": why, "time": time.time()})
        return cache[t.number]

    def row(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
        return {"trial": t.number, "method": t.user_attrs.get("method"), "val": t.value,
                "metric": t.user_attrs.get("metric"), "params": t.params, "run_dir": t.user_attrs.get("run_dir"),
                "trainable": (t.user_attrs.get("parameters") or {}).get("trainable")}  # fmt: skip

    best = done[0]
    out: dict[str, Any] = {"selected": {**row(best), "test": test_of(best, "selected best (on val)")}}
    if posthoc:
        per: dict[str, optuna.trial.FrozenTrial] = {}
        for t in done:
            per.setdefault(t.user_attrs.get("method"), t)
        rows = {m: {**row(t), "test": test_of(t, f"post hoc: best {m}")} for m, t in per.items()}
        metric = best.user_attrs.get("metric")
        vals = [r["val"] for r in rows.values()]
        tests = [r["test"].get(metric) for r in rows.values()]
        out["post_hoc"] = {
            "note": "post hoc: test of each method's best, NOT used for selection",
            "per_method": rows,
            "val_test_spearman": spearman(vals, tests) if None not in tests else None,
        }
    out["test_by_trial"] = {str(k): v for k, v in cache.items()}
    out["test_evaluations"] = evaluations
    out["hidden_test_split"] = hidden
    rundir.atomic_write_json(sweep_dir / BEST_FILE, out)
    return out


def _state(t: optuna.trial.FrozenTrial) -> str:
    """complete | pruned | stopped (constraint) | failed | running | waiting."""
    if t.state == TrialState.PRUNED:
        return "stopped" if str(t.user_attrs.get("reason", "")).startswith("constraint") else "pruned"
    if t.state == TrialState.FAIL:
        return "failed"
    return t.state.name.lower()


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial, ranked: complete trials on the val metric (ties: fewer parameters), then the others."""
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    rows = []
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        val = ua.get("val") or {}
        metric = ua.get("metric")
        counts = ua.get("parameters") or {}
        value = t.value if t.state == TrialState.COMPLETE else (val.get(metric) if metric else None)
        lo = hi = None
        if value is not None and metric == "top1" and val.get("n"):
            lo, hi = wilson(round(value * val["n"]), int(val["n"]))
        elif metric and isinstance(val.get(f"{metric}_ci95"), list):
            lo, hi = val[f"{metric}_ci95"]
        hp = {k.split(":", 1)[-1]: v for k, v in t.params.items() if k != "adapter.name"}
        note = ua.get("reason", "")
        if "failed_trial" in t.system_attrs:
            note = (note + "; " if note else "") + f"retry of trial {t.system_attrs['failed_trial']}"
        if ua.get("run_dir") and Path(ua["run_dir"]).is_dir() and not note:
            note = read_state(Path(ua["run_dir"])).get("reason", "")
        rows.append({
            "trial": t.number, "method": ua.get("method") or t.params.get("adapter.name")
            or (t.system_attrs.get("fixed_params") or {}).get("adapter.name", ""),
            "hyperparameters": " ".join(f"{k}={_fmt(v)}" for k, v in sorted(hp.items())), "state": _state(t),
            "metric": metric, "val": value, "val_ci_low": lo, "val_ci_high": hi, "val_n": val.get("n"),
            "trainable": counts.get("trainable"), "trainable_no_head": counts.get("trainable_no_head"),
            "step_time_median_s": ua.get("step_time_median"), "peak_memory_mb": ua.get("peak_memory_mb"),
            "train_seconds": ua.get("train_seconds"), "run_dir": ua.get("run_dir", ""), "note": note,
        })  # fmt: skip
    complete = [r for r in rows if r["state"] == "complete"]
    complete.sort(key=lambda r: ((-r["val"] if maximize else r["val"]), r["trainable"] or 0, r["trial"]))
    rest = sorted((r for r in rows if r["state"] != "complete"), key=lambda r: r["trial"])
    for i, r in enumerate(complete):
        r["rank"] = i + 1
    for r in rest:
        r["rank"] = ""
    return complete + rest


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def pareto_front(points: list[tuple[float, float]], maximize: bool = True) -> list[int]:
    """Indices of the non-dominated points of (cost, value): no other point has cost ≤ and value ≥ (≤ when
    minimizing) with one of them strict. Sorted by cost."""
    sign = 1.0 if maximize else -1.0
    front = []
    for i, (c, v) in enumerate(points):
        dominated = any(
            (c2 <= c and sign * v2 >= sign * v) and (c2 < c or sign * v2 > sign * v)
            for j, (c2, v2) in enumerate(points) if j != i
        )  # fmt: skip
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def format_table(rows: list[dict[str, Any]]) -> str:
    """The printed leaderboard (a Markdown table)."""
    metric = next((r["metric"] for r in rows if r.get("metric")), "val")
    head = ["#", "trial", "method", "hyperparameters", f"val {metric} (95 % CI)", "trainable (no head)",
            "step s", "peak MB", "state"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        val = "" if r["val"] is None else f"{r['val']:.4f}"
        if r["val_ci_low"] is not None:
            val += f" [{r['val_ci_low']:.3f}, {r['val_ci_high']:.3f}]"
        params = "" if r["trainable"] is None else f"{r['trainable']:,} ({r['trainable_no_head']:,})"
        st = "" if r["step_time_median_s"] is None else f"{r['step_time_median_s']:.3f}"
        mem = "" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        state = r["state"] + (f": {r['note'][:70]}" if r["note"] and r["state"] != "complete" else "")
        cells = [str(r["rank"]), str(r["trial"]), str(r["method"]), r["hyperparameters"], val, params, st, mem, state]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    rundir.atomic_write_text(path, buf.getvalue())
    return path


def plot_pareto(rows: list[dict[str, Any]], path: Path, maximize: bool = True, title: str = "") -> Path:
    """Two panels (val vs trainable parameters, val vs median step time) of the complete trials; the Pareto front
    of each panel drawn as a step line with its points ringed. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["state"] == "complete" and r["val"] is not None]
    metric = next((r["metric"] for r in done if r.get("metric")), "val")
    methods = sorted({r["method"] for r in done})
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label, logx in ((axes[0], "trainable", "trainable parameters (with head)", True),
                                 (axes[1], "step_time_median_s", "median step time (s)", False)):  # fmt: skip
        pts = [r for r in done if r.get(key)]
        for m in methods:
            mine = [r for r in pts if r["method"] == m]
            ax.scatter([r[key] for r in mine], [r["val"] for r in mine], color=colors[m], label=m, s=40, zorder=3)
            for r in mine:
                if r["val_ci_low"] is not None:
                    ax.plot([r[key]] * 2, [r["val_ci_low"], r["val_ci_high"]], color=colors[m], alpha=0.35, lw=1)
        front = [pts[i] for i in pareto_front([(r[key], r["val"]) for r in pts], maximize)]
        if front:
            xs, ys = [r[key] for r in front], [r["val"] for r in front]
            ax.step(xs, ys, where="post", color="black", lw=1.2, zorder=2, label="Pareto front")
            ax.scatter(xs, ys, facecolors="none", edgecolors="black", s=140, lw=1.5, zorder=4)
        if logx and pts:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"val {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(title or f"sweep: val {metric} vs cost ({len(done)} complete trials)")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_leaderboard(study: optuna.Study, out_dir: str | Path) -> dict[str, Any]:
    """``leaderboard.csv`` and ``leaderboard.png`` in ``out_dir``; returns {"rows", "table", "csv", "png"}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study)
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    csv_path = write_csv(rows, out_dir / CSV_FILE)
    png = plot_pareto(rows, out_dir / PNG_FILE, maximize, f"sweep {study.study_name}")
    return {"rows": rows, "table": format_table(rows), "csv": csv_path, "png": png}


def _open(args: argparse.Namespace) -> tuple[optuna.Study, Path]:
    if args.storage:
        if not args.study:
            raise SweepError("--storage URL needs --study NAME")
        study = load_study(args.storage, args.study)
        return study, Path(args.out or study.user_attrs.get("sweep_dir") or ".")
    if not args.sweep_dir:
        raise SweepError("leaderboard needs a sweep folder or --storage URL --study NAME")
    d = Path(args.sweep_dir)
    if not (d / DB_FILE).is_file():
        raise SweepError(f"{d} holds no {DB_FILE}; give --storage URL --study NAME for a study stored elsewhere")
    url = storage_url(d, None)
    names = [s.study_name for s in optuna.get_all_study_summaries(url)]
    name = args.study or (names[0] if len(names) == 1 else None)
    if name is None:
        raise SweepError(f"{d / DB_FILE} holds the studies {', '.join(names)}; pick one with --study")
    return load_study(url, name), Path(args.out or d)


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``leaderboard`` for ``python -m vision_peft``; the handler is :func:`cli_main` (set as ``func``). The
    arguments live in :mod:`vision_peft.sweep_cli` (the CLI builds its parser from there without optuna)."""
    p = sweep_cli.add_leaderboard_parser(subparsers)
    p.set_defaults(func=cli_main)
    return p


def cli_main(args: argparse.Namespace) -> int:
    """Print the leaderboard and write its files."""
    study, out = _open(args)
    res = write_leaderboard(study, out)
    if args.json:
        print(json.dumps(res["rows"], indent=2, default=str))
    else:
        print(res["table"])
        print(f"\nwrote {res['csv']} and {res['png']}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m vision_peft.leaderboard …`` until the command is wired into vision_peft.cli."""
    p = argparse.ArgumentParser(prog="python -m vision_peft.leaderboard", description=__doc__.splitlines()[0])
    sweep_cli.leaderboard_arguments(p)
    try:
        return cli_main(p.parse_args(argv))
    except (SweepError, LookupError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
