"""peft round-trip (issue 15 acceptance): max |Δ| of outputs, ours vs ``peft.PeftModel`` on the same inputs, both ways.

Cases (each on real AID test images of the run's split, plus 4 random inputs):

1. timm ViT, ours → peft: a short LoRA run (r=8, alpha=16, qkv + mlp) on 3 AID classes, its lora_B replaced by
   seeded random values (std ``--b-std``; a 2-step B is tiny, and B = 0 would make any mapping match), exported
   with ``export_peft``; ``PeftModel.from_pretrained(timm model with the run's weights and num_classes=3, dir)``
   logits vs the run's logits (``load_run``). ``adapter_effect`` = max |Δ| of the run's logits with vs without
   the adapter (the scale a mapping error would show at).
2. timm ViT, peft → ours: a LoRA (r=8, alpha=16, use_rslora, qkv + fc1, modules_to_save=[head]) created by peft on
   the same timm model, random B and head, ``save_pretrained``, ``import_peft``; the imported run's logits vs
   PeftModel's.
3. open_clip ViT fused MHA, both directions alike (qkv = the fused in_proj_weight, + mlp): image features
   (``encode_image``) and logits through the head file. Plus the layout peft cannot represent: an ``out_proj``
   update inside ``nn.MultiheadAttention`` — measured how peft applies it (vs W + BA and W + 2BA).
4. timm ViT AdaLoRA, ours → peft (issue 16): a short AdaLoRA run (init_r 12 → target_r 4 on qkv + mlp, tinit 1,
   tfinal 2, so the budget masks two thirds of the triplets), its live λ replaced by seeded random values
   (``--lambda-std``; a few-step λ is at most ~steps × lr under AdamW), exported as a peft ADALORA folder
   (masks = rank_pattern); ``PeftModel.from_pretrained`` logits vs the run's, and the triplet count in the file vs
   the run's masks. Then the reverse: a peft AdaLoraModel (same targets and schedule) trained by peft for the same
   steps on the run's AID train images (cross-entropy, ``update_and_allocate`` after each step, so its own
   RankAllocator masks triplets), ``save_pretrained``, ``import_peft``; the imported run's logits vs PeftModel's.

Weights: ``vit_small_patch16_224`` and open_clip ``ViT-B-32`` weights are not available offline here
(``$VISION_PEFT_WEIGHTS`` holds none, the HF cache is empty), so both run with random-init weights (seed 0) at 224²
— the mapping does not depend on the weight values; the script says so in its output. With weights present, pass
``--pretrained``.

Run: ``nice -n 10 python bench/peft_roundtrip.py`` (CPU, ~2 min); writes ``bench/results/peft_roundtrip.json``.
AdaLoRA alone: ``nice -n 10 python bench/peft_roundtrip.py --cases adalora --out
bench/results/peft_roundtrip_adalora.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timm", default="vit_small_patch16_224", help="timm model")
    p.add_argument("--clip", default="ViT-B-32", help="open_clip architecture")
    p.add_argument("--clip-tag", default="openai", help="open_clip pretrained tag (with --pretrained)")
    p.add_argument("--pretrained", action="store_true", help="use real weights (must be available offline)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--b-std", type=float, default=0.02, help="std of the random lora_B written into the run")
    p.add_argument("--steps", type=int, default=2, help="training steps of the source runs")
    p.add_argument("--out", default=str(REPO / "bench/results/peft_roundtrip.json"))
    p.add_argument("--cases", default="timm,clip", help="comma-separated: timm, clip, adalora")
    p.add_argument("--adalora-steps", type=int, default=6, help="training steps of the AdaLoRA run (one epoch: 6)")
    p.add_argument("--lambda-std", type=float, default=0.5, help="std of the random live λ written into the run")
    return p.parse_args(argv)


def _aid_inputs(run_dir: Path, model, cfg) -> tuple[torch.Tensor, int]:
    """The run's AID test images, preprocessed as predict does, plus 4 random images: (batch, n_real)."""
    from vision_peft.preprocess import image_spec, preprocess_batch

    split = json.loads((run_dir / "split.json").read_text())
    files = list(split["test"])
    spec = image_spec(model.backbone.data_config, resize=cfg.task.resize)
    real = torch.from_numpy(preprocess_batch(files, spec))
    h, w = model.backbone.input_size
    rnd = torch.randn(4, 3, h, w, generator=torch.Generator().manual_seed(0))
    return torch.cat([real, rnd]), len(files)


def _train(root: Path, name: str, backbone: dict, adapter: dict, steps: int) -> Path:
    from vision_peft.recipe import load_recipe
    from vision_peft.train import run

    over = {"backbone": backbone, "adapter": adapter,
            "train": {"max_steps": steps, "batch_size": 4, "device": "cpu", "log_every": 1, "epochs": 1},
            "output": {"runs_root": str(root), "name": name}}  # fmt: skip
    with torch.enable_grad():  # the cases run under no_grad; training needs gradients
        return Path(run(load_recipe("classification-tiny", over), progress=False))


def _randomise_b(run_dir: Path, std: float, seed: int = 1) -> None:
    from vision_peft import checkpoint as ckpt

    sd = ckpt.load_tensors(run_dir / "adapter.safetensors")
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g) * std if k.endswith("lora_B") else v for k, v in sd.items()}
    ckpt.save_tensors(run_dir / "adapter.safetensors", sd)


def _stats(ours: torch.Tensor, theirs: torch.Tensor, frozen: torch.Tensor, n_real: int) -> dict:
    d = (ours - theirs).abs()
    return {
        "max_abs_diff": float(d.max()),
        "max_abs_diff_aid_images": float(d[:n_real].max()),
        "max_abs_diff_random_inputs": float(d[n_real:].max()),
        "max_abs_output": float(ours.abs().max()),
        "adapter_effect": float((ours - frozen).abs().max()),
        "top1_agreement": float((ours.argmax(1) == theirs.argmax(1)).float().mean()),
        "n_inputs": int(ours.shape[0]),
        "n_aid_images": n_real,
    }


@torch.no_grad()
def timm_case(args, root: Path, backbone: dict) -> dict:
    import peft

    from vision_peft.backbones import build_backbone
    from vision_peft.config import BackboneConfig
    from vision_peft.peft_import import import_peft
    from vision_peft.peft_interop import export_peft, library_model
    from vision_peft.predict import load_run

    out: dict = {}
    # ours -> peft
    run_dir = _train(root, "timm-lora", backbone, {"name": "lora", "r": args.rank, "alpha": 16.0,
                                                  "targets": ["qkv", "mlp"]}, args.steps)  # fmt: skip
    _randomise_b(run_dir, args.b_std)
    t0 = time.perf_counter()
    summary = export_peft(run_dir, root / "timm-peft")
    t_export = time.perf_counter() - t0
    cfg, task, model, _ = load_run(run_dir)
    x, n_real = _aid_inputs(run_dir, model, cfg)
    plain = build_backbone(BackboneConfig(**backbone)).eval()
    base = library_model(plain, cfg, len(task.classes))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(root / "timm-peft")).eval()
    ours = model.logits(x)
    out["ours_to_peft"] = {
        **_stats(ours, pm(x), model.head(plain.forward_features(x)), n_real),
        "compared": "logits: run (load_run) vs PeftModel.from_pretrained(timm model, dir)(x)",
        "targets": summary["target_modules"], "rank": args.rank, "export_seconds": round(t_export, 2),
        "files_bytes": summary["files"],
    }  # fmt: skip
    # peft -> ours
    theirs_model = copy.deepcopy(base)
    pcfg = peft.LoraConfig(r=args.rank, lora_alpha=16, use_rslora=True, target_modules=["qkv", "fc1"],
                           modules_to_save=["head"])  # fmt: skip
    pm2 = peft.get_peft_model(theirs_model, pcfg)
    g = torch.Generator().manual_seed(2)
    for n, p in pm2.named_parameters():
        if "lora_B" in n:
            p.copy_(torch.randn(p.shape, generator=g) * args.b_std)
        elif "modules_to_save" in n:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm2.save_pretrained(str(root / "timm-hf"))
    sets = [f"backbone.{k}={json.dumps(v) if v is not None else 'null'}" for k, v in backbone.items() if k != "name"]
    t0 = time.perf_counter()
    imp = import_peft(root / "timm-hf", backbone["name"], "classification-tiny", root / "timm-imported", overrides=sets)
    t_import = time.perf_counter() - t0
    _, _, model2, _ = load_run(root / "timm-imported")
    pm2.eval()
    theirs = pm2(x)
    frozen = model2.head(plain.forward_features(x))
    out["peft_to_ours"] = {
        **_stats(model2.logits(x), theirs, frozen, n_real),
        "compared": "logits: PeftModel (created by peft, use_rslora) vs the imported run (load_run)",
        "targets": imp["targets"], "rank": imp["rank"], "our_alpha": imp["alpha"], "classes_from": imp["classes_from"],
        "import_seconds": round(t_import, 2),
    }  # fmt: skip
    return out


@torch.no_grad()
def clip_case(args, root: Path, backbone: dict) -> dict:
    import peft
    from safetensors.torch import load_file

    from vision_peft.backbones import build_backbone
    from vision_peft.config import BackboneConfig
    from vision_peft.peft_import import import_peft
    from vision_peft.peft_interop import HEAD_NAME, PeftInteropError, export_peft, library_model
    from vision_peft.predict import load_run

    out: dict = {}
    run_dir = _train(root, "clip-lora", backbone, {"name": "lora", "r": args.rank, "alpha": 16.0,
                                                  "targets": ["qkv", "mlp"]}, args.steps)  # fmt: skip
    _randomise_b(run_dir, args.b_std)
    summary = export_peft(run_dir, root / "clip-peft")
    cfg, task, model, _ = load_run(run_dir)
    x, n_real = _aid_inputs(run_dir, model, cfg)
    plain = build_backbone(BackboneConfig(**backbone)).eval()
    base = library_model(plain, cfg, len(task.classes))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(root / "clip-peft")).eval()
    head = load_file(str(root / "clip-peft" / HEAD_NAME))
    feats, theirs = model.backbone.forward_features(x), pm.encode_image(x)
    frozen = plain.forward_features(x)
    out["ours_to_peft"] = {
        "image_features": _stats(feats, theirs, frozen, n_real),
        "logits": _stats(model.head(feats), theirs @ head["weight"].T + head["bias"], model.head(frozen), n_real),
        "compared": "encode_image of PeftModel.from_pretrained(open_clip CLIP model, dir) vs the run's features; "
        "logits through vision_peft_head.safetensors",
        "targets": summary["target_modules"],
        "files_bytes": summary["files"],
    }
    # peft -> ours: peft's LoRA on the image tower's fused MHA (out_proj B = 0) + MLP
    pm2 = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=args.rank, lora_alpha=16, target_modules=r"visual\..*\.(attn|c_fc|c_proj)"))  # fmt: skip
    g = torch.Generator().manual_seed(3)
    for n, p in pm2.named_parameters():
        if "lora_B" in n and "out_proj" not in n:
            p.copy_(torch.randn(p.shape, generator=g) * args.b_std)
    pm2.save_pretrained(str(root / "clip-hf"))
    shutil.copy(root / "clip-peft" / HEAD_NAME, root / "clip-hf" / HEAD_NAME)
    sets = [f"backbone.{k}={json.dumps(v) if v is not None else 'null'}" for k, v in backbone.items() if k != "name"]
    imp = import_peft(root / "clip-hf", backbone["name"], "classification-tiny", root / "clip-imported",
                      classes=list(task.classes), overrides=sets)  # fmt: skip
    _, _, model2, _ = load_run(root / "clip-imported")
    pm2.eval()
    out["peft_to_ours"] = {
        "image_features": _stats(model2.backbone.forward_features(x), pm2.encode_image(x), frozen, n_real),
        "compared": "encode_image: PeftModel (created by peft on the fused MHA + MLP) vs the imported run",
        "targets": imp["targets"],
    }
    # the layout peft cannot represent: an out_proj update inside nn.MultiheadAttention
    name = "visual.transformer.resblocks.0.attn"
    pm3 = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=args.rank, lora_alpha=args.rank,
                                                                    target_modules=[name])).eval()  # fmt: skip
    ob = pm3.base_model.model.get_submodule(name).base_layer.out_proj
    ob.lora_B["default"].weight.copy_(torch.randn(ob.lora_B["default"].weight.shape, generator=g) * args.b_std)
    delta = ob.lora_B["default"].weight @ ob.lora_A["default"].weight
    got = pm3.encode_image(x)
    res = {}
    for k in (1, 2):
        ref = copy.deepcopy(base)
        ref.get_submodule(name).out_proj.weight += k * delta
        res[f"max_abs_diff_vs_W_plus_{k}BA"] = float((got - ref.encode_image(x)).abs().max())
    try:
        bad_run = _train(root, "clip-attn-out", backbone, {"name": "lora", "r": args.rank,
                                                          "targets": ["qkv", "attn_out"]}, 1)  # fmt: skip
        _randomise_b(bad_run, args.b_std)
        export_peft(bad_run, root / "never")
        refused = "NOT refused"
    except PeftInteropError as e:
        refused = str(e)
    out["mha_out_proj_not_representable"] = {**res, "export_refusal": refused}
    return out


@torch.no_grad()
def adalora_case(args, root: Path, backbone: dict) -> dict:
    import peft
    from safetensors import safe_open

    from vision_peft import checkpoint as ckpt
    from vision_peft.backbones import build_backbone
    from vision_peft.config import BackboneConfig
    from vision_peft.peft_interop import export_peft, library_model
    from vision_peft.predict import load_run

    adapter = {"name": "adalora", "init_r": 12, "target_r": 4, "alpha": 16.0, "targets": ["qkv", "mlp"],
               "tinit": 1, "tfinal": 2, "deltaT": 1}  # fmt: skip
    run_dir = _train(root, "timm-adalora", backbone, adapter, args.adalora_steps)
    sd = ckpt.load_tensors(run_dir / "adapter.safetensors")
    g = torch.Generator().manual_seed(4)
    masks = {k[: -len(".mask")]: v > 0 for k, v in sd.items() if k.endswith("adalora.mask")}
    masked = [sd[k + ".lora_E"][~m].abs() for k, m in masks.items()]
    trained_masked_abs = float(torch.cat(masked).max()) if sum(len(v) for v in masked) else 0.0
    trained_live_abs = float(torch.cat([sd[k + ".lora_E"][m].abs() for k, m in masks.items()]).max())
    for k, m in masks.items():
        e = sd[k + ".lora_E"]
        sd[k + ".lora_E"] = torch.where(m, torch.randn(e.shape, generator=g) * args.lambda_std, e)
    ckpt.save_tensors(run_dir / "adapter.safetensors", sd)
    t0 = time.perf_counter()
    summary = export_peft(run_dir, root / "timm-adalora-peft")
    t_export = time.perf_counter() - t0
    conf = json.loads((root / "timm-adalora-peft" / "adapter_config.json").read_text())
    with safe_open(str(root / "timm-adalora-peft" / "adapter_model.safetensors"), framework="pt") as f:
        in_file = sum(f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("lora_E"))  # noqa: SIM118
    cfg, task, model, _ = load_run(run_dir)
    x, n_real = _aid_inputs(run_dir, model, cfg)
    plain = build_backbone(BackboneConfig(**backbone)).eval()
    base = library_model(plain, cfg, len(task.classes))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(root / "timm-adalora-peft")).eval()
    ours = model.logits(x)
    live = sum(int(m.sum()) for m in masks.values())
    back = _peft_trained_adalora(args, root, run_dir, cfg, base, backbone, adapter, x, n_real, plain)
    return {
        "peft_to_ours": back,
        **_stats(ours, pm(x), model.head(plain.forward_features(x)), n_real),
        "compared": "logits: run (load_run) vs PeftModel.from_pretrained(timm model, ADALORA dir)(x)",
        "adapter": adapter, "train_steps": args.adalora_steps,
        "lambda": f"live λ seeded random, std {args.lambda_std}",
        "peft_type": conf["peft_type"], "target_modules": summary["target_modules"],
        "triplets_initial": 12 * len(masks), "triplets_live_in_run": live, "triplets_in_file": int(in_file),
        "rank_per_module_range": [min(summary["rank_per_module"].values()), max(summary["rank_per_module"].values())],
        "max_abs_masked_lambda_as_trained": trained_masked_abs,
        "max_abs_live_lambda_as_trained": trained_live_abs, "masked_but_nonzero": summary["masked_but_nonzero"],
        "export_seconds": round(t_export, 2), "files_bytes": summary["files"],
    }  # fmt: skip


def _peft_trained_adalora(args, root, run_dir, cfg, base, backbone, adapter, x, n_real, plain) -> dict:
    """peft → ours: an AdaLoraModel trained by peft (its RankAllocator's masks), imported, compared with PeftModel."""
    import peft

    from vision_peft.peft_import import import_peft
    from vision_peft.predict import load_run
    from vision_peft.preprocess import image_spec, preprocess_batch

    split = json.loads((run_dir / "split.json").read_text())
    files = list(split["train"])
    classes = list(load_run(run_dir)[1].classes)
    labels = torch.tensor([classes.index(Path(f).parent.name) for f in files])  # folder-per-class AID
    imgs = torch.from_numpy(preprocess_batch(files, image_spec(plain.data_config, resize=cfg.task.resize)))
    steps, names = args.adalora_steps, ["qkv", "fc1", "fc2"]
    pcfg = peft.AdaLoraConfig(init_r=adapter["init_r"], target_r=adapter["target_r"], lora_alpha=adapter["alpha"],
                              target_modules=names, total_step=steps, tinit=adapter["tinit"], tfinal=adapter["tfinal"],
                              deltaT=adapter["deltaT"], modules_to_save=["head"])  # fmt: skip
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(5)
    with torch.enable_grad():
        pm.train()
        for step in range(steps):
            idx = torch.randperm(len(files), generator=g)[:4]
            torch.nn.functional.cross_entropy(pm(imgs[idx]), labels[idx]).backward()
            opt.step()
            pm.base_model.update_and_allocate(step)
            opt.zero_grad()
    pm.eval()
    pm.save_pretrained(str(root / "timm-adalora-hf"))
    pattern = json.loads((root / "timm-adalora-hf" / "adapter_config.json").read_text())["rank_pattern"] or {}
    sets = [f"backbone.{k}={json.dumps(v) if v is not None else 'null'}" for k, v in backbone.items() if k != "name"]
    t0 = time.perf_counter()
    imp = import_peft(root / "timm-adalora-hf", backbone["name"], "classification-tiny", root / "timm-adalora-imp",
                      classes=classes, overrides=sets)  # fmt: skip
    t_import = time.perf_counter() - t0
    _, _, model2, _ = load_run(root / "timm-adalora-imp")
    return {
        **_stats(model2.logits(x), pm(x), model2.head(plain.forward_features(x)), n_real),
        "compared": "logits: PeftModel (AdaLoRA trained by peft, update_and_allocate) vs the imported run (load_run)",
        "peft_train": f"{steps} AdamW steps (lr 1e-2, batch 4) on the run's AID train images, seed 5",
        "triplets_live_in_peft": sum(sum(v) for v in pattern.values()),
        "triplets_initial": adapter["init_r"] * len(pattern),
        "imported_ranks": imp["ranks"], "import_seconds": round(t_import, 2),
    }  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    import peft
    import timm

    from vision_peft.backbones.base import weights_status

    timm_spec, clip_spec = f"timm:{args.timm}", f"open_clip:{args.clip}" + (f"@{args.clip_tag}" if args.pretrained
                                                                            else "")  # fmt: skip
    weights = {s: weights_status(s) for s in (timm_spec, f"open_clip:{args.clip}@{args.clip_tag}")}
    root = Path(tempfile.mkdtemp(prefix="peft-roundtrip-"))
    t0 = time.perf_counter()
    try:
        report = {
            "versions": {"peft": peft.__version__, "timm": timm.__version__, "torch": torch.__version__},
            "weights": "pretrained" if args.pretrained else (
                "random init (seed 0): no offline weights for these models here "
                f"({'; '.join(f'{k}: {v}' for k, v in weights.items())}); the mapping does not depend on weight values"),
            "data": "AID (classification-tiny recipe: classes Beach, Forest, Port); inputs = the run's test split "
            "images + 4 random images",
            "lora_B": f"seeded random, std {args.b_std} (a 2-step B is ~0; B = 0 would make any mapping match)",
            "threads": 1,
        }  # fmt: skip
        cases = set(args.cases.split(","))
        if not cases & {"timm", "clip"}:
            report.pop("lora_B")  # the LoRA cases' B; AdaLoRA says what it randomises itself
        bb_timm = {"name": timm_spec, "pretrained": args.pretrained, "image_size": None}
        if "timm" in cases:
            report["timm_vit"] = {"backbone": timm_spec, **timm_case(args, root, bb_timm)}
        bb_clip = {"name": clip_spec, "pretrained": args.pretrained, "image_size": None}
        if "clip" in cases:
            report["open_clip_fused_mha"] = {"backbone": clip_spec, **clip_case(args, root, bb_clip)}
        if "adalora" in cases:
            report["timm_vit_adalora"] = {"backbone": timm_spec, **adalora_case(args, root, bb_timm)}
        report["seconds"] = round(time.perf_counter() - t0, 1)
        report["command"] = "nice -n 10 python bench/peft_roundtrip.py " + " ".join(argv or sys.argv[1:])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    diffs = []
    if "timm_vit" in report:
        diffs += [
            report["timm_vit"]["ours_to_peft"]["max_abs_diff"],
            report["timm_vit"]["peft_to_ours"]["max_abs_diff"],
        ]
    if "open_clip_fused_mha" in report:
        diffs += [report["open_clip_fused_mha"][d]["image_features"]["max_abs_diff"]
                  for d in ("ours_to_peft", "peft_to_ours")]  # fmt: skip
    if "timm_vit_adalora" in report:
        diffs += [
            report["timm_vit_adalora"]["max_abs_diff"],
            report["timm_vit_adalora"]["peft_to_ours"]["max_abs_diff"],
        ]
    worst = max(diffs)
    print(f"worst max |Δ| over the {len(diffs)} round-trips: {worst:.3g}", file=sys.stderr)
    return 0 if worst < 1e-4 and np.isfinite(worst) else 1


if __name__ == "__main__":
    sys.exit(main())
