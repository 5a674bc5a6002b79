"""GPU smoke test: every landed task trains a few steps on CUDA, exports, and runs on onnxruntime's CUDA
provider; one table comes out. Run through ``bench/gpu_smoke.sh`` (at most ~5 minutes on one GPU).

Rows: classification with EfficientNet-Lite0 (real ImageNet weights) + LoRA under bf16 autocast, the same
with full fine-tuning under fp16 autocast + grad scaler, and timm's test ViT + deep VPT under bf16.
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

ROWS = [
    ("effnet_lite0+lora bf16", {"adapter": {"name": "lora", "r": 8, "targets": ["conv_pw"]}, "train": {"amp": "bf16"}}),
    ("effnet_lite0+full fp16", {"adapter": {"name": "full"}, "train": {"amp": "fp16", "lr": 3e-4}}),
    (
        "test_vit+vpt-deep bf16",
        {
            "adapter": {"name": "vpt", "num_tokens": 8},
            "train": {"amp": "bf16"},
            "backbone": {"name": "timm:test_vit", "pretrained": False, "image_size": 64},
        },
    ),
]


def main() -> int:
    from vision_peft.config import load_recipe
    from vision_peft.deploy import load_bundle
    from vision_peft.export import export_run
    from vision_peft.train import run

    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"  # "cpu" = a quick dry run of this script
    steps = 20 if device == "cuda" else 2
    if device == "cuda":
        assert torch.cuda.is_available(), "no CUDA device"
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, available providers: {ort.get_available_providers()}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    table = []
    for name, over in ROWS:
        row = {"row": name}
        try:
            over = {**over}
            over.setdefault("backbone", {})
            over["task"] = {
                "classes": ["Airport", "Beach", "Forest", "Port", "River"],
                "split": {"train": 40, "val": 20, "test": 20},
            }
            amp = over["train"]["amp"] if device == "cuda" else "none"
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
            over["output"] = {"runs_root": str(root), "name": name.split()[0].replace("+", "-")}
            cfg = load_recipe("classification-aid", over)
            t0 = time.perf_counter()
            run_dir = run(cfg, progress=False)
            row["train_s"] = round(time.perf_counter() - t0, 1)
            losses = [
                json.loads(ln)["loss"]
                for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(ln) and "split" not in json.loads(ln)
            ]
            final = json.loads((run_dir / "final_metrics.json").read_text())
            row.update(
                {
                    "steps": len(losses),
                    "loss_first": round(losses[0], 3),
                    "loss_last": round(losses[-1], 3),
                    "step_ms": round(1000 * final["timing"]["step_time_median"], 1),
                    "peak_MiB": round(final["timing"]["peak_memory_mb"]),
                    "val_top1": round(final["val"]["top1"], 3),
                }
            )
            try:
                man = export_run(run_dir, device=device)
            except Exception:
                man = export_run(run_dir, device="cpu")
                row["export_note"] = "parity on CPU provider"
            row["parity_max_abs"] = f"{man['parity']['max_abs_diff']:.2e}"
            row["parity_providers"] = man["parity"]["providers"][0]
            b = load_bundle(run_dir / "export", device="auto")
            row["deploy_providers"] = b.providers[0]
            try:
                load_bundle(run_dir / "export", device="cuda", strict=True)
                row["strict_cuda"] = "ok"
            except Exception as e:  # report, do not hide, a CPU fallback
                row["strict_cuda"] = f"refused: {str(e)[:60]}"
        except Exception as e:
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
        table.append(row)
        print(json.dumps(row), flush=True)
    cols = [
        "row",
        "steps",
        "loss_first",
        "loss_last",
        "step_ms",
        "peak_MiB",
        "val_top1",
        "parity_max_abs",
        "parity_providers",
        "deploy_providers",
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
