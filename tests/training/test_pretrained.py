"""Public CLIP weights in and out, checked against the reference implementations.

References, all real: transformers' CLIPModel (built here from small configs with
random weights), its CLIPImageProcessor, and OpenAI's tokenizer as shipped in the
open-clip-torch wheel (its tokenizer module needs no torchvision and is loaded
from the installed file; the package's __init__ needs torchvision, which these
machines lack). OpenAI/OpenCLIP naming is covered through the state-dict
structure: the OpenAI-named file is written from the transformers model with the
correspondence transformers' own conversion script uses (q/k/v = in_proj split in
three, projections transposed), and OpenCLIP's shipped model config is compared.
"""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ClipError
from training.model import CLIP, MEAN, STD, model_config

transformers = pytest.importorskip("transformers")


def open_clip_dir() -> Path:
    spec = importlib.util.find_spec("open_clip")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-clip-torch is not installed (make setup installs it without dependencies)")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="module")
def reference_tokenizer():
    spec = importlib.util.spec_from_file_location("openai_reference_tokenizer", open_clip_dir() / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


CAPTIONS = [
    "a photo of a cat",
    "Tom &amp;amp; Jerry's  café — naïve   ÉCOLE",
    "&lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;x&#39; &eacute;t&eacute;",
    "🐱🐶 emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇩🇪",
    "日本語のキャプション 中文标题 한국어 캡션 русский текст العربية",
    "mojibake: cafÃ© donâ€™t",
    "I'll we've they're it's she'd you'll I'M",
    "123 4567 3.14 1,000,000 2nd 10x",
    "Ａｂｃ full-width ＡＢＣ",
    "tab\tnew\nline\r\n  spaces   ",
    "x" * 400,
    " ".join(f"word{i}" for i in range(120)),
    "",
    "<|endoftext|> and <|startoftext|> as text",
]


def test_openai_tokenizer_equals_the_reference(reference_tokenizer):
    from training.tokenizer import Tokenizer

    ours = Tokenizer.openai()
    assert (ours.sot_id, ours.eot_id, ours.vocab_size) == (49406, 49407, 49408)
    got = ours(CAPTIONS).numpy()
    expected = reference_tokenizer(CAPTIONS).numpy()
    assert got.shape == expected.shape == (len(CAPTIONS), 77)
    assert np.array_equal(got, expected)
    long = got[CAPTIONS.index("x" * 400)]
    assert long[-1] == 49407 and (long != 0).all()  # cut to 77 and still ends in <eot>
    assert ours.decode(got[0]) == "a photo of a cat"
    assert Tokenizer.from_bytes(ours.to_bytes())(CAPTIONS).numpy().tolist() == got.tolist()
    # None is an empty caption, and a short context keeps <eot> last
    short = Tokenizer.openai(context_length=8)(["a b c d e f g h i j", None]).numpy()
    assert short[0].tolist() == reference_tokenizer(["a b c d e f g h i j"], context_length=8)[0].tolist()
    assert short[1].tolist() == [49406, 49407, 0, 0, 0, 0, 0, 0]


def hf_reference(act: str = "quick_gelu", seed: int = 0, vocab: int = 49408, eps: float = 1e-5):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, hidden_act=act,
                max_position_embeddings=77, vocab_size=vocab, eos_token_id=vocab - 1, bos_token_id=vocab - 2,
                pad_token_id=1, layer_norm_eps=eps)  # fmt: skip
    vision = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                  patch_size=8, hidden_act=act, layer_norm_eps=eps)  # fmt: skip
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=48)).eval()
    with torch.no_grad():  # random LayerNorm gains and a logit scale that is not the default
        for name, p in model.named_parameters():
            if "norm" in name or "logit_scale" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_features(model, images: torch.Tensor, ids: torch.Tensor, mean=MEAN, std=STD):
    pixels = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(input_ids=ids)
    image = image if torch.is_tensor(image) else image.pooler_output
    text = text if torch.is_tensor(text) else text.pooler_output
    return image, text


def ours_features(model: CLIP, images, ids):
    with torch.no_grad():
        return model.encode_image(images, normalize=False), model.encode_text(ids, normalize=False)


IMAGES = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
TEXTS = ["a photo of a cat", "two dogs 🐶 on grass", "x " * 100, ""]


def assert_same(a: tuple, b: tuple, atol: float = 1e-5) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        assert (x - y).abs().max().item() < atol, (x - y).abs().max().item()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hugging_face_directory_loads_with_equal_features(tmp_path, act):
    from training.checkpoint import load_model

    reference = hf_reference(act, eps=1e-6 if act == "gelu" else 1e-5)
    reference.save_pretrained(tmp_path / "hf")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    model, tokenizer = load_model(str(tmp_path / "hf"))
    assert tokenizer.kind == "openai" and model.config.activation == act
    assert model.config.image_mean == mean
    ids = tokenizer(TEXTS)
    assert_same(ours_features(model, IMAGES, ids), hf_features(reference, IMAGES, ids, mean, std))
    assert model.logit_scale.item() == pytest.approx(reference.logit_scale.item(), abs=1e-7)


def openai_state_dict(hf) -> dict[str, torch.Tensor]:
    """The transformers model's tensors under OpenAI's names, as transformers' conversion script relates them."""
    s = hf.state_dict()
    out = {
        "visual.conv1.weight": s["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": s["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": s["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": s["visual_projection.weight"].t(),
        "token_embedding.weight": s["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": s["text_model.embeddings.position_embedding.weight"],
        "text_projection": s["text_projection.weight"].t(),
        "logit_scale": s["logit_scale"],
        "input_resolution": torch.tensor(32),  # non-tensor-like extras OpenAI's archives carry are ignored
    }
    norms = {"visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
             "ln_final": "text_model.final_layer_norm"}  # fmt: skip
    for ours, theirs in norms.items():
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = s[f"{theirs}.{p}"]
    for tower, prefix, layers in (("vision_model", "visual.transformer", 3), ("text_model", "transformer", 2)):
        for i in range(layers):
            t, o = f"{tower}.encoder.layers.{i}", f"{prefix}.resblocks.{i}"
            for p in ("weight", "bias"):
                out[f"{o}.attn.in_proj_{p}"] = torch.cat([s[f"{t}.self_attn.{x}_proj.{p}"] for x in "qkv"])
                out[f"{o}.attn.out_proj.{p}"] = s[f"{t}.self_attn.out_proj.{p}"]
                out[f"{o}.ln_1.{p}"] = s[f"{t}.layer_norm1.{p}"]
                out[f"{o}.ln_2.{p}"] = s[f"{t}.layer_norm2.{p}"]
                out[f"{o}.mlp.c_fc.{p}"] = s[f"{t}.mlp.fc1.{p}"]
                out[f"{o}.mlp.c_proj.{p}"] = s[f"{t}.mlp.fc2.{p}"]
    return {k: v.clone().contiguous() for k, v in out.items()}


class _Holder(torch.nn.Module):
    """A module tree whose state dict has OpenAI's names, to save as a TorchScript archive like OpenAI's files."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        for key, value in state.items():
            owner = self
            *path, leaf = key.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("form", ["state_dict", "open_clip_run", "torchscript", "safetensors"])
def test_openai_and_open_clip_files_load_with_equal_features(tmp_path, form):
    from safetensors.torch import save_file

    from training.checkpoint import load_model

    reference = hf_reference()
    state = openai_state_dict(reference)
    path = tmp_path / f"ViT-tiny.{'safetensors' if form == 'safetensors' else 'pt'}"
    if form == "state_dict":
        torch.save(state, path)
    elif form == "open_clip_run":  # an OpenCLIP training checkpoint: DDP's module. prefix, optimizer state beside
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif form == "torchscript":
        torch.jit.save(torch.jit.script(_Holder({k: v for k, v in state.items() if v.dim() or "logit" in k})), path)
    else:
        save_file({k: v for k, v in state.items() if k != "input_resolution"}, str(path))
    model, tokenizer = load_model(str(path))
    c = model.config
    assert (c.image_size, c.patch_size, c.vision_layers, c.text_layers, c.vision_heads) == (32, 8, 3, 2, 1)
    assert c.activation == "quick_gelu" and tokenizer.kind == "openai"
    # OpenAI's head count is width / 64: give the reference the same by comparing through a 64-wide head model
    ids = tokenizer(TEXTS)
    if form == "state_dict":  # heads differ from the reference's 4 unless the file says so: say so
        cfg = {"quick_gelu": True, "vision_cfg": {"head_width": 24}, "text_cfg": {"heads": 4}}
        (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
        model, tokenizer = load_model(str(path))
        assert (model.config.vision_heads, model.config.text_heads) == (4, 4)
        assert_same(ours_features(model, IMAGES, ids), hf_features(reference, IMAGES, ids))
    else:
        reference_64 = reference_with_heads(reference, vision=1, text=1)
        assert_same(ours_features(model, IMAGES, ids), hf_features(reference_64, IMAGES, ids))


def reference_with_heads(hf, vision: int, text: int):
    """The same weights in a transformers model with other head counts (OpenAI's rule: width / 64)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig.from_dict(hf.config.to_dict())
    config.vision_config.num_attention_heads = vision
    config.text_config.num_attention_heads = text
    other = CLIPModel(config).eval()
    other.load_state_dict(hf.state_dict())
    return other


def test_resnet_and_hf_only_tensors_are_refused_in_one_line(tmp_path):
    from training.checkpoint import load_model

    torch.save({"visual.layer1.0.conv1.weight": torch.zeros(1), "visual.conv1.weight": torch.zeros(1)},
               tmp_path / "RN50.pt")  # fmt: skip
    with pytest.raises(ClipError, match="ModifiedResNet"):
        load_model(str(tmp_path / "RN50.pt"))
    torch.save(hf_reference().state_dict(), tmp_path / "hf.bin")
    with pytest.raises(ClipError, match="config.json"):
        load_model(str(tmp_path / "hf.bin"))
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ClipError, match="not a CLIP state dict"):
        load_model(str(tmp_path / "other.pt"))


def clipline_model(vocab_tokens: str = "clipline"):
    from training.tokenizer import Tokenizer

    torch.manual_seed(3)
    if vocab_tokens == "openai":
        tokenizer = Tokenizer.openai()
        config = model_config("tiny", vocab_size=49408, context_length=77, image_size=32, activation="quick_gelu")
    else:
        tokenizer = Tokenizer.train(["a photo of a cat", "a dog on grass", "two red cars"] * 20, 300, 16)
        config = model_config("tiny", vocab_size=tokenizer.vocab_size, context_length=16, image_size=32)
    model = CLIP(config, eot_id=tokenizer.eot_id).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.3)
    return model, tokenizer


@pytest.mark.parametrize("vocab", ["clipline", "openai"])
def test_export_to_hugging_face_loads_in_transformers_with_equal_features(tmp_path, vocab):
    from transformers import CLIPModel

    from training.checkpoint import load_model
    from training.pretrained import export

    model, tokenizer = clipline_model(vocab)
    written = export(model, tokenizer, "hf", tmp_path / "hf")
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(written)
    assert ("tokenizer.json" in written) == (vocab == "clipline")
    hf, info = CLIPModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    back, back_tokenizer = load_model(str(tmp_path / "hf"))
    ids = back_tokenizer(TEXTS)
    if vocab == "clipline":  # <eot> moved to the highest id, where transformers and OpenCLIP pool
        assert back_tokenizer.eot_id == model.config.vocab_size - 1 != tokenizer.eot_id
        assert back_tokenizer.decode(ids[0].tolist()) == tokenizer.decode(tokenizer(TEXTS)[0].tolist())
    expected = ours_features(model, IMAGES, tokenizer(TEXTS))
    assert_same(hf_features(hf.eval(), IMAGES, ids), expected)
    assert_same(ours_features(back, IMAGES, ids), expected)
    if vocab == "openai":
        from transformers import CLIPTokenizer

        hf_ids = CLIPTokenizer.from_pretrained(tmp_path / "hf")(TEXTS[:2], padding="max_length", max_length=77)
        for row, ours in zip(hf_ids["input_ids"], ids[:2].tolist(), strict=True):
            n = ours.index(49407) + 1
            assert row[:n] == ours[:n]  # transformers pads with <eot> where OpenAI pads with 0


def test_export_to_open_clip_matches_its_naming_and_config(tmp_path):
    from safetensors.torch import load_file

    from training.checkpoint import load_model
    from training.pretrained import export, open_clip_config

    reference = hf_reference()
    state = openai_state_dict(reference)
    torch.save(state, tmp_path / "in.pt")
    model, tokenizer = load_model(str(tmp_path / "in.pt"))
    written = export(model, tokenizer, "open_clip", tmp_path / "oc")
    assert written == ["open_clip_config.json", "open_clip_model.safetensors"]  # OpenAI's tokenizer is implied
    exported = load_file(str(tmp_path / "oc" / "open_clip_model.safetensors"))
    state.pop("input_resolution")
    assert sorted(exported) == sorted(state)  # exactly OpenAI/OpenCLIP's tensor names, nothing missing or extra
    assert all(torch.equal(exported[k], state[k].float()) for k in state)
    back, back_tokenizer = load_model(str(tmp_path / "oc"))
    assert_same(ours_features(back, IMAGES, back_tokenizer(TEXTS)), ours_features(model, IMAGES, tokenizer(TEXTS)))
    # A B/32-shaped model's config is OpenCLIP's own ViT-B-32-quickgelu model config
    shipped = json.loads((open_clip_dir() / "model_configs" / "ViT-B-32-quickgelu.json").read_text())
    b32 = model_config("B/32", vocab_size=49408, activation="quick_gelu")
    assert open_clip_config(b32)["model_cfg"] == shipped


def test_clipline_bpe_export_round_trips(tmp_path):
    from training.checkpoint import load_model
    from training.pretrained import export

    model, tokenizer = clipline_model()
    export(model, tokenizer, "open_clip", tmp_path / "oc")
    back, back_tokenizer = load_model(str(tmp_path / "oc"))
    assert back_tokenizer.eot_id == model.config.vocab_size - 1 and back_tokenizer.kind == "clipline"
    assert_same(ours_features(back, IMAGES, back_tokenizer(TEXTS)), ours_features(model, IMAGES, tokenizer(TEXTS)))
    with pytest.raises(ClipError, match="ResNet"):
        resnet = CLIP(model_config("resnet-tiny", vocab_size=300, context_length=16), eot_id=2)
        export(resnet, tokenizer, "hf", tmp_path / "x")


def test_clip_preprocess_is_openai_s_transform():
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from pipeline.decode import clip_preprocess

    processor = CLIPImageProcessorPil()
    rng = np.random.default_rng(0)
    for w, h in [(640, 480), (224, 224), (100, 57), (1001, 333), (300, 701)]:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        ours = clip_preprocess(buf.getvalue(), 224).float()
        ours = (ours / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
        ref = processor(images=Image.open(buf), return_tensors="pt")["pixel_values"][0]
        if (w, h) == (300, 701):
            # the crop's top row: torchvision (OpenAI, OpenCLIP) rounds (523 - 224) / 2 up to 150, transformers
            # floors it to 149; the resize is the same, so the two crops are one row apart
            assert (ours[:, :-1] - ref[:, 1:]).abs().max().item() < 1e-5
        else:
            assert (ours - ref).abs().max().item() < 1e-5


def test_architecture_names_and_the_laion_calibration_warning(tmp_path, caplog):
    from pipeline.filter import FilterConfig, check_calibration
    from training.pretrained import architecture

    assert architecture(model_config("B/32", vocab_size=49408, activation="quick_gelu"), "openai") == "OpenAI ViT-B/32"
    assert architecture(model_config("B/32", vocab_size=49408), "openai").startswith("ViT CLIP (width 768")
    model, tokenizer = clipline_model()
    export(model, tokenizer, "hf", tmp_path / "hf")
    config = FilterConfig(preset="laion", clip_checkpoint=str(tmp_path / "hf"))
    with caplog.at_level("WARNING"):
        message = check_calibration(config)
    assert message and "min_clip_score 0.28 for OpenAI ViT-B/32" in message and "\n" not in message
    assert message in caplog.text
    explicit = FilterConfig(preset="laion", clip_checkpoint=str(tmp_path / "hf"), min_clip_score=0.2)
    assert check_calibration(explicit) is None  # the user's own threshold: nothing to warn about


def export(model, tokenizer, fmt, out):
    from training.pretrained import export as write

    return write(model, tokenizer, fmt, out)


def test_remote_checkpoint_is_fetched_once_per_node(s3, tmp_path, monkeypatch):
    from pipeline.storage import open_storage
    from tests.conftest import BUCKET
    from training.checkpoint import checkpoint_files, fetch, load_model, resolve_checkpoint

    monkeypatch.setenv("CLIPLINE_CACHE", str(tmp_path / "cache"))
    model, tokenizer = clipline_model("openai")
    export(model, tokenizer, "hf", tmp_path / "hf")
    remote = open_storage(f"s3://{BUCKET}/models-{tmp_path.name}/hf")
    for f in (tmp_path / "hf").iterdir():
        remote.put_file(f, f.name)
    first = fetch(remote.url())
    assert Path(first).parent == tmp_path / "cache" / "checkpoints"
    stamp = (Path(first) / "model.safetensors").stat().st_mtime_ns
    assert fetch(remote.url()) == first and (Path(first) / "model.safetensors").stat().st_mtime_ns == stamp
    assert resolve_checkpoint(remote.url()) == first
    assert {Path(p).name for p in checkpoint_files(remote.url())} >= {"config.json", "model.safetensors"}
    back, _ = load_model(remote.url())
    assert_same(ours_features(back, IMAGES, tokenizer(TEXTS)), ours_features(model, IMAGES, tokenizer(TEXTS)))
    remote.write_bytes("preprocessor_config.json", json.dumps({"image_mean": [0.5] * 3}).encode())
    second = fetch(remote.url())  # a changed object is a new cache entry
    assert second != first and json.loads((Path(second) / "preprocessor_config.json").read_text())["image_mean"]
    with pytest.raises(ClipError, match="no such checkpoint"):
        fetch(f"s3://{BUCKET}/models-{tmp_path.name}/nothing.pt")


def test_cli_export_and_eval_take_public_weights(tmp_path):
    reference = hf_reference(seed=5)
    torch.save(openai_state_dict(reference), tmp_path / "ViT-tiny.pt")
    env_python = [sys.executable, "-m", "pipeline"]
    done = subprocess.run([*env_python, "export", "--checkpoint", str(tmp_path / "ViT-tiny.pt"), "--format", "hf",
                           "--out", str(tmp_path / "hf")], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "export: hf model" in done.stdout
    from transformers import CLIPModel

    hf = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    # the file had 1 head per tower (width / 64); the export says so, and transformers computes the same features
    assert hf.config.vision_config.num_attention_heads == 1
    from training.tokenizer import Tokenizer

    ids = Tokenizer.openai()(TEXTS)
    assert_same(hf_features(hf, IMAGES, ids), hf_features(reference_with_heads(reference, 1, 1), IMAGES, ids))
    bad = subprocess.run([*env_python, "export", "--checkpoint", str(tmp_path / "nope.pt"), "--format", "hf",
                          "--out", str(tmp_path / "x")], capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "no such checkpoint" in bad.stderr
    bad = subprocess.run([*env_python, "train", "--data", str(tmp_path / "m.json"), "--out", str(tmp_path / "run"),
                          "--init-from", str(tmp_path / "nope.pt")], capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
