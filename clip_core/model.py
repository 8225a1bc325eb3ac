"""The CLIP dual encoder and its architecture registry: JSON configs in OpenCLIP's schema, built by create_model.
State-dict keys and shapes equal OpenCLIP's CLIP for every config, so weights move between the two with strict=True.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clip_core.checkpoint import load_checkpoint
from clip_core.modified_resnet import ModifiedResNet
from clip_core.transformer import Attention, LayerNorm, QuickGELU, Transformer, VisionTransformer

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
PRECISIONS = ("fp32", "amp", "amp_bf16", "amp_fp16", "bf16", "fp16", "pure_bf16", "pure_fp16")


@dataclass
class VisionCfg:
    """Image tower. `layers` is an int for a ViT and four block counts for a ModifiedResNet."""

    layers: int | list[int] = 12
    width: int = 768
    head_width: int = 64
    mlp_ratio: float = 4.0
    patch_size: int | None = 16
    image_size: int | list[int] = 224
    ls_init_value: float | None = None
    patch_dropout: float = 0.0
    no_ln_pre: bool = False
    pool_type: str = "tok"
    final_ln_after_pool: bool = False


@dataclass
class TextCfg:
    """Text tower: a causal transformer read out at the end-of-text token (the highest id in each row)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    ls_init_value: float | None = None
    no_causal_mask: bool = False


_TOP_LEVEL_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias"}


def _cfg_from_dict(cls, cfg: dict | VisionCfg | TextCfg, where: str):
    if isinstance(cfg, cls):
        return cfg
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(
            f"{where} has keys that clip_core does not implement: {unknown}; supported keys are {sorted(known)}."
        )
    return cls(**cfg)


def _check_model_cfg(cfg: dict, name: str) -> None:
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ValueError(f"model config {name!r} lacks the required keys {missing}.")
    if cfg.get("custom_text"):
        raise ValueError(
            f"model config {name!r} asks for a custom text tower, which clip_core does not implement."
        )
    unknown = sorted(set(cfg) - _TOP_LEVEL_KEYS - {"custom_text"})
    if unknown:
        raise ValueError(f"model config {name!r} has keys that clip_core does not implement: {unknown}.")
    _cfg_from_dict(VisionCfg, cfg["vision_cfg"], f"vision_cfg of {name!r}")
    _cfg_from_dict(TextCfg, cfg["text_cfg"], f"text_cfg of {name!r}")


# ---------------------------------------------------------------------------------------------------------------
# Architecture registry: name -> config dict, filled from the JSON files shipped in model_configs/.

_MODEL_CONFIGS: dict[str, dict] = {}


def _natural_key(name: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name.lower())]


def add_model_config(source: str | Path | dict, name: str | None = None) -> list[str]:
    """Register architectures from a JSON file, a directory of JSON files, or a config dict (then `name` is
    required). A file's name without `.json` is the architecture's name. Returns the names registered.

    Files in a directory that are not CLIP configs (no embed_dim/vision_cfg/text_cfg) are skipped, as OpenCLIP
    does; an explicitly named file or dict must be a valid config.
    """
    if isinstance(source, dict):
        if not name:
            raise ValueError("add_model_config needs a name when given a config dict.")
        _check_model_cfg(source, name)
        _MODEL_CONFIGS[name] = copy.deepcopy(source)
        added = [name]
    else:
        path = Path(source)
        if path.is_dir():
            added = []
            for file in path.glob("*.json"):
                cfg = json.loads(file.read_text())
                if all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
                    _check_model_cfg(cfg, file.stem)
                    _MODEL_CONFIGS[file.stem] = cfg
                    added.append(file.stem)
        elif path.is_file():
            cfg = json.loads(path.read_text())
            _check_model_cfg(cfg, path.stem)
            _MODEL_CONFIGS[name or path.stem] = cfg
            added = [name or path.stem]
        else:
            raise FileNotFoundError(
                f"model config source {str(path)!r} is neither a JSON file nor a directory."
            )
    sorted_items = sorted(_MODEL_CONFIGS.items(), key=lambda item: _natural_key(item[0]))
    _MODEL_CONFIGS.clear()
    _MODEL_CONFIGS.update(sorted_items)
    return sorted(added, key=_natural_key)


def list_models() -> list[str]:
    """Names of the registered architectures, in natural order."""
    return list(_MODEL_CONFIGS)


def get_model_config(name: str) -> dict:
    """A copy of the named architecture's config dict (OpenCLIP schema)."""
    if name not in _MODEL_CONFIGS:
        raise KeyError(f"unknown model {name!r}; registered models are {list_models()}.")
    return copy.deepcopy(_MODEL_CONFIGS[name])


add_model_config(MODEL_CONFIG_DIR)


# ---------------------------------------------------------------------------------------------------------------
# The model.


def _build_vision_tower(embed_dim: int, cfg: VisionCfg, act_layer: type[nn.Module]) -> nn.Module:
    if isinstance(cfg.layers, (list, tuple)):
        if len(cfg.layers) != 4:
            raise ValueError(f"a ModifiedResNet needs four stage depths, got layers={cfg.layers}")
        if not isinstance(cfg.image_size, int):
            raise ValueError(f"a ModifiedResNet needs a square int image_size, got {cfg.image_size}")
        return ModifiedResNet(
            layers=list(cfg.layers),
            output_dim=embed_dim,
            heads=cfg.width * 32 // cfg.head_width,
            image_size=cfg.image_size,
            width=cfg.width,
        )
    if not cfg.patch_size:
        raise ValueError("a vision transformer needs a patch_size")
    return VisionTransformer(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        width=cfg.width,
        layers=cfg.layers,
        heads=cfg.width // cfg.head_width,
        output_dim=embed_dim,
        mlp_ratio=cfg.mlp_ratio,
        ls_init_value=cfg.ls_init_value,
        patch_dropout=cfg.patch_dropout,
        no_ln_pre=cfg.no_ln_pre,
        pool_type=cfg.pool_type,
        final_ln_after_pool=cfg.final_ln_after_pool,
        act_layer=act_layer,
    )


class CLIP(nn.Module):
    """Image tower (`visual`) and text tower, each projected into one embedding space, plus the learned
    temperature. The text tower's parts live at the top level, as in OpenAI's and OpenCLIP's CLIP."""

    def __init__(
        self,
        embed_dim: int,
        vision_cfg: dict | VisionCfg,
        text_cfg: dict | TextCfg,
        quick_gelu: bool = False,
        init_logit_scale: float = math.log(1 / 0.07),
        init_logit_bias: float | None = None,
        output_dict: bool = False,
    ):
        super().__init__()
        vision_cfg = _cfg_from_dict(VisionCfg, vision_cfg, "vision_cfg")
        text_cfg = _cfg_from_dict(TextCfg, text_cfg, "text_cfg")
        self.output_dict = output_dict
        act_layer = QuickGELU if quick_gelu else nn.GELU

        self.visual = _build_vision_tower(embed_dim, vision_cfg, act_layer)

        self.context_length = text_cfg.context_length
        self.vocab_size = text_cfg.vocab_size
        self.text_causal = not text_cfg.no_causal_mask
        # Registration order fixes state-dict key order; this one is OpenCLIP's.
        self.transformer = Transformer(
            text_cfg.width,
            text_cfg.layers,
            text_cfg.heads,
            text_cfg.mlp_ratio,
            text_cfg.ls_init_value,
            act_layer,
        )
        self.token_embedding = nn.Embedding(text_cfg.vocab_size, text_cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(text_cfg.context_length, text_cfg.width))
        self.ln_final = LayerNorm(text_cfg.width)
        self.text_projection = nn.Parameter(torch.empty(text_cfg.width, embed_dim))
        # Attention takes causality from is_causal (so SDPA can pick a fused causal kernel); the additive mask
        # is kept, non-persistent as in OpenCLIP, for code that reads model.attn_mask.
        causal_mask = torch.full((text_cfg.context_length, text_cfg.context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", causal_mask if self.text_causal else None, persistent=False)

        self.logit_scale = nn.Parameter(torch.ones([]) * init_logit_scale)
        self.logit_bias = (
            nn.Parameter(torch.ones([]) * init_logit_bias) if init_logit_bias is not None else None
        )
        self._init_text_parameters()

    def _init_text_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_parameters()
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute transformer blocks in the backward pass instead of storing their activations.
        Applies to the text tower and a ViT image tower; a ModifiedResNet keeps its activations."""
        self.visual.set_grad_checkpointing(enable)
        self.transformer.grad_checkpointing = enable

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(text).to(cast_dtype)
        x = x + self.positional_embedding[: text.shape[1]].to(cast_dtype)
        x = self.transformer(x, is_causal=self.text_causal)
        # Read out at the end-of-text token, which has the highest id; LayerNorm is per token, so normalising
        # only the read-out tokens equals normalising all of them first.
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
        features = self.ln_final(x) @ self.text_projection
        return F.normalize(features, dim=-1) if normalize else features

    def forward(
        self,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        output_dict: bool | None = None,
    ):
        """Normalised image features, normalised text features and exp(logit_scale) (and the logit bias when
        the config has one); either input may be None. A dict with those names when output_dict is set."""
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        logit_scale = self.logit_scale.exp()
        if self.output_dict if output_dict is None else output_dict:
            out = {
                "image_features": image_features,
                "text_features": text_features,
                "logit_scale": logit_scale,
            }
            if self.logit_bias is not None:
                out["logit_bias"] = self.logit_bias
            return out
        if self.logit_bias is not None:
            return image_features, text_features, logit_scale, self.logit_bias
        return image_features, text_features, logit_scale


def convert_weights_to_lp(model: nn.Module, dtype: torch.dtype = torch.float16) -> None:
    """OpenAI's mixed precision: matmul and conv weights in `dtype`; norms, embeddings and the logit scale stay
    fp32 (LayerNorm computes in fp32 anyway). The same tensors as OpenCLIP's precision='bf16'/'fp16'."""
    low_precision = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            low_precision += [module.weight, module.bias]
        elif isinstance(module, Attention):
            low_precision += [module.in_proj_weight, module.in_proj_bias]
        elif isinstance(module, CLIP):
            low_precision.append(module.text_projection)
        elif isinstance(module, VisionTransformer):
            low_precision.append(module.proj)
    for param in low_precision:
        if param is not None:
            param.data = param.data.to(dtype)


def create_model(
    model_name: str | dict,
    pretrained: str | Path | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    grad_checkpointing: bool = False,
    output_dict: bool = False,
    force_quick_gelu: bool = False,
    force_patch_dropout: float | None = None,
) -> CLIP:
    """Build a registered architecture (or a config dict) with random init, optionally load a checkpoint file.

    precision: 'fp32' (also 'amp*': fp32 weights, autocast is the caller's), 'bf16'/'fp16' (OpenAI-style:
    matmul weights low precision, norms fp32), 'pure_bf16'/'pure_fp16' (everything in that dtype).
    pretrained: a path to an OpenCLIP, OpenAI or clip_core checkpoint (.pt/.bin/.safetensors); no downloads.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if isinstance(model_name, dict):
        cfg, name = copy.deepcopy(model_name), "config dict"
        _check_model_cfg(cfg, name)
    else:
        cfg, name = get_model_config(model_name), model_name
    if force_quick_gelu:
        cfg["quick_gelu"] = True
    if force_patch_dropout is not None:
        cfg["vision_cfg"]["patch_dropout"] = force_patch_dropout
    cfg.pop("custom_text", None)

    model = CLIP(**cfg, output_dict=output_dict)
    if pretrained is not None:
        if not Path(pretrained).is_file():
            raise FileNotFoundError(
                f"pretrained={str(pretrained)!r} is not a file; clip_core loads checkpoints from local paths only."
            )
        load_checkpoint(model, pretrained, strict=True)
    model.to(device=device or "cpu")
    if precision in ("bf16", "fp16"):
        convert_weights_to_lp(model, torch.bfloat16 if precision == "bf16" else torch.float16)
    elif precision in ("pure_bf16", "pure_fp16"):
        model.to(dtype=torch.bfloat16 if precision == "pure_bf16" else torch.float16)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model
