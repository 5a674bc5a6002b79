"""GPU smoke test: every landed task trains a few steps on CUDA, exports, and runs on onnxruntime's CUDA
provider; one table comes out. Run through ``bench/gpu_smoke.sh`` (at most ~5 minutes on one GPU).

Rows: every landed task (classification with five adapters and two autocast modes, few-shot, point clouds,
referring segmentation, diffusion) trains a few steps on CUDA, then exports and checks parity.
Columns: steps, first/last loss, median step time, peak CUDA memory, val top-1, export parity (torch vs
onnxruntime, max |Δ|), onnxruntime providers really in use, and whether strict CUDA mode held.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

CLS = {
    "task": {"classes": ["Airport", "Beach", "Forest", "Port", "River"], "split": {"train": 20, "val": 10, "test": 10}}
}
RANDOM_TEXT = {"name": "minilm", "pretrained": False}  # MiniLM's config/tokenizer travel; its 90 MB weights do not
ROWS = [  # (row, recipe, overrides): each landed task, a few CUDA steps under autocast, then export + parity
    (
        "classification effnet_lite0+lora bf16",
        "classification-aid",
        {**CLS, "adapter": {"name": "lora", "r": 8, "targets": ["conv_pw"]}, "train": {"amp": "bf16"}},
    ),
    (
        "classification effnet_lite0+pvera bf16",
        "classification-aid",
        {**CLS, "adapter": {"name": "pvera", "r": 64, "targets": ["conv_pw"]}, "train": {"amp": "bf16", "lr": 1e-2}},
    ),
    (
        "classification effnet_lite0+dora bf16",
        "classification-aid",
        {**CLS, "adapter": {"name": "dora", "r": 8, "targets": ["conv_pw"]}, "train": {"amp": "bf16"}},
    ),
    (
        "classification effnet_lite0+full fp16",
        "classification-aid",
        {**CLS, "adapter": {"name": "full"}, "train": {"amp": "fp16", "lr": 3e-4}},
    ),
    (
        "classification test_vit+vpt bf16",
        "classification-aid",
        {
            **CLS,
            "adapter": {"name": "vpt", "num_tokens": 8},
            "train": {"amp": "bf16"},
            "backbone": {"name": "timm:test_vit", "pretrained": False, "image_size": 64},
        },
    ),
    (
        "fewshot effnet_lite0+prompt_map bf16",
        "fewshot-aid-1shot",
        {
            "task": {
                "classes": {
                    "base": ["Forest", "Port", "River"],
                    "val": ["Desert", "Bridge"],
                    "novel": ["Airport", "Beach"],
                },
                "n_way": 2,
                "q_query": 5,
                "train_q_query": 3,
                "train_episodes": 20,
                "val_episodes": 4,
                "finetune_steps": 2,
            },
            "train": {"amp": "bf16", "batch_size": 1},
        },
    ),
    (
        "pointcloud pointnet+PPT bf16",
        "pointcloud-modelnet10",
        {"task": {"shots": 4, "text_backbone": RANDOM_TEXT}, "train": {"amp": "bf16", "batch_size": 8}},
    ),
    (
        "refseg effnet_lite0+minilm DETRIS bf16",
        "refseg-coco128",
        {
            "task": {"split": {"train": -1, "test": 10}, "text_backbone": RANDOM_TEXT},
            "train": {"amp": "bf16", "batch_size": 8},
        },
    ),
    (
        "diffusion DiT+KIND-pretrain bf16",
        "diffusion-aid-kind-pretrain",
        {
            "task": {"classes": ["Forest", "Port", "River"], "train_per_class": 20, "eval_per_class": 5},
            "backbone": {"name": "dit:d4-w192-h4-c3", "pretrained": False},
            "train": {"amp": "bf16", "batch_size": 32},
        },
    ),
]


def runtime_call(b) -> str:
    """One call of the bundle task's torch-free runtime method on synthetic input (covers the provider in use)."""
    import numpy as np

    rng = np.random.default_rng(0)
    img = [rng.integers(0, 255, (96, 128, 3), dtype=np.uint8) for _ in range(2)]
    if b.task == "classification":
        return b.classify(img[:1])[0]["label"]
    if b.task == "fewshot":
        return b.fewshot({"a": img[:1], "b": img[1:]}, img[:1])[0]["label"]
    if b.task == "pointcloud":
        return b.classify_points([rng.normal(size=(2048, 3)).astype(np.float32)])[0]["label"]
    if b.task == "refseg":
        return f"area={b.segment(img[0], 'the dog on the left')['area_fraction']:.3f}"
    if b.task == "diffusion":
        return f"image{list(b.generate([0], steps=2).shape)}"
    return "-"


PACK_BUDGET_S = 200  # the pack row (a CPU export of ~20 s, then CUDA sessions) runs only when this much is left


def pack_row(root: Path, device: str) -> dict:
    """An adapter pack of the first LoRA run (twice, as adapters ``a`` and ``b``): exported, loaded on the CUDA
    provider, both adapters run through ``RunOptions.add_active_adapter`` (issue 15)."""
    from vision_peft.deploy import load_bundle
    from vision_peft.pack import export_pack

    row: dict = {"row": "pack (2 adapters) of the lora run"}
    try:
        run_dir = next(p for p in sorted(root.iterdir()) if (p / "config.json").is_file() and "lora" in p.name)
        man = export_pack([run_dir, run_dir], root / "pack", names=["a", "b"])
        row["parity_max_abs"] = f"{man['parity']['max_abs_diff']:.2e}"
        b = load_bundle(root / "pack", device="auto")
        row["deploy_providers"] = b.providers[0]
        t1 = time.perf_counter()
        labels = [runtime_call(b.select(n)) for n in b.adapters]
        row["runtime"] = f"{'/'.join(labels)} {1000 * (time.perf_counter() - t1):.0f}ms"
        if device == "cuda":
            load_bundle(root / "pack", device="cuda", strict=True)
            row["strict_cuda"] = "ok"
    except Exception as e:
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
    return row


def main() -> int:
    from vision_peft.deploy import load_bundle
    from vision_peft.export import export_run
    from vision_peft.recipe import load_recipe
    from vision_peft.train import run

    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"  # "cpu" = a quick dry run of this script
    steps = 10 if device == "cuda" else 2
    if device == "cuda":
        assert torch.cuda.is_available(), "no CUDA device"
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, available providers: {ort.get_available_providers()}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    started = time.perf_counter()
    table = []
    from vision_peft.recipe import find_recipe

    only = sys.argv[2].split(",") if len(sys.argv) > 2 else None  # e.g. "fewshot,pvera": rows whose name contains one
    for name, recipe, over in ROWS:
        if only and not any(o in name for o in only):
            continue
        row = {"row": name}
        try:
            find_recipe(recipe)
        except Exception:
            row["error"] = f"recipe {recipe} not landed"
            table.append(row)
            continue
        try:
            over = {k: dict(v) for k, v in over.items()}
            amp = over["train"].pop("amp") if device == "cuda" else "none"
            over["train"] = {
                "max_steps": steps,
                "batch_size": 32,
                "device": device,
                "num_workers": 4,
                "log_every": 1,
                "eval_every": 100000,
                **over["train"],
                "amp": amp,
            }
            over["output"] = {"runs_root": str(root), "name": name.split()[0] + "-" + name.split()[1].replace("+", "-")}
            cfg = load_recipe(recipe, over)
            t0 = time.perf_counter()
            run_dir = run(cfg, progress=False)
            row["train_s"] = round(time.perf_counter() - t0, 1)
            losses = [
                json.loads(ln)["loss"]
                for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(ln) and "split" not in json.loads(ln)
            ]
            final = json.loads((run_dir / "final_metrics.json").read_text())
            metric = next(
                (
                    (f"{sp}.{k}", v)
                    for sp in ("val", "test")
                    for k, v in (final.get(sp) or {}).items()
                    if isinstance(v, float)
                ),
                ("-", float("nan")),
            )
            row.update(
                {
                    "steps": len(losses),
                    "loss_first": round(losses[0], 3),
                    "loss_last": round(losses[-1], 3),
                    "step_ms": round(1000 * final["timing"]["step_time_median"], 1),
                    "peak_MiB": round(final["timing"]["peak_memory_mb"]),
                    "metric": f"{metric[0]}={metric[1]:.3f}",
                }
            )
            try:
                man = export_run(run_dir, device=device)
            except Exception:
                man = export_run(run_dir, device="cpu")
                row["export_note"] = "parity on CPU provider"
            row["parity_max_abs"] = f"{man['parity']['max_abs_diff']:.2e}"
            par = man["parity"]
            row["parity_providers"] = (par.get("providers") or next(iter(par["graphs"].values()))["providers"])[0]
            b = load_bundle(run_dir / "export", device="auto")
            row["deploy_providers"] = b.providers[0]
            t1 = time.perf_counter()
            row["runtime"] = f"{runtime_call(b)} {1000 * (time.perf_counter() - t1):.0f}ms"
            try:
                load_bundle(run_dir / "export", device="cuda", strict=True)
                row["strict_cuda"] = "ok"
            except Exception as e:  # report, do not hide, a CPU fallback
                row["strict_cuda"] = f"refused: {str(e)[:60]}"
        except Exception as e:
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        table.append(row)
        print(json.dumps(row), flush=True)
    if time.perf_counter() - started < PACK_BUDGET_S:
        table.append(pack_row(root, device))
        print(json.dumps(table[-1]), flush=True)
    else:
        table.append({"row": "pack (2 adapters) of the lora run", "error": "skipped: time budget"})
    cols = [
        "row",
        "steps",
        "loss_first",
        "loss_last",
        "step_ms",
        "peak_MiB",
        "metric",
        "parity_max_abs",
        "parity_providers",
        "deploy_providers",
        "runtime",
        "strict_cuda",
        "error",
    ]
    print("\n| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in table:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return 0 if all("error" not in r for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
