"""Referring image segmentation (image + phrase → binary mask), the DETRIS recipe on any image/text encoder pair.

Two frozen encoders: the run's ``backbone`` (image: anything with ``forward_intermediates``) and
``task.text_backbone`` (MiniLM, open_clip text towers). The adapter (e.g. ``detris``) may implement the
text-conditioning protocol (``backbone.text_conditioning``, see ``vision_peft.adapters.detris``): the model
then runs the text encoder first and hands its tokens to the image encoder's adapters. The head (neck, decoder,
projector; all trainable) is in :mod:`vision_peft.tasks.refseg_model`, the metrics in
:mod:`vision_peft.tasks.refseg_metrics`, the data formats (chosen by ``task.data`` through ``DATASETS``) in
:mod:`vision_peft.data.refer`.

Inference: sigmoid, bilinear upsampling, undo the letterbox, threshold (0.35) — the torch-free rule of
:mod:`vision_peft.runtimes.refseg`, used here too, as is its token truncation rule. Evaluation runs **every
sentence** of every referred object (``task.eval_phrases: all``, as the official DETRIS ``inference``); each
sentence is one sample. Metrics, always together, at the original image resolution: mIoU (mean per-sentence IoU),
oIoU (ΣI / ΣU over all sentences), Prec@0.5…0.9 (share of sentences with IoU > t) — definitions and the
image-level bootstrap in :mod:`vision_peft.tasks.refseg_metrics`.

Splits: by images (``task.split``), or the annotations' own (``split_source: annotations``): every split name the
refs carry is its own split (RefCOCO ``val``, ``testA``, ``testB``; RefCOCOg ``test``). Where the annotations have
no ``test`` but ``test*`` parts (RefCOCO/RefCOCO+ testA, testB), ``test`` is their union — what ``test`` meant
before testA/testB were separated, so old configs and the run's final evaluation keep reporting it — and its
metrics also carry each part separately (``by_split``); ``vision_peft eval RUN --split testA`` evaluates one part.

Where this differs from DETRIS/CRIS: the neck resizes all levels to the middle grid instead of CRIS's fixed
1/8-1/16-1/32 wiring (so ViTs with one stride work); the sentence gate is a projection (a cross-attention to a
single sentence token reduces to one); Adam lr and epochs come from the recipe; images are letterboxed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vision_peft.config import BackboneConfig, ConfigError, check_choices
from vision_peft.data.refer import read_refer, refer_format_names
from vision_peft.paths import resolve_data_path
from vision_peft.preprocess import IMAGE_SUFFIXES
from vision_peft.runtimes.refseg import fit_tokens, mask_probs
from vision_peft.tasks import TASKS
from vision_peft.tasks.base import ExportSpec, Task, TaskModel
from vision_peft.tasks.refseg_metrics import (  # noqa: F401  (PREC_THRESHOLDS, seg_metrics re-exported)
    PREC_THRESHOLDS,
    onnx_agreement,
    seg_metrics,
    sentence_metrics,
    sentence_results,
)
from vision_peft.tasks.refseg_model import MaskLogitsGraph, RefSegModel

log = logging.getLogger("vision_peft")


@dataclass
class RefSegConfig:
    """Referring image segmentation with a frozen image encoder and a frozen text encoder."""

    name: str = "refseg"  # registry name
    data: str = "coco128_seg"  # data format (DATASETS): coco128_seg (generated phrases) | folder (refs.json) | refcoco
    data_root: str = "coco128-seg"  # dataset folder (relative paths resolve under $VISION_PEFT_DATA)
    refs_file: str = "refs(unc).p"  # refcoco: the refs pickle (read with a plain-containers-only unpickler)
    instances_file: str = "instances.json"  # refcoco: COCO instances with the segmentations
    split_source: Literal["images", "annotations"] = "images"  # images: split by the counts below | the refs' own
    split: dict[str, int] = field(default_factory=lambda: {"train": -1, "test": 25})  # images per split; -1 = rest
    split_seed: int = 0  # seed of the image-level split (numpy RandomState permutation of sorted image ids)
    min_area: float = 0.01  # coco128_seg: smallest target (fraction of the image area) that gets phrases
    mask_mismatch: Literal["resize", "error"] = "resize"  # folder: mask size ≠ image: resize (nearest) | error
    text_backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(name="minilm"))  # frozen text encoder
    max_tokens: int = 24  # tokens per phrase incl. special tokens; longer phrases are truncated (with a warning)
    augment: str = "light"  # joint image/mask augmentation: flip (letterbox + mirror, no crop) | none | light | …
    eval_phrases: Literal["all", "first"] = "all"  # evaluate every phrase of each object (official) | the first
    feature_indices: list[int] | None = None  # three image-backbone levels for the neck; None = auto
    dim: int = 512  # neck / decoder width
    decoder_layers: int = 3  # transformer decoder layers
    heads: int = 8  # decoder attention heads
    ffn: int = 2048  # decoder feed-forward width
    proj_dim: int = 256  # projector channels (the dynamic kernel is proj_dim × 3 × 3)
    dropout: float = 0.1  # decoder dropout
    threshold: float = 0.35  # probability threshold of the predicted mask

    def __post_init__(self) -> None:
        from vision_peft.data.refer_dataset import CROPPING_PRESETS

        check_choices(self, "task")
        self.augment = self.augment or "none"  # a CLI override "none" arrives as None
        if self.augment not in ("flip", "none", *CROPPING_PRESETS):
            raise ConfigError(
                f"task.augment must be flip (letterbox + mirror), none or one of {', '.join(CROPPING_PRESETS)}, "
                f"got {self.augment!r}"
            )
        if self.data not in refer_format_names():
            raise ConfigError(f"task.data must be one of {', '.join(refer_format_names())}, got {self.data!r}")
        if "train" not in self.split or set(self.split) - {"train", "val", "test"}:
            raise ConfigError(f"task.split needs train (and optionally val, test) image counts, got {self.split}")
        if sum(1 for v in self.split.values() if v < 0) > 1:
            raise ConfigError("task.split: only one split may take the rest (-1)")
        if self.max_tokens < 3:
            raise ConfigError(f"task.max_tokens must be >= 3 (two special tokens + one word), got {self.max_tokens}")
        if self.feature_indices is not None and len(self.feature_indices) != 3:
            raise ConfigError(f"task.feature_indices needs exactly 3 levels, got {self.feature_indices}")
        if self.dim % self.heads:
            raise ConfigError(f"task.dim={self.dim} must be divisible by task.heads={self.heads}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"task.threshold must lie in (0, 1), got {self.threshold}")
        if self.decoder_layers < 0 or self.proj_dim < 1:
            raise ConfigError("task.decoder_layers must be >= 0 and task.proj_dim >= 1")


def text_tokenizer_file(text) -> str:
    """A ``tokenizer.json`` equivalent to the text encoder's tokenizer, for torch-free deployment: MiniLM ships one;
    open_clip's CLIP BPE tokenizer is converted into a temporary folder (removed at exit). "" when neither applies."""
    path = str(text.data_config.get("tokenizer", ""))
    if path.endswith(".json") and Path(path).is_file():
        return path
    if hasattr(text, "tokenizer_file"):
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="vision_peft-tokenizer-")
        atexit.register(shutil.rmtree, folder, True)
        return text.tokenizer_file(folder)
    return ""


# -- task --------------------------------------------------------------------------------------------------------
@TASKS.register(
    "refseg",
    config_cls=RefSegConfig,
    help="referring image segmentation (image + phrase → mask)",
    requires=("image",), provides=("text_encoder",),  # binds its text encoder to the adapter (DETRIS)
    spec={  # tiny offline config (tests): a random tiny text tower and a small head
        "text_backbone": {"name": "open_clip_text:vp-tiny-clip", "pretrained": False},
        "dim": 32, "heads": 4, "ffn": 64, "proj_dim": 8, "decoder_layers": 1, "max_tokens": 8, "augment": "none",
    },
)  # fmt: skip
class RefSegTask(Task):
    """Referring image segmentation with a frozen image/text encoder pair."""

    name = "refseg"
    runtime = "refseg"
    upload_suffixes = (*IMAGE_SUFFIXES, ".json", ".txt", ".p", ".pickle")  # images, refs.json / labels, refs pickle
    preview = "refer"
    has_classes = False
    predict_options = ()
    frozen_encoders = ("text_backbone",)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._samples = None
        self._stats: dict[str, Any] = {}
        self._warned: set[str] = set()

    # -- data -------------------------------------------------------------------------------------------
    def samples(self):
        """The referring targets of ``task.data_root`` in format ``task.data`` (read once)."""
        from vision_peft.data import refer

        if self._samples is None:
            t = self.cfg.task
            root = resolve_data_path(t.data_root)
            self._samples, self._stats = read_refer(
                t.data,
                root,
                min_area=t.min_area,
                mask_mismatch=t.mask_mismatch,
                refs_file=t.refs_file,
                instances_file=t.instances_file,
            )
            if not self._samples:
                raise refer.DatasetError(f"{root} holds no referring targets ({t.data} format)")
        return self._samples

    def split_samples(self):
        """Split name -> samples: by images (``task.split``), or the annotations' own names (``split_source:
        annotations``: train, val, testA, testB, test …; ``test`` = the union of the ``test*`` parts when the
        annotations have no ``test`` of their own)."""
        from vision_peft.data import refer

        t = self.cfg.task
        samples = self.samples()
        if t.split_source == "annotations":
            out: dict[str, list] = {}
            for s in samples:
                if s.split:
                    out.setdefault(str(s.split), []).append(s)
            if not out.get("train"):
                raise refer.DatasetError(
                    f"task.split_source=annotations but no sample has split 'train' (splits found: "
                    f"{', '.join(sorted(out)) or 'none'}); set task.split_source=images to split by image count"
                )
            parts = sorted(k for k in out if k.startswith("test") and k != "test")
            if "test" not in out and parts:
                out["test"] = [s for k in parts for s in out[k]]  # testA ∪ testB: the old meaning of "test"
            first = [k for k in ("train", "val", "test") if k in out]
            return {k: out[k] for k in [*first, *sorted(set(out) - set(first))]}
        return refer.split_by_image(samples, dict(t.split), t.split_seed)

    def splits(self) -> dict[str, list[tuple[str, str]]]:
        """Per split: (image#ref id, first phrase), one entry per object — written to the run's split.json (with
        annotation splits, ``test`` = testA ∪ testB lists those objects again under their own part)."""
        return {
            k: [(f"{Path(s.image).name}#{s.ref_id}", s.phrases[0]) for s in v] for k, v in self.split_samples().items()
        }

    def train_augment(self, spec: dict) -> Any:
        """``task.augment``: ``flip`` is letterbox + horizontal mirror (no crop, so generated phrases stay true);
        the other presets come from :mod:`vision_peft.augment`. Cropping presets on generated phrases are warned
        about: a crop can cut away the referent or its distractors and make "the leftmost dog" false."""
        from vision_peft.data.refer_dataset import CROPPING_PRESETS, FlipAugment

        preset = self.cfg.task.augment
        if preset == "flip":
            return FlipAugment()
        if preset in CROPPING_PRESETS and self._generated_phrases():
            log.warning(
                "task.augment=%s crops and rescales, but the phrases of task.data=%s are generated from the whole "
                "image: a crop can remove the referent or its distractors and make a phrase false; use "
                "task.augment=flip (letterbox + mirror) or none",
                preset,
                self.cfg.task.data,
            )
        return super().train_augment(spec)

    def _generated_phrases(self) -> bool:
        self.samples()
        return self._stats.get("phrases") == "generated"

    def resize_mode(self) -> str:
        return "letterbox"  # masks are un-letterboxed back to the image (runtimes.refseg.mask_probs)

    def tokenizer(self, model: RefSegModel):
        """phrase → (input_ids (L,), attention_mask (L,)) padded/truncated to the fixed length L (cached)."""
        text = model.text
        length = min(self.cfg.task.max_tokens, int(text.context_length))
        cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def tok(phrase: str) -> tuple[torch.Tensor, torch.Tensor]:
            if phrase in cache:
                return cache[phrase]
            if not phrase.strip() and "empty" not in self._warned:
                self._warned.add("empty")
                log.warning("empty referring phrase: the model sees only the text encoder's special tokens")
            enc = text.tokenize([phrase])
            ids, am = enc["input_ids"][0].long(), enc["attention_mask"][0].long()
            n = int(am.sum())
            if n > length or n >= int(text.context_length):
                if phrase not in self._warned:
                    self._warned.add(phrase)
                    log.warning(
                        "phrase %r has %d tokens, more than task.max_tokens=%d (text context %d): truncated, "
                        "keeping the final special token",
                        phrase[:80],
                        n,
                        length,
                        text.context_length,
                    )
            fit_ids, fit_mask = fit_tokens(ids[:n].tolist(), length)  # the runtime's truncation / padding rule
            ids, am = torch.tensor(fit_ids, dtype=torch.long), torch.tensor(fit_mask, dtype=torch.long)
            cache[phrase] = (ids, am)
            return ids, am

        return tok

    def datasets(self, model: TaskModel) -> dict[str, torch.utils.data.Dataset]:
        from vision_peft.data.refer import RefSegDataset

        spec = self.image_spec(model)
        aug = self.train_augment(spec)
        tok = self.tokenizer(model)
        out = {}
        phrases = self.cfg.task.eval_phrases
        for split, samples in self.split_samples().items():
            if samples:
                train = split == "train"
                out[split] = RefSegDataset(
                    samples, spec, tok, aug if train else None, self.cfg.train.seed, train, phrases=phrases
                )
        return out

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    def extra_state(self) -> dict[str, Any]:
        return {"data_stats": self._stats, "threshold": self.cfg.task.threshold}

    # -- model ------------------------------------------------------------------------------------------
    def build_text(self):
        """The frozen text encoder of ``task.text_backbone`` (its weights recorded in ``state_info``)."""
        return self.build_frozen_encoder("text_backbone", "text")

    def build_model(self) -> RefSegModel:
        backbone, handle, base = self.build_backbone("image")
        text = self.build_text()
        cond = getattr(backbone, "text_conditioning", None)  # the adapter's text-conditioning protocol (DETRIS)
        if cond is not None:
            handle.touched.extend(cond.bind_text_encoder(text))
        indices = self.cfg.task.feature_indices
        if indices is None:
            indices = backbone.default_feature_indices()
        was = backbone.training
        backbone.eval()
        h, w = backbone.input_size
        with torch.no_grad():
            try:
                feats = backbone.forward_intermediates(torch.zeros(1, 3, h, w), list(indices))
            except Exception as e:
                raise ConfigError(
                    f"backbone {self.cfg.backbone.name!r} cannot give feature maps at task.feature_indices={indices}: {e}"
                ) from e
        backbone.train(was)
        in_chs = [int(f.shape[1]) for f in feats]
        model = RefSegModel(backbone, handle, text, list(indices), in_chs, self.cfg.task)
        model.mark_base(base)
        return model

    # -- metrics ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def sentence_results(self, model: TaskModel, loader, device: torch.device, amp_dtype=None) -> dict[str, Any]:
        """Every sentence of ``loader``'s dataset through the model (:func:`refseg_metrics.sentence_results`)."""
        return sentence_results(model, loader, device, self.cfg.task.threshold, amp_dtype)

    def evaluate(self, model: TaskModel, loader, device: torch.device, amp_dtype=None) -> dict[str, Any]:
        """mIoU, oIoU, Prec@0.5…0.9 over every sentence, per annotation split too (:func:`sentence_metrics`)."""
        return sentence_metrics(self.sentence_results(model, loader, device, amp_dtype))

    # -- predict ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_mask(self, model: RefSegModel, image, phrase: str, device: torch.device | str = "cpu") -> dict:
        """One image (path, PIL or uint8 array) + phrase → {"prob": (H, W) float32, "mask": (H, W) bool}."""
        from vision_peft.preprocess import _as_image, preprocess_image

        model.eval()
        img = _as_image(image)
        spec = self.image_spec(model)
        x = torch.from_numpy(preprocess_image(img, spec))[None].to(device)  # (1, 3, H, W)
        ids, am = self.tokenizer(model)(phrase)
        lg = model.logits(x, ids[None].to(device), am[None].to(device)).float()[0, 0].cpu().numpy()
        prob = mask_probs(lg, (img.height, img.width), tuple(spec["size"]))  # sigmoid + un-letterbox (runtime rule)
        return {"prob": prob, "mask": prob > self.cfg.task.threshold, "image": img}

    def predict(
        self, model: TaskModel, inputs: list[str], device: torch.device, top_k: int = 5
    ) -> list[dict[str, Any]]:
        """Inputs ``IMAGE::PHRASE``; writes ``predictions/<image>-<phrase>.mask.png`` and ``.overlay.png``."""
        from PIL import Image

        out_dir = Path("predictions")
        out_dir.mkdir(exist_ok=True)
        res = []
        for item in inputs:
            if "::" not in item:
                raise ValueError(
                    f"refseg predict takes IMAGE::PHRASE (e.g. 'photo.jpg::the dog on the left'), got {item!r}"
                )
            path, phrase = item.split("::", 1)
            r = self.predict_mask(model, path, phrase, device)
            slug = re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_")[:40] or "empty"
            stem = out_dir / f"{Path(path).stem}-{slug}"
            Image.fromarray((r["mask"] * 255).astype(np.uint8)).save(f"{stem}.mask.png")
            rgb = np.asarray(r["image"], dtype=np.float32)
            rgb[r["mask"]] = 0.5 * rgb[r["mask"]] + 0.5 * np.array([255, 0, 0], np.float32)
            Image.fromarray(rgb.astype(np.uint8)).save(f"{stem}.overlay.png")
            res.append(
                {
                    "file": path,
                    "phrase": phrase,
                    "mask": f"{stem}.mask.png",
                    "overlay": f"{stem}.overlay.png",
                    "area_fraction": float(r["mask"].mean()),
                    "max_prob": float(r["prob"].max()),
                }
            )
        return res

    # -- export -----------------------------------------------------------------------------------------
    def export_spec(self, model: TaskModel) -> ExportSpec:
        h, w = model.backbone.input_size
        tok = self.tokenizer(model)
        pairs = [tok("the person on the left"), tok("a dog")]
        ids = torch.stack([p[0] for p in pairs])
        am = torch.stack([p[1] for p in pairs])
        length = ids.shape[1]
        text = model.text
        stride = h // max(1, self._logit_hw(model)[0])
        tok_file = text_tokenizer_file(text)
        return ExportSpec(
            module=MaskLogitsGraph(model),
            example_inputs={"image": torch.randn(2, 3, h, w), "input_ids": ids, "attention_mask": am},
            output_names=["mask_logits"],
            outputs_meaning={
                "mask_logits": f"(batch, 1, {h // stride}, {w // stride}) mask logits on the letterboxed input at "
                f"1/{stride} resolution: sigmoid, resize to {h}x{w}, cut the letterbox padding, resize to the "
                f"image, threshold {self.cfg.task.threshold}"
            },
            preprocess={
                "image": self.image_spec(model),
                "input_ids": {
                    "tokenizer": text.data_config.get("tokenizer", ""),
                    "library": "tokenizers (tokenizer.json in this bundle)" if tok_file else "open_clip",
                    "max_length": int(length),
                    "padding": "right, id 0, to exactly max_length",
                    "truncation": "keep the first max_length-1 tokens and the final special token",
                    "special_tokens": "added by the tokenizer (e.g. [CLS] … [SEP] or <sot> … <eot>)",
                },
                "attention_mask": {"meaning": "1 for real tokens, 0 for padding", "max_length": int(length)},
                "mask_logits": {
                    "stride": int(stride),
                    "undo_letterbox": "sigmoid; bilinear resize to the input size; crop rows pad_top:pad_top+new_h "
                    "and columns pad_left:pad_left+new_w (letterbox_params: scale=min(H/h0, W/w0), new=round(h0*scale), "
                    "pad=(H-new)//2); resize to the original image",
                    "threshold": self.cfg.task.threshold,
                },
            },
            labels=[],
            graph_name="refseg",
            task_info={
                "threshold": float(self.cfg.task.threshold),
                "max_length": int(length),
                "stride": int(stride),
                "tokenizer_file": "tokenizer.json" if tok_file else "",
            },
            extra_files={"tokenizer.json": tok_file} if tok_file else None,
        )

    def _logit_hw(self, model: TaskModel) -> tuple[int, int]:
        h, w = model.backbone.input_size
        tok = self.tokenizer(model)
        ids, am = tok("a")
        was = model.training
        model.eval()
        with torch.no_grad():
            lg = model.logits(torch.zeros(1, 3, h, w), ids[None], am[None])
        model.train(was)
        return int(lg.shape[-2]), int(lg.shape[-1])

    def onnx_agreement(self, run_fn, model: TaskModel, max_samples: int = 64) -> dict[str, Any] | None:
        """Test split through torch and an exported graph (see :func:`refseg_metrics.onnx_agreement`)."""
        ds = self.datasets(model).get("test")
        if ds is None:
            return None
        return onnx_agreement(model, ds, run_fn, self.cfg.task.threshold, max_samples)

    def evaluate_onnx(self, run_fn, model: TaskModel) -> dict[str, Any] | None:
        res = self.onnx_agreement(run_fn, model)
        if res is None:
            return None
        return {**res["onnx"], "n": res["n"], "mask_iou_vs_torch": res["mask_iou_torch_vs_onnx_mean"]}

    def synthetic_batch(self, model: TaskModel, n: int = 2) -> dict[str, torch.Tensor]:
        h, w = model.backbone.input_size
        tok = self.tokenizer(model)
        pairs = [tok(p) for p in ["the cat on the left", "the larger of the two dogs", "a"][:n]] * (n // 3 + 1)
        mask = torch.zeros(n, h, w)
        mask[:, h // 4 : h // 2, w // 4 : w // 2] = 1
        return {
            "image": torch.randn(n, 3, h, w),
            "mask": mask,
            "input_ids": torch.stack([p[0] for p in pairs[:n]]),
            "attention_mask": torch.stack([p[1] for p in pairs[:n]]),
            "index": torch.arange(n),
        }
