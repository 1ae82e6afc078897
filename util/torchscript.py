"""The tensors of a TorchScript archive (OpenAI's original CLIP checkpoints), read without
running it.

``torch.jit.load`` runs an archive's code while it loads (a crafted ``__setstate__`` can write
files), and ``torch.load(weights_only=True)`` refuses such archives. Yet the weights need none of
that code: an archive is a zip with ``<name>/data.pkl``, a pickle of the module tree whose
objects are ``__torch__.*`` classes (the archive's own code) and whose tensors are
``torch._utils._rebuild_tensor_v2`` calls on storages, one zip entry each under the archive's
top folder (``data/<key>``).
Unpickling it with the classes replaced by inert stand-ins gives every tensor, and nothing runs.
"""
from __future__ import annotations

import collections
import io
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from errors import CheckpointError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stand-in for an object of a ``__torch__`` class: it records the state the pickle gives
    it (a module's dict of attributes) and has no other behaviour."""
    qualified_name = "__torch__"

    def __init__(self, *args: Any) -> None:  # arguments of NEWOBJ / REDUCE are ignored
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _is_int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) for v in value)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *unused: Any) -> Tensor:
    """``_rebuild_tensor_v2`` on a storage of ``persistent_load``; requires_grad, hooks and
    metadata are dropped (frozen weights need none of them)."""
    if not (isinstance(storage, Tensor) and isinstance(offset, int) and _is_int_tuple(size)
            and _is_int_tuple(stride)):
        raise pickle.UnpicklingError("a tensor record of the archive is malformed")
    return storage.as_strided(size, stride, offset)  # refuses views outside the storage


def _rebuild_parameter(data: Any, *unused: Any) -> Any:
    return data


def _same_list(data: Any) -> Any:
    """TorchScript's typed-list markers (``build_intlist`` ...): the list itself."""
    return data


def _restore_type_tag(value: Any, type_str: Any) -> Any:
    return value


# The only globals a TorchScript data.pkl of weights needs, each mapped to code of this module
# (none of torch's own loader functions is called).
_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "build_intlist"): _same_list,
    ("torch.jit._pickle", "build_doublelist"): _same_list,
    ("torch.jit._pickle", "build_boollist"): _same_list,
    ("torch.jit._pickle", "build_tensorlist"): _same_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
}


class _RefusedGlobal(pickle.UnpicklingError):
    """data.pkl names a global that is neither a tensor part nor a ``__torch__`` class."""


class _WeightsUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript data.pkl into ``_ScriptObject`` trees of tensors."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, folder: str) -> None:
        super().__init__(io.BytesIO(data))
        self._archive, self._folder = archive, folder
        self._classes: dict[str, type] = {}
        self._storages: dict[str, Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self._classes:
                self._classes[qualified] = type(name, (_ScriptObject,), {"qualified_name": qualified})
            return self._classes[qualified]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[module, name]
        raise _RefusedGlobal(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Tensor:
        """('storage', dtype, key, location, numel) -> a flat tensor of ``data/<key>``."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype) and isinstance(pid[2], str)
                and isinstance(pid[4], int)):
            raise pickle.UnpicklingError("a storage record of the archive is malformed")
        _, dtype, key, _location, numel = pid
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, dtype, numel)
        return self._storages[key]

    def _read_storage(self, key: str, dtype: torch.dtype, numel: int) -> Tensor:
        data = bytearray(self._archive.read(f"{self._folder}data/{key}"))
        size = numel * dtype.itemsize
        if len(data) < size:
            raise pickle.UnpicklingError(f"storage {key} holds {len(data)} bytes, not {size}: "
                                         "the archive may be truncated")
        if size == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype, count=numel)


def _collect_tensors(obj: _ScriptObject, prefix: str, out: dict[str, Tensor],
                     ancestors: frozenset[int]) -> None:
    """Every tensor attribute of ``obj`` and of the objects below it, under dotted names."""
    if not isinstance(obj.state, dict):
        raise CheckpointError(
            f"its {obj.qualified_name} keeps its state in a format of its own (a TorchScript "
            "__setstate__), which only running the archive's code could read")
    ancestors = ancestors | {id(obj)}  # a crafted pickle can make an object its own child
    for name, value in obj.state.items():
        if not isinstance(name, str):
            continue
        if isinstance(value, Tensor):
            out[prefix + name] = value.detach()  # a plain tensor: no hooks, no attributes
        elif isinstance(value, _ScriptObject) and id(value) not in ancestors:
            _collect_tensors(value, f"{prefix}{name}.", out, ancestors)


def _data_pickle_name(archive: zipfile.ZipFile) -> str:
    names = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(names) != 1:
        raise CheckpointError(f"it has no single <name>/data.pkl (found {names})")
    return names[0]


def read_torchscript_tensors(path: str | Path) -> dict[str, Tensor]:
    """The parameters and buffers of a TorchScript module archive under their dotted names (as
    ``torch.jit.load(path).state_dict()``), read without running anything in the archive.

    Raises CheckpointError, whose message says what was found (the caller names the file and
    the flag), when data.pkl refers to anything but tensors, storages, ``__torch__`` classes of
    plain state, lists and dicts, or when the archive's byte order is not this machine's;
    zipfile and pickle errors of damaged files pass through.
    """
    with zipfile.ZipFile(path) as archive:
        name = _data_pickle_name(archive)
        folder = name[:-len("data.pkl")]
        order_name = folder + "byteorder"  # absent in archives older than the record
        order = (archive.read(order_name).decode().strip()
                 if order_name in archive.namelist() else "little")
        if order != sys.byteorder:
            raise CheckpointError(f"it stores {order}-endian tensors; this machine is "
                                  f"{sys.byteorder}-endian")
        try:
            root = _WeightsUnpickler(archive.read(name), archive, folder).load()
        except _RefusedGlobal as err:
            raise CheckpointError(
                f"its data.pkl refers to {err}, which is neither a tensor nor a TorchScript "
                "module (nothing in the archive is run; only its tensors are read)") from err
    if not isinstance(root, _ScriptObject):
        raise CheckpointError(f"its data.pkl holds a {type(root).__name__}, not a TorchScript "
                              "module")
    tensors: dict[str, Tensor] = {}
    _collect_tensors(root, "", tensors, frozenset())
    return tensors
