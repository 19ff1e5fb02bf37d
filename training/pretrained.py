"""Public CLIP weights in and out: OpenAI / OpenCLIP state dicts and Hugging Face `CLIPModel` directories.

clipline's model classes compute what OpenAI's CLIP computes (pre-LN blocks,
class-token pooling, EOT pooling, projections without bias), so public weights
load by renaming tensors, never by running other code. One table per format
says where each tensor goes; the same table runs backwards for export:

- ``openai``: OpenAI's release and OpenCLIP's ``CLIP`` (``visual.conv1``,
  ``visual.transformer.resblocks.N.attn.in_proj_weight``, ``token_embedding``,
  ``text_projection`` as a (width, embed) matrix used as ``x @ proj``...).
  The ViT family only (B/32, B/16, L/14, any size read off the tensors);
  OpenAI's ModifiedResNet (RN50...) is refused in one line.
- ``hf``: transformers' ``CLIPModel`` (``vision_model.encoder.layers.N.self_attn.q_proj``...,
  q/k/v as three matrices where clipline keeps one).

OpenAI's weights need QuickGELU: a TorchScript archive (OpenAI's own files) or
a bare state dict in OpenAI naming is read as QuickGELU unless an
``open_clip_config.json`` beside it says otherwise; a Hugging Face config says
so in ``hidden_act``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.errors import ClipError
from training.model import CLIP, MEAN, STD, ModelConfig


class FormatError(ClipError):
    """Weights that are not a CLIP this module can read or write."""


@dataclass(frozen=True)
class Tensor:
    """A clipline tensor and where it lives in another format: one name or three (q, k, v), maybe transposed."""

    ours: str
    theirs: tuple[str, ...]
    transpose: bool = False


def _blocks(ours: str, theirs: str, layers: int, hf: bool) -> list[Tensor]:
    out = []
    for i in range(layers):
        o, t = f"{ours}.{i}", f"{theirs}.{i}"
        for p in ("weight", "bias"):
            if hf:
                out += [
                    Tensor(f"{o}.ln_1.{p}", (f"{t}.layer_norm1.{p}",)),
                    Tensor(f"{o}.qkv.{p}", tuple(f"{t}.self_attn.{x}_proj.{p}" for x in "qkv")),
                    Tensor(f"{o}.proj.{p}", (f"{t}.self_attn.out_proj.{p}",)),
                    Tensor(f"{o}.ln_2.{p}", (f"{t}.layer_norm2.{p}",)),
                    Tensor(f"{o}.mlp.0.{p}", (f"{t}.mlp.fc1.{p}",)),
                    Tensor(f"{o}.mlp.2.{p}", (f"{t}.mlp.fc2.{p}",)),
                ]
            else:
                out += [
                    Tensor(f"{o}.ln_1.{p}", (f"{t}.ln_1.{p}",)),
                    Tensor(f"{o}.qkv.{p}", (f"{t}.attn.in_proj_{p}",)),
                    Tensor(f"{o}.proj.{p}", (f"{t}.attn.out_proj.{p}",)),
                    Tensor(f"{o}.ln_2.{p}", (f"{t}.ln_2.{p}",)),
                    Tensor(f"{o}.mlp.0.{p}", (f"{t}.mlp.c_fc.{p}",)),
                    Tensor(f"{o}.mlp.2.{p}", (f"{t}.mlp.c_proj.{p}",)),
                ]
    return out


def _norms(pairs: dict[str, str]) -> list[Tensor]:
    return [Tensor(f"{o}.{p}", (f"{t}.{p}",)) for o, t in pairs.items() for p in ("weight", "bias")]


def openai_table(c: ModelConfig) -> list[Tensor]:
    """clipline ↔ OpenAI/OpenCLIP names for a ViT CLIP of config `c`."""
    return [
        Tensor("visual.patch.weight", ("visual.conv1.weight",)),
        Tensor("visual.cls", ("visual.class_embedding",)),
        Tensor("visual.pos", ("visual.positional_embedding",)),
        *_norms({"visual.ln_pre": "visual.ln_pre", "visual.ln_post": "visual.ln_post", "text.ln_final": "ln_final"}),
        *_blocks("visual.transformer.blocks", "visual.transformer.resblocks", c.vision_layers, hf=False),
        Tensor("visual.head.weight", ("visual.proj",), transpose=True),
        Tensor("text.token.weight", ("token_embedding.weight",)),
        Tensor("text.pos", ("positional_embedding",)),
        *_blocks("text.transformer.blocks", "transformer.resblocks", c.text_layers, hf=False),
        Tensor("text.head.weight", ("text_projection",), transpose=True),
        Tensor("logit_scale", ("logit_scale",)),
    ]


def hf_table(c: ModelConfig) -> list[Tensor]:
    """clipline ↔ transformers `CLIPModel` names."""
    v, t = "vision_model", "text_model"
    return [
        Tensor("visual.patch.weight", (f"{v}.embeddings.patch_embedding.weight",)),
        Tensor("visual.cls", (f"{v}.embeddings.class_embedding",)),
        Tensor("visual.pos", (f"{v}.embeddings.position_embedding.weight",)),
        *_norms({"visual.ln_pre": f"{v}.pre_layrnorm", "visual.ln_post": f"{v}.post_layernorm"}),
        *_norms({"text.ln_final": f"{t}.final_layer_norm"}),
        *_blocks("visual.transformer.blocks", f"{v}.encoder.layers", c.vision_layers, hf=True),
        Tensor("visual.head.weight", ("visual_projection.weight",)),
        Tensor("text.token.weight", (f"{t}.embeddings.token_embedding.weight",)),
        Tensor("text.pos", (f"{t}.embeddings.position_embedding.weight",)),
        *_blocks("text.transformer.blocks", f"{t}.encoder.layers", c.text_layers, hf=True),
        Tensor("text.head.weight", ("text_projection.weight",)),
        Tensor("logit_scale", ("logit_scale",)),
    ]


def _import(table: list[Tensor], theirs: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    missing = [k for e in table for k in e.theirs if k not in theirs]
    if missing:
        raise FormatError(f"{name}: {len(missing)} tensor(s) missing for this architecture, e.g. {missing[0]}")
    ours = {}
    for e in table:
        value = torch.cat([theirs[k] for k in e.theirs]) if len(e.theirs) > 1 else theirs[e.theirs[0]]
        ours[e.ours] = (value.t() if e.transpose else value).float().contiguous()
    return ours


def _export(table: list[Tensor], ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    theirs = {}
    for e in table:
        value = ours[e.ours].detach().float().cpu()
        value = value.t() if e.transpose else value
        parts = value.chunk(len(e.theirs)) if len(e.theirs) > 1 else (value,)
        for key, part in zip(e.theirs, parts, strict=True):
            theirs[key] = part.contiguous().clone()
    return theirs


# --- reading ---------------------------------------------------------------------------------------


def _count(state: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def _heads(width: int, head_width: int = 64) -> int:
    return max(1, width // head_width)


def _check_mlp(width: int, hidden: int, name: str) -> None:
    if hidden != 4 * width:
        raise FormatError(f"{name}: MLP width {hidden} is not 4 x {width}; only CLIP's 4x MLP is supported")


def strip_prefixes(state: dict) -> dict:
    """A state dict without DDP's `module.` and torch.compile's `_orig_mod.` prefixes, and without non-tensors."""
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue  # OpenAI's TorchScript state adds input_resolution, context_length, vocab_size
        for prefix in ("module.", "_orig_mod."):
            k = k[len(prefix) :] if k.startswith(prefix) else k
        out[k] = v
    return out


def detect(state: dict) -> str:
    """'openai', 'hf' or 'clipline' naming, from the keys."""
    if "visual.conv1.weight" in state or "visual.layer1.0.conv1.weight" in state:
        return "openai"
    if "vision_model.embeddings.patch_embedding.weight" in state:
        return "hf"
    if "visual.patch.weight" in state or "text.token.weight" in state:
        return "clipline"
    raise FormatError("not a CLIP state dict (no OpenAI, OpenCLIP, Hugging Face or clipline tensor names)")


def from_openai(state: dict, name: str, open_clip_cfg: dict | None = None) -> tuple[ModelConfig, dict, bool]:
    """(config, clipline state dict, siglip) from OpenAI/OpenCLIP-named tensors."""
    if "visual.layer1.0.conv1.weight" in state:
        raise FormatError(f"{name}: a ModifiedResNet (RN50-family) CLIP; clipline loads the ViT family only")
    cfg = open_clip_cfg or {}
    vision_cfg, text_cfg = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name") or vision_cfg.get("timm_model_name"):
        raise FormatError(f"{name}: an OpenCLIP model with a timm or Hugging Face tower; only CLIP's own ViT loads")
    conv = state["visual.conv1.weight"]
    vision_width, patch = conv.shape[0], conv.shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state["ln_final.weight"].shape[0]
    _check_mlp(vision_width, state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0], name)
    _check_mlp(text_width, state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], name)
    head_width = vision_cfg.get("head_width", 64)
    config = ModelConfig(
        image_encoder="vit",
        image_size=grid * patch,
        patch_size=patch,
        vision_width=vision_width,
        vision_layers=_count(state, r"visual\.transformer\.resblocks\.(\d+)\."),
        vision_heads=_heads(vision_width, head_width),
        text_width=text_width,
        text_layers=_count(state, r"transformer\.resblocks\.(\d+)\."),
        text_heads=text_cfg.get("heads", _heads(text_width)),
        context_length=state["positional_embedding"].shape[0],
        vocab_size=state["token_embedding.weight"].shape[0],
        embed_dim=state["text_projection"].shape[1],
        activation="quick_gelu" if cfg.get("quick_gelu", open_clip_cfg is None) else "gelu",
    )
    ours = _import(openai_table(config), state, name)
    siglip = "logit_bias" in state
    if siglip:
        ours["logit_bias"] = state["logit_bias"].float().reshape(())
    ours["logit_scale"] = ours["logit_scale"].reshape(())
    return config, ours, siglip


def from_hf(state: dict, hf_config: dict, name: str, preprocessor: dict | None = None) -> tuple[ModelConfig, dict]:
    """(config, clipline state dict) from a transformers CLIPModel's config.json and tensors."""
    if hf_config.get("model_type") not in ("clip", None):
        raise FormatError(f"{name}: model_type '{hf_config.get('model_type')}' is not 'clip'")
    v, t = hf_config.get("vision_config", {}), hf_config.get("text_config", {})
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
    if len(acts) > 1 or not acts <= {"gelu", "quick_gelu"}:
        raise FormatError(f"{name}: activations {sorted(acts)}; clipline runs gelu or quick_gelu in both towers")
    eps = {v.get("layer_norm_eps", 1e-5), t.get("layer_norm_eps", 1e-5)}
    if len(eps) > 1:
        raise FormatError(f"{name}: the towers use different layer_norm_eps {sorted(eps)}")
    vw, tw = state["vision_model.embeddings.patch_embedding.weight"].shape[0], t.get("hidden_size", 512)
    _check_mlp(vw, v.get("intermediate_size", 4 * vw), name)
    _check_mlp(tw, t.get("intermediate_size", 4 * tw), name)
    pre = preprocessor or {}
    config = ModelConfig(
        image_encoder="vit",
        image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 32),
        vision_width=vw,
        vision_layers=v.get("num_hidden_layers", 12),
        vision_heads=v.get("num_attention_heads", 12),
        text_width=tw,
        text_layers=t.get("num_hidden_layers", 12),
        text_heads=t.get("num_attention_heads", 8),
        context_length=t.get("max_position_embeddings", 77),
        vocab_size=t.get("vocab_size", 49408),
        embed_dim=hf_config.get("projection_dim", 512),
        activation=acts.pop(),
        layer_norm_eps=eps.pop(),
        image_mean=tuple(pre.get("image_mean", MEAN)),
        image_std=tuple(pre.get("image_std", STD)),
    )
    ours = _import(hf_table(config), state, name)
    ours["logit_scale"] = ours["logit_scale"].reshape(())
    return config, ours


# OpenAI's released ViTs: (patch, vision width, vision layers, image size, text width, embed dim) -> name
OPENAI_VITS = {
    (32, 768, 12, 224, 512, 512): "ViT-B/32",
    (16, 768, 12, 224, 512, 512): "ViT-B/16",
    (14, 1024, 24, 224, 768, 768): "ViT-L/14",
    (14, 1024, 24, 336, 768, 768): "ViT-L/14@336px",
}


def architecture(c: ModelConfig, tokenizer_kind: str) -> str:
    """A model's architecture in words: 'OpenAI ViT-B/32' for the shapes and tokenizer of OpenAI's release
    (the weights themselves are not checked: a fine-tuned B/32 is still a B/32)."""
    key = (c.patch_size, c.vision_width, c.vision_layers, c.image_size, c.text_width, c.embed_dim)
    openai = tokenizer_kind == "openai" and c.activation == "quick_gelu" and c.context_length == 77
    if c.image_encoder == "vit" and openai and key in OPENAI_VITS:
        return f"OpenAI {OPENAI_VITS[key]}"
    if c.image_encoder != "vit":
        return f"ResNet CLIP ({c.vision_layers} stages, {c.image_size} px)"
    return f"ViT CLIP (width {c.vision_width}, {c.vision_layers} layers, patch {c.patch_size}, {c.image_size} px)"


# --- writing ---------------------------------------------------------------------------------------


def _exportable(model: CLIP | ModelConfig, fmt: str) -> ModelConfig:
    c = model if isinstance(model, ModelConfig) else model.config
    if c.image_encoder != "vit":
        raise FormatError(f"export {fmt}: clipline's small ResNet has no OpenCLIP or Hugging Face counterpart")
    if fmt == "hf" and getattr(model, "logit_bias", None) is not None:
        raise FormatError("export hf: a SigLIP-loss model has a logit bias that transformers' CLIPModel lacks")
    if fmt == "open_clip" and c.layer_norm_eps != 1e-5:
        raise FormatError(f"export open_clip: layer_norm_eps {c.layer_norm_eps}; OpenCLIP's CLIP uses 1e-5")
    if fmt == "open_clip" and (c.vision_width % c.vision_heads or c.vision_width // c.vision_heads < 1):
        raise FormatError(f"export open_clip: vision width {c.vision_width} is not heads x head width")
    return c


def to_openai(model: CLIP) -> dict[str, torch.Tensor]:
    """The model's tensors under OpenAI/OpenCLIP names (float32, CPU)."""
    state = _export(openai_table(_exportable(model, "open_clip")), model.state_dict())
    if model.logit_bias is not None:
        state["logit_bias"] = model.logit_bias.detach().float().cpu().clone()
    return state


def open_clip_config(c: ModelConfig, logit_bias: float | None = None) -> dict[str, Any]:
    """OpenCLIP's `open_clip_config.json`: model_cfg as in its model_configs/*.json, plus preprocess_cfg."""
    _exportable(c, "open_clip")
    model_cfg: dict[str, Any] = {
        "embed_dim": c.embed_dim,
        "vision_cfg": {
            "image_size": c.image_size,
            "layers": c.vision_layers,
            "width": c.vision_width,
            "patch_size": c.patch_size,
        },
        "text_cfg": {
            "context_length": c.context_length,
            "vocab_size": c.vocab_size,
            "width": c.text_width,
            "heads": c.text_heads,
            "layers": c.text_layers,
        },
    }
    if c.vision_width // c.vision_heads != 64:
        model_cfg["vision_cfg"]["head_width"] = c.vision_width // c.vision_heads
    if c.activation == "quick_gelu":
        model_cfg["quick_gelu"] = True
    if logit_bias is not None:
        model_cfg["init_logit_bias"] = logit_bias
    preprocess = {
        "size": c.image_size,
        "mean": list(c.image_mean),
        "std": list(c.image_std),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def to_hf(model: CLIP, eos_token_id: int) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(tensors, config.json, preprocessor_config.json) of a transformers CLIPModel."""
    c = _exportable(model, "hf")

    def tower(width: int, layers: int, heads: int, kind: str) -> dict[str, Any]:
        return {"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
                "num_attention_heads": heads, "hidden_act": c.activation, "layer_norm_eps": c.layer_norm_eps,
                "projection_dim": c.embed_dim, "model_type": kind}  # fmt: skip

    vision = {
        **tower(c.vision_width, c.vision_layers, c.vision_heads, "clip_vision_model"),
        "image_size": c.image_size,
        "patch_size": c.patch_size,
    }
    text = {
        **tower(c.text_width, c.text_layers, c.text_heads, "clip_text_model"),
        "max_position_embeddings": c.context_length,
        "vocab_size": c.vocab_size,
        "pad_token_id": 0,
        "bos_token_id": eos_token_id - 1 if eos_token_id > 2 else 1,
        "eos_token_id": eos_token_id,
    }
    config = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": c.embed_dim,
        "logit_scale_init_value": float(model.logit_scale.detach()),
        "text_config": text,
        "vision_config": vision,
        "torch_dtype": "float32",
    }
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": c.image_size},
        "resample": 3,  # PIL bicubic
        "do_center_crop": True,
        "crop_size": {"height": c.image_size, "width": c.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(c.image_mean),
        "image_std": list(c.image_std),
        "do_convert_rgb": True,
    }
    return _export(hf_table(c), model.state_dict()), config, preprocessor


def with_eot_last(state: dict[str, torch.Tensor], key: str, eot_id: int) -> dict[str, torch.Tensor]:
    """Swap the embedding rows of <eot> and the last token, so that <eot> has the highest id.

    OpenCLIP pools text at argmax(token id), and transformers does too when eos_token_id is 2:
    both find the end token only when it is the largest id, as it is in OpenAI's vocabulary.
    """
    last = state[key].shape[0] - 1
    if eot_id == last:
        return state
    rows = state[key].clone()
    rows[[eot_id, last]] = rows[[last, eot_id]]
    return {**state, key: rows}


def export(model: CLIP, tokenizer, fmt: str, out_dir) -> list[str]:
    """Write `model` as an OpenCLIP (`open_clip`) or Hugging Face (`hf`) model directory; the files written.

    open_clip: open_clip_config.json + open_clip_model.safetensors, which
    `open_clip.create_model_and_transforms("local-dir:DIR")` reads. hf: config.json, model.safetensors,
    preprocessor_config.json (+ OpenAI's vocab.json/merges.txt for its tokenizer), which
    `transformers.CLIPModel.from_pretrained(DIR)` reads. A model with clipline's own BPE carries its
    tokenizer.json, with <eot> moved to the highest id (see `with_eot_last`).
    """
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    if fmt not in ("open_clip", "hf"):
        raise FormatError(f"export: unknown format '{fmt}' (open_clip or hf)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer.kind != "openai":  # OpenCLIP (and transformers when eos is 2) pool at the highest token id
        last = model.config.vocab_size - 1
        tokenizer = tokenizer.with_ids_swapped(tokenizer.eot_id, last)
        ours = with_eot_last(model.state_dict(), "text.token.weight", model.text.eot_id)
        swapped = CLIP(model.config, eot_id=last, siglip=model.logit_bias is not None)
        swapped.load_state_dict(ours)
        model = swapped
    # OpenAI's vocabulary is what OpenCLIP, transformers (its files below) and clipline assume at 49,408 tokens
    files = {} if tokenizer.kind == "openai" else {"tokenizer.json": tokenizer.to_bytes()}
    if fmt == "open_clip":
        save_file(to_openai(model), str(out / "open_clip_model.safetensors"), metadata={"format": "pt"})
        bias = None if model.logit_bias is None else float(model.logit_bias.detach())
        files["open_clip_config.json"] = json.dumps(open_clip_config(model.config, bias), indent=2).encode()
        written = ["open_clip_model.safetensors"]
    else:
        tensors, config, preprocessor = to_hf(model, tokenizer.eot_id)
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        files["config.json"] = json.dumps(config, indent=2).encode()
        files["preprocessor_config.json"] = json.dumps(preprocessor, indent=2).encode()
        if tokenizer.kind == "openai":
            files.update(tokenizer.hf_files())
        written = ["model.safetensors"]
    for name, data in files.items():
        (out / name).write_bytes(data)
    return sorted(written + list(files))
