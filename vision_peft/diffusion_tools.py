"""Run-level tools of the diffusion task: the base checkpoint of a pre-training run, sample grids of a finished run,
its export, and FISH's Fisher scores — ``python -m vision_peft.diffusion_tools base|sample|export|fisher``.

They load run directories and recipes, so they sit above the task layer (next to predict and export); the task
itself (``vision_peft/tasks/diffusion.py``) never imports them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vision_peft.config import ConfigError
from vision_peft.runtimes.diffusion import DiffusionInputError
from vision_peft.tasks import TASKS


def write_base_checkpoint(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Turn a finished ``stage: pretrain`` run into a DiT checkpoint usable as ``backbone.name=dit:<file>``.
    A KIND pre-training run stores its learngene products as the weights and its tailors as ``kind.*``."""
    from vision_peft.backbones.dit import save_dit
    from vision_peft.predict import load_run

    cfg, task, model, info = load_run(run_dir, "cpu")
    if cfg.task.stage != "pretrain":
        raise ConfigError(f"{run_dir} is not a pre-training run (task.stage={cfg.task.stage})")
    out = Path(out) if out else Path(run_dir) / "base_dit.safetensors"
    dit = model.backbone
    meta = {
        "classes": task.classes,
        "pretrained_by": "vision_peft diffusion pretrain stage",
        "run": str(run_dir),
        "prediction": cfg.task.prediction,
    }
    extra = model.adapter.merge_and_unload()  # KIND: learngene products as weights, tailors as kind.* tensors
    save_dit(out, dit, extra=extra or None, meta=meta)
    return out


def save_grid(images: torch.Tensor, nrow: int, path: str | Path) -> Path:
    """Images (N, 3, H, W) in [0, 1] to a PNG grid, ``nrow`` images per row (the runtime's grid writer)."""
    from vision_peft.runtimes.diffusion import save_grid as write

    return write(images.detach().float().cpu().numpy(), nrow, path)


def sample_run(run_dir: str | Path, classes: list[str] | None, n: int, out: str | Path, steps: int = 25,
               guidance: float = 2.0, seed: int = 0) -> Path:  # fmt: skip
    """class names → PNG grid (one row per class) from a finished run."""
    from vision_peft.predict import load_run

    _, task, model, _ = load_run(run_dir, "cpu")
    names = classes or task.classes
    unknown = [c for c in names if c not in task.classes]
    if unknown:
        raise DiffusionInputError(f"class(es) {unknown} were not trained in {run_dir}; known: {task.classes}")
    ys = torch.tensor([task.classes.index(c) for c in names]).repeat_interleave(n)
    return save_grid(model.sample(ys, steps, guidance, seed), n, out)


def export_diffusion(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """The merged denoiser and the TAEF2 decoder as one bundle (``python -m vision_peft export`` does the same);
    :meth:`vision_peft.deploy.Bundle.generate` samples from it with numpy + onnxruntime."""
    from vision_peft.export import export_run

    return export_run(run_dir, out_dir)


FISHER_SAMPLES = 1024  # default N of ``fisher``: FISH (Sung et al., 2021) averages over ~1k examples


def fisher_inputs(
    recipe: str,
    overrides: list[str] | None = None,
    batches: int | None = None,
    samples: int | None = None,
    chunk: int = 16,
) -> tuple[Any, nn.Module, list[dict[str, torch.Tensor]], list[str], Any]:
    """(config, frozen task model in eval mode, N examples as chunks of (latent, label, t, noise), the eligible
    tensors' parameter names, the mean denoising loss of a batch) for :func:`compute_fisher` and its checks."""
    from vision_peft.adapters.sara import eligible_tensors
    from vision_peft.recipe import load_recipe

    cfg = load_recipe(recipe, list(overrides or []))
    targets = list(getattr(cfg.adapter, "targets", ["blocks_linear"]))
    eligible = getattr(cfg.adapter, "eligible", "linear")
    n = samples if samples is not None else (batches * cfg.train.batch_size if batches else FISHER_SAMPLES)
    if n <= 0 or chunk <= 0:
        raise ConfigError(f"fisher needs --samples > 0 and --chunk > 0, got samples={n}, chunk={chunk}")
    adapter = cfg.adapter
    cfg.adapter = load_recipe(recipe, [*(overrides or []), "adapter.name=linear"]).adapter  # nothing wrapped
    task = TASKS.get("diffusion").builder(cfg)
    model = task.build_model().eval()
    ds = task.datasets(model)["train"]
    cfg.adapter = adapter  # the recipe's own adapter section again (its targets / eligible name the tensors)
    if len(ds) == 0:
        raise ConfigError(f"fisher: the recipe {recipe} has no training examples (task.train_per_class, data_root)")
    gen = torch.Generator().manual_seed(cfg.train.seed)
    examples, have = [], 0
    while have < n:  # (latent, label, t, noise) draws; one pass over the training split per loop
        for b in torch.utils.data.DataLoader(ds, batch_size=chunk, shuffle=True, generator=gen):
            z0, y = b["latent"][: n - have], b["label"][: n - have]
            t = torch.randint(0, cfg.task.num_timesteps, (len(y),), generator=gen)
            noise = torch.randn(z0.shape, generator=gen)
            examples.append({"latent": z0, "label": y, "t": t, "noise": noise})
            have += len(y)
            if have >= n:
                break
    names = [f"{mod}.{pn}" for _, mod, pn in eligible_tensors(model.backbone, targets, eligible)]

    def loss(b: dict[str, torch.Tensor]) -> torch.Tensor:  # the mean denoising loss of a batch (here: one example)
        return model.eps_loss(b["latent"], b["label"], b["t"], b["noise"])

    return cfg, model, examples, names, loss


def compute_fisher(
    recipe: str,
    out: str | Path,
    overrides: list[str] | None = None,
    batches: int | None = None,
    samples: int | None = None,
    chunk: int = 16,
    method: str = "vmap",
) -> Path:
    """FISH scores of the frozen base DiT's eligible tensors (the recipe's ``adapter.targets`` / ``eligible``),
    saved as safetensors (keys: parameter names; format ``vision_peft.fisher/2``) for ``adapter.fisher_file``.

    The empirical Fisher is the mean over N examples of the *per-example* squared gradient of the per-example
    log-likelihood; for a diffusion model the per-example "log-likelihood" is the per-example denoising loss
    −ℓ_i, ℓ_i = mean ‖f(x_t, t, y) − target‖² of one training latent with its own t and noise draw (eval mode: no
    class dropout; a constant scale of the loss does not change the ranking). Examples are (latent, label, t, noise)
    draws from the recipe's training split, reshuffled with new t / noise when N exceeds it (seeded by
    ``train.seed``). Per-example gradients: ``torch.func.vmap(grad)`` over ``chunk`` examples at a time.

    Args:
        samples: N; default :data:`FISHER_SAMPLES` (1024).
        batches: the older option: N = batches × train.batch_size (the examples the earlier mean-loss command saw);
            ignored when ``samples`` is given.
    """
    from safetensors.torch import save_file

    from vision_peft.adapters.sara import FISHER_FORMAT, fisher_scores

    cfg, model, examples, names, loss = fisher_inputs(recipe, overrides, batches, samples, chunk)
    n = sum(len(e["label"]) for e in examples)
    targets = list(getattr(cfg.adapter, "targets", ["blocks_linear"]))
    eligible = getattr(cfg.adapter, "eligible", "linear")
    sc = fisher_scores(model.backbone, names, loss, examples, method=method, chunk=chunk)
    meta = {"format": FISHER_FORMAT, "samples": str(n), "eligible": eligible, "targets": ",".join(targets),
            "loss": f"per-example {cfg.task.prediction} denoising MSE", "recipe": str(recipe)}  # fmt: skip
    save_file({k: v.contiguous() for k, v in sc.items()}, str(out), metadata=meta)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    """``python -m vision_peft.diffusion_tools base|sample|export RUN_DIR …`` or ``fisher RECIPE --out F``
    (the older ``python -m vision_peft.tasks.diffusion …`` forwards here)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m vision_peft.diffusion_tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("base", help="write <run>/base_dit.safetensors from a finished pretrain run")
    b.add_argument("run_dir")
    b.add_argument("--out")
    s = sub.add_parser("sample", help="class names -> PNG grid")
    s.add_argument("run_dir")
    s.add_argument("--classes", nargs="*")
    s.add_argument("--n", type=int, default=8)
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, default=2.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    e = sub.add_parser("export", help="bundle with denoiser.onnx + decoder.onnx, with parity")
    e.add_argument("run_dir")
    e.add_argument("--out")
    f = sub.add_parser("fisher", help="FISH: empirical Fisher scores of the base DiT for adapter.fisher_file")
    f.add_argument("recipe")
    f.add_argument("overrides", nargs="*")
    f.add_argument("--out", required=True)
    f.add_argument("--samples", type=int, default=None,
                   help=f"N examples of the per-example Fisher (default {FISHER_SAMPLES}, as FISH)")  # fmt: skip
    f.add_argument("--batches", type=int, default=None, help="older option: N = batches x train.batch_size")
    f.add_argument("--chunk", type=int, default=16, help="examples per vmap(grad) call (memory: chunk x tensors)")
    a = ap.parse_args(argv)
    if a.cmd == "fisher":
        print(compute_fisher(a.recipe, a.out, a.overrides, a.batches, a.samples, a.chunk))
        return
    if a.cmd == "base":
        print(write_base_checkpoint(a.run_dir, a.out))
    elif a.cmd == "sample":
        print(sample_run(a.run_dir, a.classes, a.n, a.out, a.steps, a.guidance, a.seed))
    else:
        m = export_diffusion(a.run_dir, a.out)
        print(json.dumps(m["parity"], indent=1, default=str))


if __name__ == "__main__":
    main()
