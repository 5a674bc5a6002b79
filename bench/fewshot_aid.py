"""Acceptance benchmark for the few-shot task (MVP) on AID's novel classes: one command, one table.

    export VISION_PEFT_DATA=/work/shared/data VISION_PEFT_WEIGHTS=/work/shared/weights
    python bench/fewshot_aid.py --threads 1           # meta-trains (or reuses) two runs, then evaluates

Two meta-trainings of the recipe (default ``fewshot-aid-1shot``: 5-way 1-shot episodes of the base classes):
with PER (``per_mode`` of the recipe) and without (``per_mode=none``). Both are used for every setting.

Settings, each on its own fixed episode list over the novel classes (EpisodeSampler seed 0, 15 queries per
class): 5-way 1-shot, 5-way 5-shot, various-way-various-shot (N uniform in 3..7: the split has 7 novel
classes; K uniform in 1..5 per episode). Rows, on the same episodes:

- frozen ProtoNet (zero prompts = the frozen backbone, cosine prototypes, no tuning);
- the two meta-trained prompt sets without per-episode fine-tuning;
- per-episode fine-tuned (``finetune_steps`` / ``finetune_lr`` / ``finetune_pseudo_per_class`` of the recipe):
  MVP without PER (meta-trained without PER, fine-tuned without PER) · MVP with PER at meta-training only
  (fine-tuned with ``finetune_per: false``) · MVP with PER at both (``finetune_per: true``).

Mean accuracy ± 95 % CI (1.96·std/√n over episodes), and paired differences on the same episodes (PER
meta-train only − no PER, PER both − PER meta-train only; also for the rows without fine-tuning) with their
95 % CI. CPU budget: the frozen layers up to the grid run once per image (their output is cached); rows
without prompt fine-tuning use cached embeddings and always get all episodes; the fine-tuned rows run episode by
episode, all three on episode i before any goes to i+1, up to ``--ft-episodes`` or until ``--ft-minutes`` is
spent per setting, so they always cover the same *first* n episodes (reported). Nothing is tuned on the novel
classes; the validation classes get the no-fine-tuning rows (model-selection evidence).

Cross-domain (meta-train on one root, test on another: ``task.meta_train_root`` / ``task.test_root``) runs
through the same code (``--override task.test_root=...``) but is not measured: no second remote-sensing
dataset is offline.
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

from vision_peft.data.episodes import EpisodeSampler, ImageCache, scan_split_roots  # noqa: E402
from vision_peft.recipe import load_recipe  # noqa: E402
from vision_peft.tasks import TASKS  # noqa: E402
from vision_peft.tasks.fewshot import classify_episode, mean_ci95, prototypes  # noqa: E402

SETTINGS = {  # name -> (way, shot)
    "5-way 1-shot": (5, 1),
    "5-way 5-shot": (5, 5),
    "various-way various-shot (N 3-7; K 1-5)": ((3, 7), (1, 5)),
}
FT_ROWS = {  # key -> (meta-trained model, finetune_per, label)
    "noper": ("mvp_noper", False, "MVP without PER (meta-trained + FT, no PER anywhere)"),
    "per_train": ("mvp", False, "MVP, PER at meta-training only (+ FT without PER)"),
    "per_both": ("mvp", True, "MVP, PER at meta-training and meta-test (+ FT with PER)"),
}


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


def fmt(accs: list[float]) -> str:
    m, ci = mean_ci95(accs)
    return f"{100 * m:.2f} ± {100 * ci:.2f}"


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of the per-episode differences a − b (same episodes) and its 95 % CI half-width."""
    n = min(len(a), len(b))
    d = np.asarray(a[:n]) - np.asarray(b[:n])
    m, ci = mean_ci95(d) if n else (math.nan, math.nan)
    return {"episodes": n, "diff": m, "ci95": ci, "wins": int((d > 0).sum()), "losses": int((d < 0).sum())}


def grids_of(frozen, cache, paths: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [frozen.grid(torch.stack([cache(p) for p in paths[i : i + 64]])) for i in range(0, len(paths), 64)]
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="fewshot-aid-1shot", help="meta-training recipe (tasks/)")
    ap.add_argument("--override", nargs="*", default=[], help="dotted recipe overrides, e.g. task.test_root=X")
    ap.add_argument("--runs-root", default=str(ROOT / "runs" / "fewshot-bench"))
    ap.add_argument("--retrain", action="store_true", help="meta-train again even if the runs exist")
    ap.add_argument("--episodes", type=int, default=600, help="test episodes per setting (rows without FT)")
    ap.add_argument("--ft-episodes", type=int, default=600, help="at most this many episodes for fine-tuned rows")
    ap.add_argument("--ft-minutes", type=float, default=12.0, help="time budget per setting for fine-tuned rows")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of: " + ", ".join(SETTINGS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fewshot_aid_v2.json"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs_root = Path(args.runs_root)
    t_start = time.perf_counter()

    # 1. meta-training (through the shared engine), with and without PER
    runs = {
        "mvp": meta_train(args.recipe, runs_root, "mvp-1shot-per", args.override, args.retrain),
        "mvp_noper": meta_train(
            args.recipe, runs_root, "mvp-1shot-noper", [*args.override, "task.per_mode=none"], args.retrain
        ),
    }
    models, meta = {}, {}
    for k, d in runs.items():
        models[k], final, info = load_model(d)
        meta[k] = {
            "run": str(d.relative_to(ROOT)) if d.is_relative_to(ROOT) else str(d),
            "per_mode": models[k].per_mode,
            "meta_train_seconds": final["timing"]["train_seconds"],
            "meta_train_steps": final["step"],
            "val_acc_no_finetune": final.get("val", {}).get("acc"),
            "val_ci95": final.get("val", {}).get("ci95"),
            "trainable": info.parameters["trainable"],
        }
    cfg = load_recipe(args.recipe, args.override)
    t = cfg.task
    task = TASKS.get("fewshot").builder(cfg)
    frozen = task.build_model().eval()  # zero prompts = the frozen backbone exactly
    for m in models.values():
        m.finetune_augment = t.finetune_augment == "dihedral"

    # 2. novel images → frozen grids (once) → embeddings per model
    split_files = scan_split_roots(t.split_roots(), t.classes, t.bad_files)
    files = split_files["novel"]
    paths = [p for c in sorted(files) for p in files[c]]
    index = {p: i for i, p in enumerate(paths)}
    cache = ImageCache(task.image_spec(frozen))
    t0 = time.perf_counter()
    grids = grids_of(frozen, cache, paths)
    grid_s = time.perf_counter() - t0
    emb = {"frozen": embed_all(frozen, grids), "mvp": embed_all(models["mvp"], grids)}
    emb["mvp_noper"] = embed_all(models["mvp_noper"], grids)
    print(f"{len(paths)} novel images: grids {tuple(grids.shape)} in {grid_s:.1f}s", flush=True)

    result = {
        "setup": {
            "recipe": args.recipe,
            "overrides": args.override,
            "backbone": cfg.backbone.name,
            "image_size": cfg.backbone.image_size,
            "adapter": f"{cfg.adapter.name} (stage {getattr(cfg.adapter, 'stage', '-')})",
            "meta_training": f"{t.train_episodes} episodes of {t.way}-way {t.shot}-shot, {t.train_q_query} queries/class",
            "finetune_steps": t.finetune_steps,
            "finetune_lr": t.finetune_lr,
            "finetune_pseudo_per_class": t.finetune_pseudo_per_class,
            "finetune_augment": t.finetune_augment,
            "per_mode": t.per_mode,
            "per_ratio": t.per_ratio,
            "episode_seed": 0,
            "queries_per_class": 15,
            "threads": torch.get_num_threads(),
            "cross_domain": "not measured: no second remote-sensing dataset is offline (tested structurally)",
        },
        "meta_training": meta,
        "settings": {},
    }
    prompt_params = meta["mvp"]["trainable"]
    for name in [s.strip() for s in args.settings.split(",") if s.strip()]:
        way, shot = SETTINGS[name]
        eps = episode_index(EpisodeSampler(files, way, shot, 15, seed=0), args.episodes, index)
        cheap: dict[str, list[float]] = {"frozen": [], "mvp_noper_noft": [], "mvp_noft": []}
        for ep in eps:
            cheap["frozen"].append(protonet_acc(emb["frozen"], ep))
            cheap["mvp_noper_noft"].append(protonet_acc(emb["mvp_noper"], ep))
            cheap["mvp_noft"].append(protonet_acc(emb["mvp"], ep))
        ft: dict[str, list[float]] = {k: [] for k in FT_ROWS}
        ft_time = {k: 0.0 for k in FT_ROWS}
        start = time.perf_counter()
        for i, (s, sl, q, ql, n) in enumerate(eps[: args.ft_episodes]):
            if time.perf_counter() - start > 60 * args.ft_minutes:
                break
            for key, (model_key, finetune_per, _) in FT_ROWS.items():
                model = models[model_key]
                model.finetune_per = finetune_per
                t1 = time.perf_counter()
                logits, _ = classify_episode(
                    model, grids[s], torch.from_numpy(sl), grids[q], n, t.finetune_steps, t.finetune_lr,
                    seed=i, grids=True, pseudo_per_class=t.finetune_pseudo_per_class,
                )  # fmt: skip
                ft_time[key] += time.perf_counter() - t1
                ft[key].append(float((logits.argmax(1).numpy() == ql).mean()))
            if (i + 1) % 10 == 0:
                el = time.perf_counter() - start
                print(
                    f"  {name} ft episode {i + 1} ({el:.0f}s): " + ", ".join(f"{a} {fmt(v)}" for a, v in ft.items()),
                    flush=True,
                )
        n_ft = len(ft["per_both"])
        table = [
            ("frozen ProtoNet (no tuning)", cheap["frozen"], 0, 0.0),
            ("MVP without PER, meta-trained prompts, no FT", cheap["mvp_noper_noft"], prompt_params, 0.0),
            ("MVP with PER at meta-training, meta-trained prompts, no FT", cheap["mvp_noft"], prompt_params, 0.0),
        ]
        for key, (_, _, label) in FT_ROWS.items():
            table.append((label, ft[key], prompt_params, ft_time[key] / max(1, n_ft)))
        out_rows = []
        for label, accs, params, sec in table:
            m, ci = mean_ci95(accs) if accs else (math.nan, math.nan)
            out_rows.append(
                {"row": label, "episodes": len(accs), "acc": m, "ci95": ci, "trainable": params, "ft_seconds": sec}
            )
        block = {
            "way": way,
            "shot": shot,
            "rows": out_rows,
            "finetuned_episodes": n_ft,
            "paired": {
                "PER meta-train only - no PER (FT)": paired(ft["per_train"], ft["noper"]),
                "PER both - PER meta-train only (FT)": paired(ft["per_both"], ft["per_train"]),
                "PER both - no PER (FT)": paired(ft["per_both"], ft["noper"]),
                "PER meta-trained - no PER (no FT)": paired(cheap["mvp_noft"], cheap["mvp_noper_noft"]),
                "FT - no FT, PER meta-trained (PER meta-train only row)": paired(ft["per_train"], cheap["mvp_noft"]),
            },
            "no_ft_rows_on_the_finetuned_episodes": {
                k: list(mean_ci95(v[:n_ft])) if n_ft > 1 else None for k, v in cheap.items()
            },
        }
        result["settings"][name] = block
        print(f"\n### {name} (novel classes, 15 queries/class)\n")
        print("| method | episodes | acc % ± 95 % CI | trainable params | FT s/episode |")
        print("|---|---|---|---|---|")
        for r in out_rows:
            sec = "-" if not r["ft_seconds"] else f"{r['ft_seconds']:.2f}"
            print(
                f"| {r['row']} | {r['episodes']} | {100 * r['acc']:.2f} ± {100 * r['ci95']:.2f} | {r['trainable']:,} | {sec} |"
            )
        for k, d in block["paired"].items():
            print(f"paired {k}: {100 * d['diff']:+.2f} ± {100 * d['ci95']:.2f} over {d['episodes']} episodes "
                  f"(better on {d['wins']}, worse on {d['losses']})", flush=True)  # fmt: skip

    # validation classes (model-selection evidence: did meta-training help on classes it never saw?)
    vfiles = split_files["val"]
    vpaths = [p for c in sorted(vfiles) for p in vfiles[c]]
    vindex = {p: i for i, p in enumerate(vpaths)}
    vgrids = grids_of(frozen, cache, vpaths)
    vemb = {
        k: embed_all(m, vgrids) for k, m in (("frozen", frozen), ("mvp", models["mvp"]), ("noper", models["mvp_noper"]))
    }
    val = {}
    for k in (1, 5):
        veps = episode_index(EpisodeSampler(vfiles, 5, k, 15, seed=1), args.episodes, vindex)
        val[f"5-way {k}-shot"] = {name: fmt([protonet_acc(e, ep) for ep in veps]) for name, e in vemb.items()}
    result["val_classes_no_finetune"] = val
    print(f"\nvalidation classes, no fine-tuning, {args.episodes} episodes: {val}")

    # the previous table's various-way 1-shot block (N from 3 to 7, 1-shot), rows without fine-tuning
    eps = episode_index(EpisodeSampler(files, (3, 7), 1, 15, seed=0), args.episodes, index)
    vw = {
        "frozen ProtoNet": fmt([protonet_acc(emb["frozen"], ep) for ep in eps]),
        "MVP without PER, no FT": fmt([protonet_acc(emb["mvp_noper"], ep) for ep in eps]),
        "MVP, no FT": fmt([protonet_acc(emb["mvp"], ep) for ep in eps]),
        "episodes": len(eps),
    }
    result["various_way_1shot_N3to7"] = vw
    print(f"\nvarious-way 1-shot (N uniform in 3..7), {len(eps)} episodes: {vw}")
    result["wall_seconds"] = time.perf_counter() - t_start
    print("\nmeta-training:", json.dumps(meta, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
