"""Class-conditional latent diffusion (TAEF2 latents, a DiT denoiser pre-trained by this project, adapted to new
classes with SaRA, KIND, LoRA, FISH or full fine-tuning) — the task's public face.

Where each part lives:

- ``diffusion_task.py``: ``DiffusionConfig`` and the registered ``DiffusionTask`` (stages, splits, evaluation, export);
- ``diffusion_model.py``: DDPM schedule, ε/v loss with class dropout, guided DDIM sampling (the one sampler of
  ``vision_peft/runtimes/diffusion.py``), export wrappers;
- ``diffusion_data.py``: class-folder images, the RGB loader, TAEF2 latents;
- ``diffusion_eval.py``: KID (and a PCA-projected Fréchet distance) in EfficientNet-Lite0 space, the fixed sample
  classifier, the intervals;
- ``vision_peft/diffusion_tools.py``: run-level tools above the task layer (base checkpoint, sample grids, export,
  FISH's Fisher scores). ``python -m vision_peft.tasks.diffusion base|sample|export|fisher …`` runs them (the
  commands the README documents).
"""

from __future__ import annotations

from vision_peft.runtimes.diffusion import MAX_GUIDANCE, DiffusionInputError, check_sampling
from vision_peft.tasks.diffusion_data import LATENT_SCALE, encode_images, list_class_images, load_rgb
from vision_peft.tasks.diffusion_eval import frechet_distance, frechet_pca, kid, kid_bootstrap
from vision_peft.tasks.diffusion_model import DiffusionModel, ddpm_alphas_cumprod
from vision_peft.tasks.diffusion_task import DiffusionConfig, DiffusionTask

__all__ = [
    "LATENT_SCALE", "MAX_GUIDANCE", "DiffusionConfig", "DiffusionInputError", "DiffusionModel", "DiffusionTask",
    "check_sampling", "ddpm_alphas_cumprod", "encode_images", "frechet_distance", "frechet_pca", "kid", "kid_bootstrap",
    "list_class_images", "load_rgb",
]  # fmt: skip


if __name__ == "__main__":
    # `python -m vision_peft.tasks.diffusion …` (the commands the README documents) runs the run-level tools module
    # as the script. Importing this module never loads those tools (they sit above the task layer); only running
    # the file does, so the forward is by module name.
    import runpy

    runpy.run_module("vision_peft.diffusion_tools", run_name="__main__", alter_sys=True)
