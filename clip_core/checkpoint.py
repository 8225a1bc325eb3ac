"""Checkpoint files in and out of clip_core: OpenCLIP state dicts and training checkpoints, OpenAI's releases,
safetensors. Reading never unpickles arbitrary Python objects and never runs code a file carries (OpenAI's
TorchScript archives are parsed as data, not loaded); writing produces files OpenCLIP loads as they are.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from clip_core import torchscript_archive
from clip_core.torchscript_archive import one_line

# Entries OpenAI's released state dicts carry next to the weights; they are hyperparameters, not tensors to load.
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
# Key prefixes added by wrappers: DistributedDataParallel ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
TEXT_TOWER_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")

Source = str | os.PathLike | BinaryIO


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely or does not fit the model."""


def _describe(source: Source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "the given file object"


def _peek(source: Source, n: int = 16) -> bytes:
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return f.read(n)
    start = source.tell()
    head = source.read(n)
    source.seek(start)
    return head


def _read_torchscript_weights(
    archive: zipfile.ZipFile, file_size: int, name: str, map_location: str | torch.device
) -> dict[str, torch.Tensor]:
    try:
        return torchscript_archive.read_weights(archive, file_size, map_location)
    except torchscript_archive.ArchiveRefusal as refusal:
        raise CheckpointError(
            f"{name} is refused: {one_line(refusal, 400)} (clip_core reads TorchScript archives as data and "
            "runs none of their code)."
        ) from refusal


@contextlib.contextmanager
def _zip_archive(source: Source):
    """The source opened as a zip archive, with the size of its file; a file object is put back where it
    was."""
    with contextlib.ExitStack() as stack:
        if isinstance(source, (str, os.PathLike)):
            file = stack.enter_context(open(source, "rb"))
        else:
            file = source
            stack.callback(file.seek, file.tell())
        start = file.tell()
        file_size = file.seek(0, os.SEEK_END)
        file.seek(start)
        try:
            archive = stack.enter_context(zipfile.ZipFile(file))
        except Exception as exc:
            raise CheckpointError(
                f"{_describe(source)} starts like a zip archive but is not one "
                f"({type(exc).__name__}: {one_line(exc)})."
            ) from exc
        yield archive, file_size


def read_checkpoint_file(source: Source, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint file as it is stored (a state dict, or a training checkpoint dict with `epoch`,
    `state_dict`, `optimizer`, ...), choosing the reader from the file's content, not its name.

    Pickled files go through torch.load(weights_only=True), which refuses anything but tensors and plain
    containers. TorchScript archives (OpenAI's released .pt files) are never given to torch.jit.load, which
    would run the TorchScript code they carry: their data.pkl is unpickled by an unpickler that builds only
    tensors over the archive's own storages, `__torch__` objects as inert attribute dicts and plain
    containers, and the module tree's parameters and buffers come back under the names
    torch.jit.load(...).state_dict() gives them. Anything else such a file holds is refused with
    CheckpointError, and so is a file that starts like a zip archive but is not one.
    """
    head = _peek(source)
    if len(head) >= 9 and head[8:9] == b"{" and not head.startswith(b"PK"):
        # safetensors: an 8-byte little-endian header length, then a JSON header.
        from safetensors.torch import load, load_file

        if isinstance(source, (str, os.PathLike)):
            return load_file(source, device=str(map_location))
        return {k: v.to(map_location) for k, v in load(source.read()).items()}
    if head.startswith(b"PK"):
        with _zip_archive(source) as (archive, file_size):
            # A TorchScript archive carries its compiled code and constants; torch.save archives have neither.
            if any(name.endswith("/constants.pkl") for name in archive.namelist()):
                return _read_torchscript_weights(archive, file_size, _describe(source), map_location)
    try:
        checkpoint = torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch wraps the one informative line (the refused global or opcode) in paragraphs of boilerplate.
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in lines if not line.startswith(boilerplate)), type(exc).__name__)
        raise CheckpointError(
            f"{_describe(source)} cannot be read without unpickling arbitrary Python objects, which clip_core "
            f"never does (torch.load with weights_only=True refused it: {reason})."
        ) from exc
    except Exception as exc:
        raise CheckpointError(
            f"{_describe(source)} is not a checkpoint that torch.load can read ({type(exc).__name__}: {exc})."
        ) from exc
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{_describe(source)} holds a {type(checkpoint).__name__}, not a state dict or a checkpoint dict."
        )
    return checkpoint


def to_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint in OpenCLIP's key naming: unwraps a training checkpoint's
    `state_dict`, strips DDP/torch.compile prefixes and drops OpenAI's extra hyperparameter entries."""
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state_dict, dict) or not state_dict:
        raise CheckpointError(
            "the checkpoint has no state dict (expected a dict of tensors or a 'state_dict' key)."
        )
    state_dict = {k: v for k, v in state_dict.items() if k not in OPENAI_EXTRA_KEYS}
    stripped = True
    while stripped and state_dict:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
                stripped = True
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"the state dict has entries that are not tensors: {not_tensors[:5]}.")
    return state_dict


def load_state_dict(source: Source, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return its model weights as a plain OpenCLIP-named state dict."""
    return to_state_dict(read_checkpoint_file(source, map_location))


def _summarise(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _fit_to_model(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    model_state = model.state_dict()
    # OpenCLIP's CustomTextCLIP layout keeps the text tower under "text."; ours keeps it at the top level.
    if "text.token_embedding.weight" in state_dict and "token_embedding.weight" in model_state:
        state_dict = {
            (
                k[len("text.") :]
                if k.startswith("text.") and k[len("text.") :].startswith(TEXT_TOWER_KEYS)
                else k
            ): v
            for k, v in state_dict.items()
        }
    # Buffers the model does not persist (the text causal mask) show up in TorchScript archives' state dicts.
    not_persisted = {name for name, _ in model.named_buffers()} - set(model_state)
    state_dict = {k: v for k, v in state_dict.items() if k not in not_persisted}
    # The logit scale is a scalar in some releases and a 1-element vector in others.
    for key in ("logit_scale", "logit_bias"):
        if key in state_dict and key in model_state and state_dict[key].numel() == model_state[key].numel():
            state_dict[key] = state_dict[key].reshape(model_state[key].shape)
    return state_dict


def check_state_dict_fits(
    state_dict: dict[str, torch.Tensor], model: nn.Module, source: str = "checkpoint"
) -> None:
    """Raise CheckpointError, in one sentence naming missing and unexpected keys and shape mismatches, unless
    the state dict has exactly the model's keys and shapes."""
    model_state = model.state_dict()
    missing = [k for k in model_state if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_state]
    mismatched = [
        f"{k} is {tuple(state_dict[k].shape)} in the checkpoint but {tuple(v.shape)} in the model"
        for k, v in model_state.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_summarise(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_summarise(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({_summarise(mismatched, 2)})")
    raise CheckpointError(
        f"{source} does not fit this model's architecture: {'; '.join(problems)}; build the model from the "
        "config the checkpoint was trained with (infer_model_config reads it from the weights)."
    )


def load_checkpoint(
    model: nn.Module,
    source: Source | dict,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
):
    """Load a checkpoint file (or an already read checkpoint dict) into `model`, in any of the formats
    read_checkpoint_file and to_state_dict understand. With strict=True a mismatch raises CheckpointError."""
    checkpoint = source if isinstance(source, dict) else read_checkpoint_file(source, map_location)
    name = "the checkpoint dict" if isinstance(source, dict) else _describe(source)
    state_dict = _fit_to_model(to_state_dict(checkpoint), model)
    if strict:
        check_state_dict_fits(state_dict, model, name)
    return model.load_state_dict(state_dict, strict=strict)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel / FSDP-style `.module` and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def plain_state_dict(model: nn.Module | dict) -> dict[str, torch.Tensor]:
    """An OpenCLIP-format state dict on the CPU: no wrapper prefixes, contiguous tensors that own their memory."""
    state_dict = unwrap_model(model).state_dict() if isinstance(model, nn.Module) else to_state_dict(model)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}


def save_checkpoint(
    model: nn.Module | dict,
    target: str | os.PathLike | BinaryIO,
    epoch: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    name: str | None = None,
) -> None:
    """Write the model's weights so that `open_clip.create_model(arch, pretrained=path)` loads them.

    Without `epoch` the file is a plain state dict (safetensors when the path ends in .safetensors, else
    torch.save). With `epoch` it is OpenCLIP's training-checkpoint layout: {epoch, name, state_dict,
    optimizer}. Paths are written to a temporary file first and renamed, so a crash never leaves half a file.
    """
    state_dict = plain_state_dict(model)
    is_path = isinstance(target, (str, os.PathLike))
    as_safetensors = is_path and str(target).endswith(".safetensors")
    if as_safetensors and (epoch is not None or optimizer is not None):
        raise ValueError("safetensors files hold weights only; save a training checkpoint to a .pt path.")
    obj: dict = state_dict
    if epoch is not None:
        obj = {"epoch": epoch, "name": name or "clip_core", "state_dict": state_dict}
        if optimizer is not None:
            obj["optimizer"] = optimizer.state_dict()
    if not is_path:
        torch.save(obj, target)
        return
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    if as_safetensors:
        from safetensors.torch import save_file

        save_file(state_dict, partial)
    else:
        torch.save(obj, partial)
    os.replace(partial, target)


def infer_model_config(state_dict: dict[str, torch.Tensor], quick_gelu: bool = False) -> dict:
    """The architecture (OpenCLIP config schema) of a CLIP state dict in OpenAI/OpenCLIP naming.

    Head counts follow OpenAI's 64-dimensional heads. The activation cannot be read from weights: OpenAI's and
    LAION-400M's releases need quick_gelu=True.
    """
    state_dict = to_state_dict(state_dict)

    def count(prefix: str) -> int:
        return len({k[len(prefix) :].split(".")[0] for k in state_dict if k.startswith(prefix)})

    if "visual.proj" in state_dict:
        patch_size = state_dict["visual.conv1.weight"].shape[-1]
        grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision_cfg = {
            "image_size": patch_size * grid,
            "layers": count("visual.transformer.resblocks."),
            "width": state_dict["visual.conv1.weight"].shape[0],
            "patch_size": patch_size,
        }
    elif "visual.attnpool.positional_embedding" in state_dict:
        grid = round((state_dict["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision_cfg = {
            "image_size": grid * 32,
            "layers": [count(f"visual.layer{i}.") for i in range(1, 5)],
            "width": state_dict["visual.layer1.0.conv1.weight"].shape[0],
            "patch_size": None,
        }
    else:
        raise CheckpointError(
            "the state dict has neither a ViT (visual.proj) nor a ModifiedResNet image tower."
        )

    text_width = state_dict["ln_final.weight"].shape[0]
    cfg = {
        "embed_dim": state_dict["text_projection"].shape[1],
        "vision_cfg": vision_cfg,
        "text_cfg": {
            "context_length": state_dict["positional_embedding"].shape[0],
            "vocab_size": state_dict["token_embedding.weight"].shape[0],
            "width": text_width,
            "heads": text_width // 64,
            "layers": count("transformer.resblocks."),
        },
    }
    if quick_gelu:
        cfg["quick_gelu"] = True
    return cfg
