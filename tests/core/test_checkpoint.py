"""Tests for clip_core.checkpoint: every checkpoint layout we read, files OpenCLIP reads back, refusal of
malicious pickles and hostile TorchScript archives, clear errors for the wrong architecture, and architecture
inference from weights."""

import copy
import io
import os
import pickle
import re
import struct
import tracemalloc
import warnings
import zipfile

import open_clip
import pytest
import torch

from clip_core.checkpoint import (
    OPENAI_EXTRA_KEYS,
    CheckpointError,
    infer_model_config,
    load_checkpoint,
    load_state_dict,
    plain_state_dict,
    read_checkpoint_file,
    save_checkpoint,
)
from clip_core.model import CLIP, MODEL_CONFIG_DIR, create_model, get_model_config

torch.set_num_threads(2)
open_clip.add_model_config(MODEL_CONFIG_DIR)

TINY_RN = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 16, "patch_size": None},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}


@pytest.fixture()
def trained():
    """A ViT-Tiny-16 whose weights differ from any fresh init (as after training)."""
    torch.manual_seed(0)
    model = create_model("ViT-Tiny-16").eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    return model


def fresh() -> CLIP:
    torch.manual_seed(123)
    return create_model("ViT-Tiny-16").eval()


def assert_same_weights(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state[key], value.to(state[key].dtype)), key


def test_plain_state_dict_round_trips_through_torch_save(trained, tmp_path):
    save_checkpoint(trained, tmp_path / "model.pt")
    assert not (tmp_path / "model.pt.partial").exists()
    model = fresh()
    load_checkpoint(model, tmp_path / "model.pt")
    assert_same_weights(model, trained.state_dict())
    assert torch.load(tmp_path / "model.pt", weights_only=True).keys() == trained.state_dict().keys()


def test_safetensors_round_trip(trained, tmp_path):
    save_checkpoint(trained, tmp_path / "model.safetensors")
    from safetensors.torch import load_file

    assert load_file(tmp_path / "model.safetensors").keys() == trained.state_dict().keys()
    model = create_model("ViT-Tiny-16", pretrained=tmp_path / "model.safetensors")
    assert_same_weights(model, trained.state_dict())


def test_open_clip_training_checkpoint_with_ddp_prefixes_loads(trained, tmp_path):
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    trained(torch.randn(2, 3, 64, 64), open_clip.tokenize(["a", "b"]))[0].sum().backward()
    optimizer.step()
    # OpenCLIP's trainer saves {epoch, name, state_dict, optimizer} with DDP's "module." prefixes.
    checkpoint = {
        "epoch": 7,
        "name": "tiny-run",
        "state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()},
        "optimizer": optimizer.state_dict(),
    }
    torch.save(checkpoint, tmp_path / "epoch_7.pt")
    model = fresh()
    load_checkpoint(model, tmp_path / "epoch_7.pt")
    assert_same_weights(model, trained.state_dict())
    raw = read_checkpoint_file(tmp_path / "epoch_7.pt")
    assert raw["epoch"] == 7 and raw["optimizer"]["state"]


def test_torch_compile_prefixes_are_stripped_on_save_and_load(trained, tmp_path):
    compiled = torch.compile(trained)  # compiles lazily; nothing runs here
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    torch.save(compiled.state_dict(), tmp_path / "compiled.pt")
    model = fresh()
    load_checkpoint(model, tmp_path / "compiled.pt")
    assert_same_weights(model, trained.state_dict())
    assert plain_state_dict(compiled).keys() == trained.state_dict().keys()


def test_openai_state_dict_with_extra_entries_loads(trained, tmp_path):
    # OpenAI's state dicts hold fp16 weights next to three hyperparameter entries.
    state = {k: v.half() if v.is_floating_point() else v for k, v in trained.state_dict().items()}
    state.update(
        input_resolution=torch.tensor(64), context_length=torch.tensor(77), vocab_size=torch.tensor(49408)
    )
    torch.save(state, tmp_path / "openai.pt")
    model = fresh()
    load_checkpoint(model, tmp_path / "openai.pt")
    assert_same_weights(model, {k: v for k, v in state.items() if k in trained.state_dict()})
    assert model.visual.conv1.weight.dtype == torch.float32


# TorchScript archives: OpenAI's releases. They are read as data; torch.jit.load is called here only as the
# reference on benign files, never by clip_core.


def jit_save(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        torch.jit.save(module, buffer)
    return buffer.getvalue()


def traced_clip(model: torch.nn.Module) -> torch.jit.ScriptModule:
    images, tokens = torch.randn(1, 3, 64, 64), open_clip.tokenize(["a dog"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace_module(model, {"encode_image": (images,), "encode_text": (tokens,)})


def jit_reference(archive: bytes) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(torch.jit.load(io.BytesIO(archive)).state_dict())


def assert_same_tensors(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert list(ours) == list(reference)
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
        layout = (ours[key].stride(), ours[key].storage_offset())
        assert layout == (value.stride(), value.storage_offset()), key


def rewrite_archive(
    archive: bytes, replace: dict[str, bytes | None] | None = None, root: str | None = None
) -> bytes:
    """A copy of a zip archive with entries (named below its root folder) replaced, added or dropped (None),
    and its root folder optionally renamed."""
    replace = dict(replace or {})
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as source, zipfile.ZipFile(out, "w") as target:
        old_root = source.namelist()[0].split("/")[0]
        new_root = root or old_root
        for info in source.infolist():
            name = info.filename[len(old_root) + 1 :]
            data = replace.pop(name) if name in replace else source.read(info)
            if data is not None:
                target.writestr(f"{new_root}/{name}", data)
        for name, data in replace.items():
            if data is not None:
                target.writestr(f"{new_root}/{name}", data)
    return out.getvalue()


# Hand-made data.pkl files, written opcode by opcode (protocol 2) as torch.jit.save writes them.
def op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def op_str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def op_int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def op_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def op_call(callable_: bytes, *args: bytes) -> bytes:
    return callable_ + op_tuple(*args) + b"R"


def op_tensor(key="0", numel=15, offset=0, size=(3, 5), stride=(5, 1), storage="FloatStorage") -> bytes:
    storage_ref = op_tuple(
        op_str("storage"), op_global("torch", storage), op_str(key), op_str("cpu"), op_int(numel)
    )
    hooks = op_call(op_global("collections", "OrderedDict"))
    return op_call(
        op_global("torch._utils", "_rebuild_tensor_v2"),
        storage_ref + b"Q",  # BINPERSID: a reference to the archive's data/<key>
        op_int(offset),
        op_tuple(*map(op_int, size)),
        op_tuple(*map(op_int, stride)),
        b"\x89",  # requires_grad=False
        hooks,
    )


def op_module(attributes: dict[str, bytes], cls: str = "Tiny") -> bytes:
    # GLOBAL, EMPTY_TUPLE, NEWOBJ, then the attribute dict and BUILD: how TorchScript pickles a module object.
    return (
        op_global("__torch__", cls)
        + b")\x81}("
        + b"".join(op_str(k) + v for k, v in attributes.items())
        + b"ub"
    )


TINY_CODE = """class Tiny(Module):
  __parameters__ = ["weight", ]
  __buffers__ = []
  weight : Tensor
  training : bool
class Node(Module):
  __parameters__ = []
  __buffers__ = []
  training : bool
"""
TINY_WEIGHT = torch.arange(15, dtype=torch.float32).reshape(3, 5)


def tiny_module(**attributes: bytes) -> bytes:
    return op_module({"weight": op_tensor(), "training": b"\x88", **attributes})


def handmade_archive(
    top: bytes | None = None,
    storages: dict[str, bytes] | None = None,
    code: str = TINY_CODE,
    byteorder: str = "little",
) -> bytes:
    """A TorchScript archive laid out as torch.jit.save lays it out; by default a Tiny module with a 3x5
    float weight."""
    data_pkl = b"\x80\x02" + (tiny_module() if top is None else top) + b"."
    if storages is None:
        storages = {"0": struct.pack(("<" if byteorder == "little" else ">") + "15f", *range(15))}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("tiny/data.pkl", data_pkl)
        for key, raw in storages.items():
            archive.writestr(f"tiny/data/{key}", raw)
        archive.writestr("tiny/code/__torch__.py", code)
        archive.writestr("tiny/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("tiny/version", "3\n")
        archive.writestr("tiny/byteorder", byteorder)
    return buffer.getvalue()


def assert_refused(archive: bytes, tmp_path, match: str) -> CheckpointError:
    """The archive is refused, in one sentence naming the file, by every way clip_core reads checkpoints."""
    path = tmp_path / "release.pt"
    path.write_bytes(archive)
    with pytest.raises(CheckpointError, match=match) as refused:
        read_checkpoint_file(path)
    message = str(refused.value)
    assert message.startswith(str(path)) and message.endswith(".") and "\n" not in message
    with pytest.raises(CheckpointError, match=match):
        load_state_dict(io.BytesIO(archive))
    with pytest.raises(CheckpointError, match=match):
        create_model("ViT-Tiny-16", pretrained=path)
    return refused.value


def test_traced_clip_archive_reads_bit_identical_with_jit_load_names(trained, tmp_path):
    archive = jit_save(traced_clip(trained))
    (tmp_path / "traced.pt").write_bytes(archive)
    ours = read_checkpoint_file(tmp_path / "traced.pt")
    assert_same_tensors(ours, jit_reference(archive))
    # The traced text tower keeps its causal mask as a buffer; everything else is the model's state dict.
    assert set(ours) - set(trained.state_dict()) == {"attn_mask"}
    for key, value in trained.state_dict().items():
        assert torch.equal(ours[key], value), key
    assert_same_weights(create_model("ViT-Tiny-16", pretrained=tmp_path / "traced.pt"), trained.state_dict())
    model = fresh()
    load_checkpoint(model, io.BytesIO(archive))
    assert_same_weights(model, trained.state_dict())


def test_openai_style_fp16_archive_keeps_its_extra_entries_out_of_the_model(trained, tmp_path):
    # OpenAI's archives hold fp16 weights and three hyperparameters as buffers next to them.
    release = copy.deepcopy(trained)
    del release.context_length, release.vocab_size
    for name, value in {"input_resolution": 64, "context_length": 77, "vocab_size": 49408}.items():
        release.register_buffer(name, torch.tensor(value))
    archive = jit_save(traced_clip(release).half())
    (tmp_path / "ViT-Tiny-16.pt").write_bytes(archive)
    raw = read_checkpoint_file(tmp_path / "ViT-Tiny-16.pt")
    assert_same_tensors(raw, jit_reference(archive))
    assert raw["input_resolution"].item() == 64 and raw["visual.conv1.weight"].dtype == torch.float16
    state = load_state_dict(tmp_path / "ViT-Tiny-16.pt")
    assert not set(OPENAI_EXTRA_KEYS) & set(state)
    model = create_model("ViT-Tiny-16", pretrained=tmp_path / "ViT-Tiny-16.pt")
    assert_same_weights(model, {k: v.half() for k, v in trained.state_dict().items()})
    assert model.visual.conv1.weight.dtype == torch.float32


class ArchiveContents(torch.nn.Module):
    """A scripted module with what a TorchScript archive can hold besides plain weights."""

    sizes: list[int]
    counts: dict[str, int]
    scales: list[float]

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(5, 3, bias=False)  # a None parameter, left out of the state dict
        self.blocks = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
        self.scale = torch.nn.Parameter(torch.tensor(2.5, dtype=torch.float64))
        grid = torch.arange(40, dtype=torch.float32).reshape(8, 5)
        self.register_buffer("rows", grid[2:])  # a view at an offset of a shared storage
        self.register_buffer("columns", grid[:, 1::2])  # a strided view of the same storage
        self.register_buffer("fp16", torch.linspace(-1, 1, 7, dtype=torch.float16))
        self.register_buffer("bf16", torch.linspace(-3, 3, 6, dtype=torch.bfloat16))
        self.register_buffer("ids", torch.tensor([[1, -2], [3, 2**40]]))
        self.register_buffer("flags", torch.tensor([True, False, True]))
        self.register_buffer("empty", torch.zeros(0, 4))
        self.plain = torch.ones(3)  # a tensor attribute, neither parameter nor buffer
        self.sizes, self.counts, self.scales = [1, 2], {"a": 1}, [0.5]
        self.device_name = torch.device("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blocks(self.proj(x)) + self.plain + self.sizes[0] + self.counts["a"] + self.scales[0]
        return y * self.scale + self.rows.sum() + self.columns.sum() + self.fp16.sum() + self.bf16.sum()


def test_scripted_archive_reads_every_dtype_view_and_name_as_jit_load_does():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        archive = jit_save(torch.jit.script(ArchiveContents()))
    ours = read_checkpoint_file(io.BytesIO(archive))
    reference = jit_reference(archive)
    assert_same_tensors(ours, reference)
    assert "plain" not in ours and "proj.bias" not in ours and "blocks.1.bias" in ours
    assert ours["rows"].untyped_storage().data_ptr() == ours["columns"].untyped_storage().data_ptr()


def test_archive_root_folder_name_and_missing_byteorder_entry_do_not_matter(trained):
    archive = jit_save(traced_clip(trained))
    renamed = rewrite_archive(archive, {"byteorder": None}, root="ViT-B-32")
    assert_same_tensors(read_checkpoint_file(io.BytesIO(renamed)), jit_reference(archive))


def test_handmade_archive_reads_as_jit_load_reads_it():
    # The positive control for the hand-made hostile archives below: without the hostile part it is a valid
    # archive that torch.jit.load itself accepts.
    archive = handmade_archive()
    assert_same_tensors(read_checkpoint_file(io.BytesIO(archive)), {"weight": TINY_WEIGHT})
    assert_same_tensors(jit_reference(archive), {"weight": TINY_WEIGHT})


def test_big_endian_archive_is_byteswapped():
    archive = handmade_archive(byteorder="big")
    assert_same_tensors(read_checkpoint_file(io.BytesIO(archive)), {"weight": TINY_WEIGHT})


class FileCreatingSetstate(torch.nn.Module):
    """A module whose TorchScript __setstate__, run by torch.jit.load, creates and writes a file."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.weight = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.path, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.path, self.training = state[0], state[2]
        self.weight = torch.from_file(self.path, True, 2) + state[1]  # used, so TorchScript keeps the call


@pytest.mark.parametrize("where", ["top-level", "inside a CLIP model"])
def test_torchscript_setstate_is_never_run(where, trained, tmp_path):
    created = tmp_path / "created-by-setstate"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hostile = torch.jit.script(FileCreatingSetstate(str(created)))
        if where == "top-level":
            archive = jit_save(hostile)
        else:
            trained.add_module("extra", hostile)
            archive = jit_save(traced_clip(trained))
    with zipfile.ZipFile(io.BytesIO(archive)) as files:
        code = "".join(files.read(n).decode() for n in files.namelist() if n.endswith(".py"))
    assert "def __setstate__" in code and "torch.from_file(" in code  # the payload torch.jit.load would run
    assert_refused(archive, tmp_path, r"__setstate__, code that only torch\.jit\.load would run")
    assert not created.exists()


def payloads(marker) -> dict[str, bytes]:
    """Pickled calls that create `marker` when an unrestricted unpickler loads them."""
    return {
        "os.system": op_call(op_global("os", "system"), op_str(f"touch {marker}")),
        "posix.system": op_call(op_global("posix", "system"), op_str(f"touch {marker}")),
        "builtins.eval": op_call(
            op_global("builtins", "eval"), op_str(f"open({str(marker)!r}, 'w').close()")
        ),
        "__builtin__.exec": op_call(op_global("__builtin__", "exec"), op_str(f"open({str(marker)!r}, 'w')")),
        "torch.from_file": op_call(op_global("torch", "from_file"), op_str(str(marker)), b"\x88", op_int(8)),
        # STACK_GLOBAL (protocol 4) names its global from the stack instead of the opcode.
        "stack-global os.system": op_str("os")
        + op_str("system")
        + b"\x93"
        + op_tuple(op_str(f"touch {marker}"))
        + b"R",
    }


@pytest.mark.parametrize("payload", list(payloads("m")))
@pytest.mark.parametrize("where", ["attribute", "top-level"])
def test_dangerous_globals_in_data_pkl_are_refused_and_never_run(payload, where, tmp_path):
    marker = tmp_path / "payload-ran"
    call = payloads(marker)[payload]
    top = tiny_module(extra=call) if where == "attribute" else call
    assert_refused(
        handmade_archive(top), tmp_path, r"references the global '(os|posix|builtins|__builtin__|torch)\."
    )
    assert not marker.exists()
    # The payload is live: an unrestricted unpickler runs it, which is what the refusal prevents.
    pickle.loads(b"\x80\x02" + call + b".")
    assert marker.exists()


HOSTILE_DATA_PICKLES = {
    "code object": (
        tiny_module(code=op_call(op_global("marshal", "loads"), op_str("c"))),
        "global 'marshal.loads'",
    ),
    "getattr": (
        tiny_module(x=op_call(op_global("builtins", "getattr"), op_str("a"), op_str("b"))),
        "builtins.getattr",
    ),
    "storage type not allowlisted": (
        tiny_module(weight=op_tensor(storage="QInt8Storage")),
        "torch.QInt8Storage",
    ),
    "storage key absent from data/": (
        tiny_module(weight=op_tensor(key="7")),
        "refers to storage data/7, which the archive does not hold",
    ),
    "storage key outside data/": (
        tiny_module(weight=op_tensor(key="../data.pkl")),
        "malformed storage reference",
    ),
    "storage smaller than declared": (tiny_module(weight=op_tensor(numel=16)), "holds 60 bytes but"),
    "size beyond the storage": (tiny_module(weight=op_tensor(size=(3, 6))), "does not fit in storage data/0"),
    "stride beyond the storage": (
        tiny_module(weight=op_tensor(stride=(6, 1))),
        "does not fit in storage data/0",
    ),
    "offset beyond the storage": (tiny_module(weight=op_tensor(offset=1)), "does not fit in storage data/0"),
    "huge offset": (tiny_module(weight=op_tensor(offset=2**31 - 1, size=(1,), stride=(1,))), "does not fit"),
    "more elements than the storage": (
        tiny_module(weight=op_tensor(size=(10**6,), stride=(0,))),
        "does not fit in storage data/0",
    ),
    "negative stride": (tiny_module(weight=op_tensor(stride=(-5, 1))), "malformed offset"),
    "one storage read as two types": (
        tiny_module(other=op_tensor(storage="IntStorage")),
        "reads storage data/0 with two different types",
    ),
    "BUILD on a tensor (Tensor.__setstate__ calls set_)": (
        tiny_module(
            weight=op_tensor()
            + op_tuple(op_tensor(), op_int(0), op_tuple(op_int(99)), op_tuple(op_int(1)))
            + b"b"
        ),
        "sets state on",
    ),
    "tensor from a non-storage": (
        tiny_module(
            weight=op_call(
                op_global("torch._utils", "_rebuild_tensor_v2"),
                op_str("x"),
                op_int(0),
                op_tuple(),
                op_tuple(),
                b"\x89",
                op_call(op_global("collections", "OrderedDict")),
            )
        ),
        "not a storage of the archive",
    ),
    "module constructed with arguments": (
        op_call(op_global("__torch__", "Tiny"), op_str("x")),
        "with arguments",
    ),
    "module state that is not a dict": (
        op_global("__torch__", "Tiny") + b")\x81" + op_tuple(op_tensor()) + b"b",
        "not a dict",
    ),
    "undeclared class": (
        op_module({"training": b"\x88"}, cls="Stranger"),
        "does not declare the class __torch__.Stranger",
    ),
    "declared tensor that is not one": (
        tiny_module(weight=op_str("w")),
        "attribute weight is declared a tensor",
    ),
    "one module object twice": (
        # BINPUT 0 after the child, BINGET 0 to put the same object under a second name.
        tiny_module(child=op_module({"training": b"\x88"}, cls="Node") + b"q\x00", again=b"h\x00"),
        "holds the same __torch__.Node object twice",
    ),
    "module that contains itself": (
        op_global("__torch__", "Node") + b")\x81q\x00}(" + op_str("me") + b"h\x00ub",
        "twice",
    ),
    "not a pickle": (b"\xff\xfe", "data.pkl is not a pickled TorchScript module"),
}


@pytest.mark.parametrize("variant", list(HOSTILE_DATA_PICKLES))
def test_hostile_data_pkl_is_refused(variant, tmp_path):
    top, match = HOSTILE_DATA_PICKLES[variant]
    assert_refused(handmade_archive(top), tmp_path, re.escape(match))


def test_hostile_archive_layouts_are_refused(tmp_path):
    archive = handmade_archive()
    two_roots = io.BytesIO(archive)
    with zipfile.ZipFile(two_roots, "a") as extra:
        extra.writestr("other/data.pkl", b"\x80\x02N.")
    assert_refused(two_roots.getvalue(), tmp_path, r"not all in one root folder \(other, tiny\)")
    assert_refused(rewrite_archive(archive, root="outer/inner"), tmp_path, r"has no outer/data\.pkl entry")
    duplicated = io.BytesIO(archive)
    with warnings.catch_warnings(), zipfile.ZipFile(duplicated, "a") as twice:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        twice.writestr("tiny/data/0", bytes(60))
    assert_refused(duplicated.getvalue(), tmp_path, "two entries with the same name")
    assert_refused(handmade_archive(byteorder="middle"), tmp_path, "byteorder entry is 'middle'")
    assert_refused(
        rewrite_archive(archive, {"code/__torch__.py": None}), tmp_path, "does not declare the class"
    )
    malformed = TINY_CODE.replace('["weight", ]', '["weight", __import__("os")]')
    assert_refused(handmade_archive(code=malformed), tmp_path, "malformed or repeated __parameters__ line")


def test_declared_entry_sizes_beyond_the_file_are_refused_before_allocating(tmp_path):
    # The central directory claims a 1 GiB storage that the pickle agrees with; the file holds 60 bytes.
    archive = bytearray(handmade_archive(tiny_module(weight=op_tensor(numel=2**28, size=(1,), stride=(1,)))))
    central = archive.rindex(b"tiny/data/0") - 46  # the entry's central directory record
    assert archive[central : central + 4] == b"PK\x01\x02"
    struct.pack_into("<II", archive, central + 20, 2**30, 2**30)  # compressed and uncompressed sizes
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="claims more bytes than the file holds"):
            read_checkpoint_file(io.BytesIO(bytes(archive)))
        assert tracemalloc.get_traced_memory()[1] < 2**24
    finally:
        tracemalloc.stop()


def test_code_files_are_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    code = f"import os\nos.system('touch {marker}')\n" + TINY_CODE.replace(
        "  training : bool\n", f"  training : bool\n  __import__('os').system('touch {marker}')\n", 1
    )
    state = read_checkpoint_file(io.BytesIO(handmade_archive(code=code)))
    assert_same_tensors(state, {"weight": TINY_WEIGHT})
    assert not marker.exists()


def half_of_a_torch_save_archive() -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(64)}, buffer)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(lambda: b"PK\x03\x04" + bytes(60), id="local header then zeros"),
        pytest.param(lambda: b"PK, then not a zip archive at all", id="PK then text"),
        pytest.param(half_of_a_torch_save_archive, id="truncated torch.save archive"),
    ],
)
def test_file_that_starts_like_a_zip_but_is_not_one_fails_in_one_sentence(content, tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(content())
    for source in (path, io.BytesIO(content())):
        with pytest.raises(CheckpointError, match="starts like a zip archive but is not one") as broken:
            load_state_dict(source)
        message = str(broken.value)
        assert message.endswith(".") and "\n" not in message
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))} starts like a zip archive"):
        create_model("ViT-Tiny-16", pretrained=path)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"logit_scale": torch.zeros(())}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"never does .*mkdir"):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match="arbitrary Python objects"):
        create_model("ViT-Tiny-16", pretrained=path)
    assert not marker.exists()
    # The payload is live: an unrestricted unpickler runs it, which is what the refusal prevents.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_open_clip_loads_our_saved_files(trained, tmp_path):
    images, tokens = torch.randn(2, 3, 64, 64), open_clip.tokenize(["a photo of a cat.", "a red car"])
    with torch.no_grad():
        expected_image, expected_text = trained.encode_image(images), trained.encode_text(tokens)
    optimizer = torch.optim.AdamW(trained.parameters())
    save_checkpoint(trained, tmp_path / "plain.pt")
    save_checkpoint(trained, tmp_path / "plain.safetensors")
    save_checkpoint(trained, tmp_path / "epoch_3.pt", epoch=3, optimizer=optimizer, name="tiny")
    for file in ("plain.pt", "plain.safetensors", "epoch_3.pt"):
        theirs = open_clip.create_model("ViT-Tiny-16", pretrained=str(tmp_path / file)).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode_image(images), expected_image, rtol=0, atol=1e-5)
            torch.testing.assert_close(theirs.encode_text(tokens), expected_text, rtol=0, atol=1e-5)
    assert read_checkpoint_file(tmp_path / "epoch_3.pt")["epoch"] == 3


def test_save_to_a_file_object_and_read_it_back(trained):
    buffer = io.BytesIO()
    save_checkpoint(trained, buffer)
    buffer.seek(0)
    model = fresh()
    load_checkpoint(model, buffer)
    assert_same_weights(model, trained.state_dict())


def test_safetensors_refuses_training_state(trained, tmp_path):
    with pytest.raises(ValueError, match="weights only"):
        save_checkpoint(trained, tmp_path / "x.safetensors", epoch=1)


def test_wrong_architecture_error_names_keys_and_shapes(trained, tmp_path):
    save_checkpoint(trained, tmp_path / "vit_tiny.pt")
    resnet = create_model(TINY_RN)
    with pytest.raises(CheckpointError) as missing:
        load_checkpoint(resnet, tmp_path / "vit_tiny.pt")
    message = str(missing.value)
    assert "vit_tiny.pt does not fit" in message
    assert "missing keys (visual.conv1.weight" not in message  # the stem conv exists in both towers
    assert (
        "missing keys (visual.bn1.weight" in message and "unexpected keys (visual.class_embedding" in message
    )
    assert (
        "visual.conv1.weight is (128, 3, 16, 16) in the checkpoint but (8, 3, 3, 3) in the model" in message
    )
    assert message.count(".") >= 1 and "\n" not in message

    wider_patch = get_model_config("ViT-Tiny-16")
    wider_patch["vision_cfg"]["patch_size"] = 32
    with pytest.raises(
        CheckpointError, match=r"shape mismatches \(visual\.positional_embedding is \(17, 128\)"
    ):
        load_checkpoint(create_model(wider_patch), tmp_path / "vit_tiny.pt")


def test_non_strict_load_reports_incompatible_keys(trained):
    state = trained.state_dict()
    del state["logit_scale"]
    model = fresh()
    result = load_checkpoint(model, state, strict=False)
    assert result.missing_keys == ["logit_scale"] and result.unexpected_keys == []


def test_custom_text_layout_and_vector_logit_scale_load(trained):
    # OpenCLIP's CustomTextCLIP keeps the text tower under "text."; some releases store logit_scale as [1].
    text_parts = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    state = {(f"text.{k}" if k.startswith(text_parts) else k): v for k, v in trained.state_dict().items()}
    state["logit_scale"] = state["logit_scale"].reshape(1)
    model = fresh()
    load_checkpoint(model, state)
    assert_same_weights(model, trained.state_dict())


@pytest.mark.parametrize("name", ["ViT-Tiny-16", "ViT-B-32", "ViT-L-14", "RN50", "RN101"])
def test_infer_model_config_recovers_the_architecture(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        state = CLIP(**get_model_config(name)).state_dict()
    state["input_resolution"] = torch.tensor(224)  # OpenAI extras are ignored
    assert infer_model_config(state) == get_model_config(name)
    assert infer_model_config(state, quick_gelu=True)["quick_gelu"] is True


def test_inferred_config_builds_a_model_that_loads_the_weights(tmp_path):
    torch.manual_seed(0)
    model = create_model(TINY_RN)
    save_checkpoint(model, tmp_path / "rn.pt")
    state = load_state_dict(tmp_path / "rn.pt")
    assert infer_model_config(state) == TINY_RN
    rebuilt = create_model(infer_model_config(state), pretrained=tmp_path / "rn.pt")
    assert_same_weights(rebuilt, model.state_dict())


def test_non_checkpoint_files_fail_clearly(tmp_path):
    (tmp_path / "notes.pt").write_bytes(b"these are not weights at all")
    with pytest.raises(CheckpointError):
        load_state_dict(tmp_path / "notes.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_state_dict(tmp_path / "list.pt")
