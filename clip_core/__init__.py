"""clip_core: CLIP in plain PyTorch (model, tokenizer, contrastive loss, transforms, zero-shot classifier,
checkpoint format), with no Ray, MLflow or S3 imports so it runs anywhere PyTorch does."""

from .checkpoint import CheckpointError, infer_model_config, load_checkpoint, load_state_dict, save_checkpoint
from .loss import ClipLoss
from .model import CLIP, MODEL_CONFIG_DIR, add_model_config, create_model, get_model_config, list_models
from .tokenizer import ClipTokenizer, tokenize
from .transforms import CLIP_MEAN, CLIP_STD, image_transform
from .zero_shot import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, build_zero_shot_classifier

__all__ = [
    "CLIP",
    "MODEL_CONFIG_DIR",
    "CheckpointError",
    "ClipTokenizer",
    "add_model_config",
    "infer_model_config",
    "load_state_dict",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_CLASSNAMES",
    "OPENAI_IMAGENET_TEMPLATES",
    "ClipLoss",
    "build_zero_shot_classifier",
    "create_model",
    "get_model_config",
    "image_transform",
    "list_models",
    "load_checkpoint",
    "save_checkpoint",
    "tokenize",
]
