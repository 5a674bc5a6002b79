"""Acceptance benchmark for the few-shot task (MVP) on AID's novel classes: one command, one table.

    export VISION_PEFT_DATA=/work/shared/data VISION_PEFT_WEIGHTS=/work/shared/weights
    python bench/fewshot_aid.py                       # meta-trains (or reuses) two runs, then evaluates

Rows, on the *same* episodes (EpisodeSampler over the novel classes, seed 0), 5-way, 15 queries per class:
frozen ProtoNet (cosine prototypes, no tuning) · linear-probe fine-tuning per episode · prompts without
meta-training (zero prompts + per-episode fine-tuning) · MVP without PER · MVP; plus the meta-trained prompts
without per-episode fine-tuning. 1-shot and 5-shot; a various-way block (N drawn from 3–7: the split has 7
novel classes). Mean accuracy ± 95 % CI (1.96·std/√n over episodes).

CPU budget: the frozen layers up to the grid run once per image (their output is cached), rows without
prompt fine-tuning use cached embeddings and always get all episodes; the rows with per-episode prompt
fine-tuning run episode by episode, all three on episode i before any goes to i+1, until ``--ft-minutes``
is spent per setting, and report how many episodes they reached (the first n of the same episode list).
Choices (input size 128², 10 fine-tuning steps, fine-tuning lr) come from the recipe; nothing is tuned on
the novel classes.

On a 2-core machine the two settings can run side by side, one thread each, and be merged afterwards:

    python bench/fewshot_aid.py --threads 1 --shots 1 --out /tmp/fs1.json &
    python bench/fewshot_aid.py --threads 1 --shots 5 --out /tmp/fs5.json; wait
    python bench/fewshot_aid.py --merge /tmp/fs1.json /tmp/fs5.json     # → bench/results/fewshot_aid.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vision_peft.data.episodes import EpisodeSampler, ImageCache, scan_class_split  # noqa: E402
from vision_peft.paths import resolve_data_path  # noqa: E402
from vision_peft.recipe import load_recipe  # noqa: E402
from vision_peft.tasks import TASKS  # noqa: E402
from vision_peft.tasks.fewshot import classify_episode, mean_ci95, prototypes  # noqa: E402


def meta_train(recipe: str, runs_root: Path, name: str, overrides: list[str], retrain: bool) -> Path:
    from vision_peft.train import run

    d = runs_root / name
    cfg = load_recipe(recipe, [*overrides, f"output.runs_root={runs_root}", f"output.name={name}"])
    if (d / "adapter.safetensors").is_file() and not retrain:
        saved = json.loads((d / "config.json").read_text())["config"]
        want = cfg.to_dict()
        if {k: v for k, v in saved.items() if k != "output"} == {k: v for k, v in want.items() if k != "output"}:
            print(f"reusing meta-trained run {d} (same config)", flush=True)
            return d
    if d.exists():
        import shutil

        shutil.rmtree(d)
    return Path(run(cfg, progress=False))


def load_model(run_dir: Path):
    from vision_peft.predict import load_run

    _, _, model, info = load_run(run_dir, "cpu")
    final = json.loads((run_dir / "final_metrics.json").read_text())
    return model, final, info


@torch.no_grad()
def embed_all(model, grids: torch.Tensor, bs: int = 128) -> torch.Tensor:
    model.eval()
    return torch.cat([model.embed_grid(grids[i : i + bs]) for i in range(0, len(grids), bs)])


def episode_index(sampler: EpisodeSampler, n: int, index: dict[str, int]) -> list[tuple[np.ndarray, ...]]:
    out = []
    for i in range(n):
        ep = sampler.episode(i)
        out.append(
            (
                np.array([index[p] for p, _ in ep.support]),
                np.array([lab for _, lab in ep.support]),
                np.array([index[p] for p, _ in ep.query]),
                np.array([lab for _, lab in ep.query]),
                len(ep.classes),
            )
        )
    return out


def protonet_acc(emb: torch.Tensor, ep) -> float:
    s, sl, q, ql, n = ep
    sl_t = torch.from_numpy(sl)
    protos = prototypes(emb[s], sl_t, n)
    pred = (emb[q] @ F.normalize(protos, dim=-1).T).argmax(1).numpy()
    return float((pred == ql).mean())


def linear_probe_acc(emb: torch.Tensor, ep, steps: int = 100, lr: float = 0.01) -> float:
    """Per-episode linear classifier on frozen L2-normalised embeddings (Adam, initialised from prototypes)."""
    s, sl, q, ql, n = ep
    x, y = emb[s], torch.from_numpy(sl)
    w = (10 * F.normalize(prototypes(x, y, n), dim=-1)).clone().requires_grad_(True)  # (N, D)
    b = torch.zeros(n, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(x @ w.T + b, y) + 1e-4 * (w**2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    pred = (emb[q] @ w.detach().T + b.detach()).argmax(1).numpy()
    return float((pred == ql).mean())


def fmt(accs: list[float]) -> str:
    m, ci = mean_ci95(accs)
    return f"{100 * m:.2f} ± {100 * ci:.2f}"


def merge_results(parts: list[Path], out: Path) -> int:
    """Combine result files from runs that each measured some ``--shots``; everything else must agree."""
    merged: dict | None = None
    for p in parts:
        d = json.loads(p.read_text())
        if merged is None:
            merged = d
            continue
        for key in ("setup", "meta_training"):
            if d[key] != merged[key]:
                raise SystemExit(f"{p}: '{key}' differs from {parts[0]}; these runs are not comparable")
        clash = set(d["settings"]) & set(merged["settings"])
        if clash:
            raise SystemExit(f"{p}: setting(s) {sorted(clash)} also in an earlier file; pass each setting once")
        merged["settings"].update(d["settings"])
    merged["settings"] = dict(sorted(merged["settings"].items(), key=lambda kv: int(kv[0].split()[1].split("-")[0])))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2) + "\n")
    for name, block in merged["settings"].items():
        print(f"\n### {name}\n")
        for r in block["rows"]:
            print(
                f"| {r['row']} | {r['episodes']} | {100 * r['acc']:.2f} ± {100 * r['ci95']:.2f} | {r['trainable']:,} |"
            )
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="fewshot-aid-1shot", help="meta-training recipe (tasks/)")
    ap.add_argument("--runs-root", default=str(ROOT / "runs" / "fewshot-bench"))
    ap.add_argument("--retrain", action="store_true", help="meta-train again even if the runs exist")
    ap.add_argument("--episodes", type=int, default=600, help="test episodes per setting")
    ap.add_argument("--ft-minutes", type=float, default=12.0, help="time budget per setting for fine-tuning rows")
    ap.add_argument("--ft-max-episodes", type=int, default=600)
    ap.add_argument("--shots", default="1,5")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fewshot_aid.json"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge per-setting result files into --out and exit")
    args = ap.parse_args(argv)
    if args.merge:
        return merge_results([Path(p) for p in args.merge], Path(args.out))
    if args.threads:
        torch.set_num_threads(args.threads)
    runs_root = Path(args.runs_root)

    # 1. meta-training (through the shared engine), with and without PER
    runs = {
        "mvp": meta_train(args.recipe, runs_root, "mvp-1shot-per", [], args.retrain),
        "mvp_noper": meta_train(args.recipe, runs_root, "mvp-1shot-noper", ["task.per_mode=none"], args.retrain),
    }
    models, meta = {}, {}
    for k, d in runs.items():
        models[k], final, info = load_model(d)
        meta[k] = {
            "run": str(d),
            "meta_train_seconds": final["timing"]["train_seconds"],
            "meta_train_steps": final["step"],
            "val_acc_no_finetune": final.get("val", {}).get("acc"),
            "val_ci95": final.get("val", {}).get("ci95"),
            "trainable": info.parameters["trainable"],
        }
    cfg = load_recipe(args.recipe)
    t = cfg.task
    task = TASKS.get("fewshot").builder(cfg)
    frozen = task.build_model().eval()  # zero prompts = the frozen backbone exactly
    models["prompt_no_meta"] = task.build_model().eval()
    models["mvp"].per_mode, models["mvp_noper"].per_mode = t.per_mode, "none"
    models["prompt_no_meta"].per_mode = t.per_mode

    # 2. novel images → frozen grids (once) → embeddings per model
    files = scan_class_split(resolve_data_path(t.data_root), t.classes)["novel"]
    paths = [p for c in sorted(files) for p in files[c]]
    index = {p: i for i, p in enumerate(paths)}
    cache = ImageCache(task.image_spec(frozen))
    t0 = time.perf_counter()
    with torch.no_grad():
        grids = torch.cat(
            [frozen.grid(torch.stack([cache(p) for p in paths[i : i + 64]])) for i in range(0, len(paths), 64)]
        )
    grid_s = time.perf_counter() - t0
    emb = {"frozen": embed_all(frozen, grids), "mvp": embed_all(models["mvp"], grids)}
    emb["mvp_noper"] = embed_all(models["mvp_noper"], grids)
    print(f"{len(paths)} novel images: grids {tuple(grids.shape)} in {grid_s:.1f}s", flush=True)

    result = {
        "setup": {
            "backbone": cfg.backbone.name,
            "image_size": cfg.backbone.image_size,
            "adapter": f"{cfg.adapter.name} (stage {getattr(cfg.adapter, 'stage', '-')})",
            "finetune_steps": t.finetune_steps,
            "finetune_lr": t.finetune_lr,
            "finetune_pseudo_per_class": t.finetune_pseudo_per_class,
            "per_mode": t.per_mode,
            "per_ratio": t.per_ratio,
            "episode_seed": 0,
            "queries_per_class": 15,
            "threads": torch.get_num_threads(),
        },
        "meta_training": meta,
        "settings": {},
    }
    prompt_params = meta["mvp"]["trainable"]
    dim = frozen.backbone.embed_dim
    for k in [int(s) for s in args.shots.split(",")]:
        sampler = EpisodeSampler(files, 5, k, 15, seed=0)
        eps = episode_index(sampler, args.episodes, index)
        rows: dict[str, list[float]] = {"frozen": [], "linear": [], "mvp_noft": [], "mvp_noper_noft": []}
        for ep in eps:
            rows["frozen"].append(protonet_acc(emb["frozen"], ep))
            rows["mvp_noft"].append(protonet_acc(emb["mvp"], ep))
            rows["mvp_noper_noft"].append(protonet_acc(emb["mvp_noper"], ep))
        t0 = time.perf_counter()
        for ep in eps:
            rows["linear"].append(linear_probe_acc(emb["frozen"], ep))
        linear_s = (time.perf_counter() - t0) / len(eps)
        ft = {"prompt_no_meta": [], "mvp_noper": [], "mvp": []}
        ft_time = {key: 0.0 for key in ft}
        start = time.perf_counter()
        for i, (s, sl, q, ql, n) in enumerate(eps[: args.ft_max_episodes]):
            if time.perf_counter() - start > 60 * args.ft_minutes:
                break
            for key in ft:
                t1 = time.perf_counter()
                logits, _ = classify_episode(
                    models[key], grids[s], torch.from_numpy(sl), grids[q], n, t.finetune_steps, t.finetune_lr,
                    seed=i, grids=True, pseudo_per_class=t.finetune_pseudo_per_class,
                )  # fmt: skip
                ft_time[key] += time.perf_counter() - t1
                ft[key].append(float((logits.argmax(1).numpy() == ql).mean()))
            if (i + 1) % 10 == 0:
                print(
                    f"  {k}-shot ft episode {i + 1}: " + ", ".join(f"{a} {fmt(v)}" for a, v in ft.items()), flush=True
                )
        n_ft = len(ft["mvp"])
        table = [
            ("frozen ProtoNet (no tuning)", rows["frozen"], 0, 0.0),
            ("linear probe fine-tuned per episode", rows["linear"], 5 * dim + 5, linear_s),
            ("prompts, no meta-training (+ per-episode FT)", ft["prompt_no_meta"], prompt_params, None),
            ("MVP without PER (meta-trained + FT)", ft["mvp_noper"], prompt_params, None),
            ("MVP (meta-trained with PER + FT with PER)", ft["mvp"], prompt_params, None),
            ("MVP meta-trained prompts, no FT", rows["mvp_noft"], prompt_params, 0.0),
            ("MVP without PER, no FT", rows["mvp_noper_noft"], prompt_params, 0.0),
        ]
        keys = [None, None, "prompt_no_meta", "mvp_noper", "mvp", None, None]
        out_rows = []
        for (label, accs, params, sec), key in zip(table, keys):
            if key is not None:
                sec = ft_time[key] / max(1, n_ft)
            m, ci = mean_ci95(accs) if accs else (math.nan, math.nan)
            out_rows.append(
                {"row": label, "episodes": len(accs), "acc": m, "ci95": ci, "trainable": params, "ft_seconds": sec}
            )
        paired = {
            "episodes": n_ft,
            "frozen_same_episodes": mean_ci95(rows["frozen"][:n_ft]) if n_ft > 1 else None,
            "linear_same_episodes": mean_ci95(rows["linear"][:n_ft]) if n_ft > 1 else None,
            "mvp_noft_same_episodes": mean_ci95(rows["mvp_noft"][:n_ft]) if n_ft > 1 else None,
        }
        result["settings"][f"5-way {k}-shot"] = {"rows": out_rows, "finetune_subset": paired}
        print(f"\n### 5-way {k}-shot (novel classes, 15 queries/class)\n")
        print("| method | episodes | acc % ± 95 % CI | trainable params | FT s/episode |")
        print("|---|---|---|---|---|")
        for r in out_rows:
            sec = "-" if not r["ft_seconds"] else f"{r['ft_seconds']:.2f}"
            print(
                f"| {r['row']} | {r['episodes']} | {100 * r['acc']:.2f} ± {100 * r['ci95']:.2f} | {r['trainable']:,} | {sec} |"
            )
        if n_ft > 1:
            print(
                f"\nsame first {n_ft} episodes: frozen ProtoNet {fmt(rows['frozen'][:n_ft])}, "
                f"linear {fmt(rows['linear'][:n_ft])}, MVP no FT {fmt(rows['mvp_noft'][:n_ft])}",
                flush=True,
            )

    # validation classes (model selection evidence: did meta-training help on classes it never saw?)
    vfiles = scan_class_split(resolve_data_path(t.data_root), t.classes)["val"]
    vpaths = [p for c in sorted(vfiles) for p in vfiles[c]]
    vindex = {p: i for i, p in enumerate(vpaths)}
    with torch.no_grad():
        vgrids = torch.cat(
            [frozen.grid(torch.stack([cache(p) for p in vpaths[i : i + 64]])) for i in range(0, len(vpaths), 64)]
        )
    vemb = {
        k: embed_all(m, vgrids) for k, m in (("frozen", frozen), ("mvp", models["mvp"]), ("noper", models["mvp_noper"]))
    }
    val = {}
    for k in (1, 5):
        veps = episode_index(EpisodeSampler(vfiles, 5, k, 15, seed=1), args.episodes, vindex)
        val[f"5-way {k}-shot"] = {name: fmt([protonet_acc(e, ep) for ep in veps]) for name, e in vemb.items()}
    result["val_classes_no_finetune"] = val
    print(f"\nvalidation classes, no fine-tuning, {args.episodes} episodes: {val}")

    # various-way (N from 3 to 7, 1-shot): cached-embedding rows only
    sampler = EpisodeSampler(files, (3, 7), 1, 15, seed=0)
    eps = episode_index(sampler, args.episodes, index)
    vw = {
        "frozen ProtoNet": fmt([protonet_acc(emb["frozen"], ep) for ep in eps]),
        "MVP without PER, no FT": fmt([protonet_acc(emb["mvp_noper"], ep) for ep in eps]),
        "MVP, no FT": fmt([protonet_acc(emb["mvp"], ep) for ep in eps]),
        "episodes": len(eps),
    }
    result["various_way_1shot_N3to7"] = vw
    print(f"\nvarious-way 1-shot (N uniform in 3..7), {len(eps)} episodes: {vw}")
    print("\nmeta-training:", json.dumps(meta, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
