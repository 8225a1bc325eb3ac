"""Checkpoint files in and out of clip_core: OpenCLIP state dicts and training checkpoints, OpenAI's releases,
safetensors. Reading never unpickles arbitrary Python objects and never runs code a file carries (OpenAI's
TorchScript archives are parsed as data, not loaded); writing produces files OpenCLIP loads as they are.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

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


# OpenAI released its weights as TorchScript archives. torch.jit.load would run the TorchScript code such an
# archive carries (a module's __setstate__ can create and write files), so they are read here as data, in the
# layout torch.jit.save writes: <root>/data.pkl pickles the module tree as `__torch__.*` objects holding their
# attributes, its tensors point by key at raw storages in <root>/data/<key>, and the class declarations in
# <root>/code/ name which attributes are parameters and buffers. Nothing in <root>/code/ is ever run.
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ATTRIBUTE = re.compile(r"[A-Za-z0-9_]+")  # Sequential and ModuleList name their children "0", "1", ...
_CLASS_LINE = re.compile(r"class (\w+)\((\w*)\):")
_NAME_LIST_LINE = re.compile(r"\s+(__parameters__|__buffers__) = \[(.*)\]")
_QUOTED_NAME = re.compile(r'"(\w+)"')
# A compressed entry is inflated only up to this size (code files are kilobytes, storages are stored as
# they are); stored entries are bounded by the size of the file itself.
_MAX_INFLATED_BYTES = 64 * 2**20
_MAX_INDEX = 2**63  # sizes, strides and offsets are int64 in torch


class _Refusal(Exception):
    """What a TorchScript archive holds that clip_core will not read, as a clause for CheckpointError."""


def _one_line(value: object, limit: int = 120) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_index(value: object) -> bool:
    return type(value) is int and 0 <= value < _MAX_INDEX


class _Record:
    """Base of the inert values the data.pkl unpickler builds; a pickle's BUILD opcode cannot alter one."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise _Refusal("its data.pkl sets state on a tensor, a storage or a callable")


class _StorageType(_Record):
    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Storage(_Record):
    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Builder(_Record):
    """A callable a data.pkl may name, wrapped so that a BUILD opcode cannot set attributes on it."""

    __slots__ = ("build",)

    def __init__(self, build):
        self.build = build

    def __call__(self, *args: object) -> object:
        return self.build(*args)


class _TensorRef(_Record):
    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _ScriptObject:
    """An object of a TorchScript class as data.pkl pickles it: the class's qualified name and the state BUILD
    hands it (a module's attribute dict), with none of the class's code."""

    __slots__ = ("state",)
    qualified_name = ""

    def __new__(cls, *args: object):
        if args:
            raise _Refusal(f"its data.pkl constructs {cls.qualified_name} with arguments")
        return super().__new__(cls)

    def __setstate__(self, state: object) -> None:
        if hasattr(self, "state"):
            raise _Refusal(f"its data.pkl sets the state of a {self.qualified_name} twice")
        self.state = state


@dataclass
class _ClassDeclaration:
    is_module: bool
    parameters: list[str] | None = None
    buffers: list[str] | None = None
    has_setstate: bool = False


def _empty_ordered_dict(*args: object) -> OrderedDict:
    # Tensors' backward hooks, which torch.jit.save writes as an empty OrderedDict.
    if args:
        raise _Refusal("its data.pkl builds an OrderedDict from arguments")
    return OrderedDict()


def _typed_list(*element_types: type):
    def build(items: object) -> list:
        if not isinstance(items, list) or not all(isinstance(item, element_types) for item in items):
            raise _Refusal("its data.pkl builds a typed list of the wrong element type")
        return items

    return build


def _restore_type_tag(value: object, type_tag: object) -> object:
    if not isinstance(value, (list, dict)) or not isinstance(type_tag, str):
        raise _Refusal("its data.pkl tags something that is not a list or a dict with a type")
    return value


def _device(*args: object) -> str:
    if not args or not all(isinstance(arg, (str, int)) for arg in args):
        raise _Refusal("its data.pkl builds a device from something that is not a name or an index")
    return ":".join(map(str, args))


# The only callables a TorchScript data.pkl needs besides the rebuild of tensors and `__torch__` classes.
_PLAIN_GLOBALS = {
    ("collections", "OrderedDict"): _Builder(_empty_ordered_dict),
    ("torch.jit._pickle", "build_intlist"): _Builder(_typed_list(int)),
    ("torch.jit._pickle", "build_doublelist"): _Builder(_typed_list(float)),
    ("torch.jit._pickle", "build_boollist"): _Builder(_typed_list(bool)),
    ("torch.jit._pickle", "build_tensorlist"): _Builder(_typed_list(_TensorRef)),
    ("torch.jit._pickle", "restore_type_tag"): _Builder(_restore_type_tag),
    ("torch", "device"): _Builder(_device),
}


class _DataPickleUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript data.pkl into inert records: tensors, storages of the archive, `__torch__`
    objects and plain containers. Any other global, and so any other callable, is refused."""

    def __init__(self, data: bytes, archive: _TorchScriptArchive):
        super().__init__(io.BytesIO(data))
        self.archive = archive

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _Builder(self.archive.tensor)
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in _PLAIN_GLOBALS:
            return _PLAIN_GLOBALS[module, name]
        parts = [*module.split("."), name]
        if parts[0] == "__torch__" and all(_IDENTIFIER.fullmatch(part) for part in parts):
            return self.archive.script_class(f"{module}.{name}")
        raise _Refusal(
            f"its data.pkl references the global {_one_line(f'{module}.{name}')!r}, which is not a tensor, "
            "a storage or a plain container"
        )

    def persistent_load(self, pid: object) -> _Storage:
        return self.archive.storage(pid)


class _TorchScriptArchive:
    """One TorchScript zip archive, read as data: its module tree's parameters and buffers by their
    state-dict names, checked against the storages the archive holds before any tensor is made."""

    def __init__(self, archive: zipfile.ZipFile, file_size: int):
        self.archive, self.file_size = archive, file_size
        names = archive.namelist()
        if len(set(names)) != len(names):
            raise _Refusal("it holds two entries with the same name")
        roots = sorted({name.split("/", 1)[0] for name in names})
        if len(roots) != 1 or not all("/" in name for name in names):
            raise _Refusal(f"its entries are not all in one root folder ({_one_line(', '.join(roots))})")
        self.root, self.names = roots[0], set(names)
        self.storages: dict[str, _Storage] = {}
        self.classes: dict[str, type[_ScriptObject]] = {}
        self.declarations: dict[str, dict[str, _ClassDeclaration]] = {}
        self.flat_storages: dict[str, torch.Tensor] = {}
        self.byteorder = self.read_byteorder()

    def read(self, name: str) -> bytearray:
        if name not in self.names:
            raise _Refusal(f"it has no {name} entry")
        info = self.archive.getinfo(name)
        stored = info.compress_type == zipfile.ZIP_STORED
        if info.header_offset + info.compress_size > self.file_size or (
            stored and info.file_size > self.file_size
        ):
            raise _Refusal(f"its entry {name} claims more bytes than the file holds")
        if not stored and info.file_size > _MAX_INFLATED_BYTES:
            raise _Refusal(f"its compressed entry {name} inflates to more than {_MAX_INFLATED_BYTES} bytes")
        data, filled = bytearray(info.file_size), 0
        try:
            with self.archive.open(info) as entry:
                while filled < len(data):
                    chunk = entry.read(min(2**20, len(data) - filled))
                    if not chunk:
                        raise EOFError(f"the entry ends after {filled} of its {len(data)} bytes")
                    data[filled : filled + len(chunk)] = chunk
                    filled += len(chunk)
        except Exception as exc:
            raise _Refusal(
                f"its entry {name} cannot be read ({type(exc).__name__}: {_one_line(exc)})"
            ) from exc
        return data

    def read_byteorder(self) -> str:
        name = f"{self.root}/byteorder"
        if name not in self.names:
            return "little"  # what torch assumes for archives written before it recorded the byte order
        byteorder = self.read(name)[:16].decode("ascii", "replace")
        if byteorder not in ("little", "big"):
            raise _Refusal(f"its byteorder entry is {_one_line(byteorder)!r}, neither 'little' nor 'big'")
        return byteorder

    def storage(self, pid: object) -> _Storage:
        """The storage a tensor's persistent id ('storage', storage_type, key, location, numel) names."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refusal(
                f"its data.pkl has a persistent id {_one_line(repr(pid), 60)} that names no storage"
            )
        _, storage_type, key, location, numel = pid
        if not (
            isinstance(storage_type, _StorageType)
            and isinstance(key, str)
            and _ATTRIBUTE.fullmatch(key)
            and isinstance(location, str)
            and _is_index(numel)
        ):
            raise _Refusal(f"its data.pkl has a malformed storage reference {_one_line(repr(pid), 80)}")
        known = self.storages.get(key)
        if known is not None:
            if (known.dtype, known.numel) != (storage_type.dtype, numel):
                raise _Refusal(f"its data.pkl reads storage data/{key} with two different types or sizes")
            return known
        name = f"{self.root}/data/{key}"
        if name not in self.names:
            raise _Refusal(f"its data.pkl refers to storage data/{key}, which the archive does not hold")
        nbytes, held = numel * storage_type.dtype.itemsize, self.archive.getinfo(name).file_size
        if held != nbytes:
            raise _Refusal(
                f"storage data/{key} holds {held} bytes but its data.pkl declares {numel} elements of "
                f"{storage_type.dtype} ({nbytes} bytes)"
            )
        self.storages[key] = _Storage(key, storage_type.dtype, numel)
        return self.storages[key]

    def tensor(
        self,
        storage: object,
        offset: object,
        size: object,
        stride: object,
        requires_grad: object,
        backward_hooks: object,
        metadata: object = None,
    ) -> _TensorRef:
        """torch._utils._rebuild_tensor_v2's arguments, checked: the view must lie inside its storage."""
        if not isinstance(storage, _Storage):
            raise _Refusal("its data.pkl builds a tensor from something that is not a storage of the archive")
        if not (
            isinstance(size, tuple)
            and isinstance(stride, tuple)
            and len(size) == len(stride)
            and all(_is_index(n) for n in (offset, *size, *stride))
        ):
            raise _Refusal(
                f"its data.pkl builds a tensor with a malformed offset {_one_line(repr(offset), 40)}, "
                f"size {_one_line(repr(size), 60)} or stride {_one_line(repr(stride), 60)}"
            )
        if (
            not isinstance(requires_grad, bool)
            or not isinstance(backward_hooks, dict)
            or backward_hooks
            or metadata
        ):
            raise _Refusal("its data.pkl builds a tensor with hooks or metadata")
        # One past the last element the view touches; an empty view touches none.
        end = offset if 0 in size else offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        if end > storage.numel or math.prod(size) > storage.numel:
            raise _Refusal(
                f"its data.pkl has a tensor of size {size}, stride {stride} and offset {offset} that does "
                f"not fit in storage data/{storage.key}, which holds {storage.numel} elements"
            )
        return _TensorRef(storage, offset, size, stride)

    def script_class(self, qualified_name: str) -> type[_ScriptObject]:
        if qualified_name not in self.classes:
            name = qualified_name.rsplit(".", 1)[1]
            self.classes[qualified_name] = type(
                name, (_ScriptObject,), {"__slots__": (), "qualified_name": qualified_name}
            )
        return self.classes[qualified_name]

    def declaration(self, qualified_name: str) -> _ClassDeclaration:
        """What <root>/code/ declares about a class, read as text: whether it is a module, its parameter and
        buffer names, whether it has a __setstate__."""
        module, _, name = qualified_name.rpartition(".")
        path = f"{self.root}/code/{module.replace('.', '/')}.py"
        if path not in self.declarations:
            self.declarations[path] = self.read_declarations(path) if path in self.names else {}
        declaration = self.declarations[path].get(name)
        if declaration is None:
            raise _Refusal(f"its code/ does not declare the class {qualified_name}")
        return declaration

    def read_declarations(self, path: str) -> dict[str, _ClassDeclaration]:
        try:
            text = self.read(path).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Refusal(f"its code file {path} is not UTF-8 text") from exc
        declarations: dict[str, _ClassDeclaration] = {}
        current = None
        for line in text.splitlines():
            line = line.rstrip()
            if match := _CLASS_LINE.fullmatch(line):
                name, base = match.groups()
                if name in declarations:
                    raise _Refusal(f"its code file {path} declares the class {name} twice")
                current = declarations[name] = _ClassDeclaration(is_module=base == "Module")
            elif line and not line[0].isspace():
                current = None  # a top-level function or statement ends the class body
            elif current is not None and (match := _NAME_LIST_LINE.fullmatch(line)):
                kind, listed = match.groups()
                field = "parameters" if kind == "__parameters__" else "buffers"
                items = [item.strip() for item in listed.split(",")]
                if items[-1] == "":
                    items.pop()  # TorchScript prints a trailing comma: ["weight", "bias", ]
                names = [_QUOTED_NAME.fullmatch(item) for item in items]
                if not all(names) or getattr(current, field) is not None:
                    raise _Refusal(f"its code file {path} has a malformed or repeated {kind} line")
                setattr(current, field, [name[1] for name in names])
            elif current is not None and line.lstrip().startswith("def __setstate__("):
                current.has_setstate = True
        return declarations

    def module_contents(self, qualified_name: str, attributes: object) -> tuple[list, list]:
        """A module object's (parameters and buffers) and (child modules), each as (name, value) pairs."""
        declaration = self.declaration(qualified_name)
        if declaration.has_setstate:
            raise _Refusal(
                f"the class {qualified_name} rebuilds its state with a TorchScript __setstate__, code that "
                "only torch.jit.load would run"
            )
        if not isinstance(attributes, dict) or not all(
            isinstance(k, str) and _ATTRIBUTE.fullmatch(k) for k in attributes
        ):
            raise _Refusal(f"its data.pkl gives a {qualified_name} a state that is not a dict of attributes")
        tensor_names = [*(declaration.parameters or []), *(declaration.buffers or [])]
        if len(set(tensor_names)) != len(tensor_names):
            raise _Refusal(f"the class {qualified_name} declares an attribute twice as a parameter or buffer")
        tensors = []
        for name in tensor_names:
            value = attributes.get(name)
            if value is None and name in attributes:
                continue  # an absent optional parameter (a Linear without bias), which state_dict skips too
            if not isinstance(value, _TensorRef):
                raise _Refusal(f"the {qualified_name} attribute {name} is declared a tensor but is not one")
            tensors.append((name, value))
        children = [
            (name, value)
            for name, value in attributes.items()
            if isinstance(value, _ScriptObject) and self.declaration(value.qualified_name).is_module
        ]
        return tensors, children

    def state_dict(self, map_location: str | torch.device) -> dict[str, torch.Tensor]:
        """The archive's parameters and buffers, keyed and ordered as torch.jit.load(...).state_dict() keys
        them: each module's parameters, then its buffers, then its child modules', depth first."""
        data = self.read(f"{self.root}/data.pkl")
        try:
            top = _DataPickleUnpickler(data, self).load()
        except _Refusal:
            raise
        except Exception as exc:
            raise _Refusal(
                f"its data.pkl is not a pickled TorchScript module ({type(exc).__name__}: {_one_line(exc)})"
            ) from exc
        if not isinstance(top, _ScriptObject) or not self.declaration(top.qualified_name).is_module:
            raise _Refusal("its data.pkl does not hold a TorchScript module")
        refs: dict[str, _TensorRef] = {}
        visited: set[int] = set()
        pending = [("", top)]  # a stack, so that each module's subtree is done before its next sibling
        while pending:
            prefix, module = pending.pop()
            if id(module) in visited:
                raise _Refusal(f"its module tree holds the same {module.qualified_name} object twice")
            visited.add(id(module))
            tensors, children = self.module_contents(module.qualified_name, getattr(module, "state", None))
            refs.update((prefix + name, ref) for name, ref in tensors)
            pending.extend((f"{prefix}{name}.", child) for name, child in reversed(children))
        return {name: self.materialise(ref).to(map_location) for name, ref in refs.items()}

    def materialise(self, ref: _TensorRef) -> torch.Tensor:
        storage = ref.storage
        if storage.key not in self.flat_storages:
            data = self.read(f"{self.root}/data/{storage.key}")
            # frombuffer refuses an empty buffer; the tensor keeps the bytearray alive.
            flat = (
                torch.frombuffer(data, dtype=storage.dtype) if data else torch.empty(0, dtype=storage.dtype)
            )
            if self.byteorder != sys.byteorder:
                flat.untyped_storage().byteswap(storage.dtype)
            self.flat_storages[storage.key] = flat
        return self.flat_storages[storage.key].as_strided(ref.size, ref.stride, ref.offset)


def _read_torchscript_weights(
    archive: zipfile.ZipFile, file_size: int, name: str, map_location: str | torch.device
) -> dict[str, torch.Tensor]:
    try:
        return _TorchScriptArchive(archive, file_size).state_dict(map_location)
    except _Refusal as refusal:
        raise CheckpointError(
            f"{name} is refused: {_one_line(refusal, 400)} (clip_core reads TorchScript archives as data and "
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
                f"({type(exc).__name__}: {_one_line(exc)})."
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
