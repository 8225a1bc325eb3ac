"""OpenAI's TorchScript releases read as data. torch.jit.load would run the TorchScript code such an archive
carries (a module's __setstate__ can create and write files), so clip_core never calls it: this module parses
the archive and returns its parameters and buffers, refusing anything else it holds.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass

import torch

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


class ArchiveRefusal(Exception):
    """What a TorchScript archive holds that clip_core will not read, as a clause for CheckpointError."""


def one_line(value: object, limit: int = 120) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_index(value: object) -> bool:
    return type(value) is int and 0 <= value < _MAX_INDEX


class _Record:
    """Base of the inert values the data.pkl unpickler builds; a pickle's BUILD opcode cannot alter one."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise ArchiveRefusal("its data.pkl sets state on a tensor, a storage or a callable")


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
            raise ArchiveRefusal(f"its data.pkl constructs {cls.qualified_name} with arguments")
        return super().__new__(cls)

    def __setstate__(self, state: object) -> None:
        if hasattr(self, "state"):
            raise ArchiveRefusal(f"its data.pkl sets the state of a {self.qualified_name} twice")
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
        raise ArchiveRefusal("its data.pkl builds an OrderedDict from arguments")
    return OrderedDict()


def _typed_list(*element_types: type):
    def build(items: object) -> list:
        if not isinstance(items, list) or not all(isinstance(item, element_types) for item in items):
            raise ArchiveRefusal("its data.pkl builds a typed list of the wrong element type")
        return items

    return build


def _restore_type_tag(value: object, type_tag: object) -> object:
    if not isinstance(value, (list, dict)) or not isinstance(type_tag, str):
        raise ArchiveRefusal("its data.pkl tags something that is not a list or a dict with a type")
    return value


def _device(*args: object) -> str:
    if not args or not all(isinstance(arg, (str, int)) for arg in args):
        raise ArchiveRefusal("its data.pkl builds a device from something that is not a name or an index")
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
        raise ArchiveRefusal(
            f"its data.pkl references the global {one_line(f'{module}.{name}')!r}, which is not a tensor, "
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
            raise ArchiveRefusal("it holds two entries with the same name")
        roots = sorted({name.split("/", 1)[0] for name in names})
        if len(roots) != 1 or not all("/" in name for name in names):
            raise ArchiveRefusal(f"its entries are not all in one root folder ({one_line(', '.join(roots))})")
        self.root, self.names = roots[0], set(names)
        self.storages: dict[str, _Storage] = {}
        self.classes: dict[str, type[_ScriptObject]] = {}
        self.declarations: dict[str, dict[str, _ClassDeclaration]] = {}
        self.flat_storages: dict[str, torch.Tensor] = {}
        self.byteorder = self.read_byteorder()

    def read(self, name: str) -> bytearray:
        if name not in self.names:
            raise ArchiveRefusal(f"it has no {name} entry")
        info = self.archive.getinfo(name)
        stored = info.compress_type == zipfile.ZIP_STORED
        if info.header_offset + info.compress_size > self.file_size or (
            stored and info.file_size > self.file_size
        ):
            raise ArchiveRefusal(f"its entry {name} claims more bytes than the file holds")
        if not stored and info.file_size > _MAX_INFLATED_BYTES:
            raise ArchiveRefusal(
                f"its compressed entry {name} inflates to more than {_MAX_INFLATED_BYTES} bytes"
            )
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
            raise ArchiveRefusal(
                f"its entry {name} cannot be read ({type(exc).__name__}: {one_line(exc)})"
            ) from exc
        return data

    def read_byteorder(self) -> str:
        name = f"{self.root}/byteorder"
        if name not in self.names:
            return "little"  # what torch assumes for archives written before it recorded the byte order
        byteorder = self.read(name)[:16].decode("ascii", "replace")
        if byteorder not in ("little", "big"):
            raise ArchiveRefusal(
                f"its byteorder entry is {one_line(byteorder)!r}, neither 'little' nor 'big'"
            )
        return byteorder

    def storage(self, pid: object) -> _Storage:
        """The storage a tensor's persistent id ('storage', storage_type, key, location, numel) names."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ArchiveRefusal(
                f"its data.pkl has a persistent id {one_line(repr(pid), 60)} that names no storage"
            )
        _, storage_type, key, location, numel = pid
        if not (
            isinstance(storage_type, _StorageType)
            and isinstance(key, str)
            and _ATTRIBUTE.fullmatch(key)
            and isinstance(location, str)
            and _is_index(numel)
        ):
            raise ArchiveRefusal(f"its data.pkl has a malformed storage reference {one_line(repr(pid), 80)}")
        known = self.storages.get(key)
        if known is not None:
            if (known.dtype, known.numel) != (storage_type.dtype, numel):
                raise ArchiveRefusal(
                    f"its data.pkl reads storage data/{key} with two different types or sizes"
                )
            return known
        name = f"{self.root}/data/{key}"
        if name not in self.names:
            raise ArchiveRefusal(
                f"its data.pkl refers to storage data/{key}, which the archive does not hold"
            )
        nbytes, held = numel * storage_type.dtype.itemsize, self.archive.getinfo(name).file_size
        if held != nbytes:
            raise ArchiveRefusal(
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
            raise ArchiveRefusal(
                "its data.pkl builds a tensor from something that is not a storage of the archive"
            )
        if not (
            isinstance(size, tuple)
            and isinstance(stride, tuple)
            and len(size) == len(stride)
            and all(_is_index(n) for n in (offset, *size, *stride))
        ):
            raise ArchiveRefusal(
                f"its data.pkl builds a tensor with a malformed offset {one_line(repr(offset), 40)}, "
                f"size {one_line(repr(size), 60)} or stride {one_line(repr(stride), 60)}"
            )
        if (
            not isinstance(requires_grad, bool)
            or not isinstance(backward_hooks, dict)
            or backward_hooks
            or metadata
        ):
            raise ArchiveRefusal("its data.pkl builds a tensor with hooks or metadata")
        # One past the last element the view touches; an empty view touches none.
        end = offset if 0 in size else offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        if end > storage.numel or math.prod(size) > storage.numel:
            raise ArchiveRefusal(
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
            raise ArchiveRefusal(f"its code/ does not declare the class {qualified_name}")
        return declaration

    def read_declarations(self, path: str) -> dict[str, _ClassDeclaration]:
        try:
            text = self.read(path).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ArchiveRefusal(f"its code file {path} is not UTF-8 text") from exc
        declarations: dict[str, _ClassDeclaration] = {}
        current = None
        for line in text.splitlines():
            line = line.rstrip()
            if match := _CLASS_LINE.fullmatch(line):
                name, base = match.groups()
                if name in declarations:
                    raise ArchiveRefusal(f"its code file {path} declares the class {name} twice")
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
                    raise ArchiveRefusal(f"its code file {path} has a malformed or repeated {kind} line")
                setattr(current, field, [name[1] for name in names])
            elif current is not None and line.lstrip().startswith("def __setstate__("):
                current.has_setstate = True
        return declarations

    def module_contents(self, qualified_name: str, attributes: object) -> tuple[list, list]:
        """A module object's (parameters and buffers) and (child modules), each as (name, value) pairs."""
        declaration = self.declaration(qualified_name)
        if declaration.has_setstate:
            raise ArchiveRefusal(
                f"the class {qualified_name} rebuilds its state with a TorchScript __setstate__, code that "
                "only torch.jit.load would run"
            )
        if not isinstance(attributes, dict) or not all(
            isinstance(k, str) and _ATTRIBUTE.fullmatch(k) for k in attributes
        ):
            raise ArchiveRefusal(
                f"its data.pkl gives a {qualified_name} a state that is not a dict of attributes"
            )
        tensor_names = [*(declaration.parameters or []), *(declaration.buffers or [])]
        if len(set(tensor_names)) != len(tensor_names):
            raise ArchiveRefusal(
                f"the class {qualified_name} declares an attribute twice as a parameter or buffer"
            )
        tensors = []
        for name in tensor_names:
            value = attributes.get(name)
            if value is None and name in attributes:
                continue  # an absent optional parameter (a Linear without bias), which state_dict skips too
            if not isinstance(value, _TensorRef):
                raise ArchiveRefusal(
                    f"the {qualified_name} attribute {name} is declared a tensor but is not one"
                )
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
        except ArchiveRefusal:
            raise
        except Exception as exc:
            raise ArchiveRefusal(
                f"its data.pkl is not a pickled TorchScript module ({type(exc).__name__}: {one_line(exc)})"
            ) from exc
        if not isinstance(top, _ScriptObject) or not self.declaration(top.qualified_name).is_module:
            raise ArchiveRefusal("its data.pkl does not hold a TorchScript module")
        refs: dict[str, _TensorRef] = {}
        visited: set[int] = set()
        pending = [("", top)]  # a stack, so that each module's subtree is done before its next sibling
        while pending:
            prefix, module = pending.pop()
            if id(module) in visited:
                raise ArchiveRefusal(f"its module tree holds the same {module.qualified_name} object twice")
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


def read_weights(
    archive: zipfile.ZipFile, file_size: int, map_location: str | torch.device
) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, under the names torch.jit.load(...).state_dict()
    gives them; raises ArchiveRefusal (a clause saying what was refused) for anything else."""
    return _TorchScriptArchive(archive, file_size).state_dict(map_location)
