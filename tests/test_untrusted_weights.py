"""Weights and checkpoints from elsewhere are read without running anything they carry.

``--pretrained`` files (backbone.load_clip) and the project's checkpoints (util.io.load_checkpoint)
may come from anyone: a file that carries code must be refused or reduced to its tensors, with a
CheckpointError that names the flag and what is expected, and never with PyTorch's advice to
retry with ``weights_only=False``. Each hostile file below really runs its payload when loaded
the unsafe way (checked where that is cheap); the test then checks that the payload left no trace.

    python -m pytest -q tests/test_untrusted_weights.py
"""
from __future__ import annotations

import ast
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch
from torch import nn

import backbone
from errors import CheckpointError
import util.torchscript
from util.io import load_checkpoint

TINY = "GET-tiny"
REPO = Path(__file__).resolve().parents[1]
# Keys of OpenAI's TorchScript CLIPs that are metadata, stored as buffers (0-dim tensors).
OPENAI_METADATA = {"input_resolution": 32, "context_length": 77, "vocab_size": 49408}


@pytest.fixture(scope="module")
def tiny_clip() -> nn.Module:
    torch.manual_seed(0)
    return backbone.load_clip(TINY, pretrained="none")


def quiet(call, *args, **kwargs):
    """torch.jit's functions warn that they are deprecated; here they build and check test
    files only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call(*args, **kwargs)


def assert_same_tensors(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


# ------------------------------------------------------------------ TorchScript, read safely

@pytest.fixture(scope="module")
def openai_like_archive(tiny_clip, tmp_path_factory) -> Path:
    """A scripted fp16 tiny CLIP with OpenAI's metadata buffers: laid out as OpenAI's
    ViT-B-16.pt (HalfStorage tensors, open_clip's key names, input_resolution & co.)."""
    source = backbone.frozen_copy(tiny_clip).half()
    for name, value in OPENAI_METADATA.items():
        source.__dict__.pop(name, None)  # open_clip keeps two of them as plain ints
        source.register_buffer(name, torch.tensor(value))
    path = tmp_path_factory.mktemp("jit") / "ViT-tiny-openai.pt"
    quiet(torch.jit.script, source).save(str(path))
    return path


def test_torchscript_reader_equals_jit_state_dict(tiny_clip, openai_like_archive, tmp_path):
    tokens = backbone.get_tokenizer(TINY)(["a", "b"])
    traced = quiet(torch.jit.trace, tiny_clip, (torch.zeros(2, 3, 32, 32), tokens), False)
    traced.save(str(tmp_path / "traced.pt"))
    for path in (openai_like_archive, tmp_path / "traced.pt"):
        # The reference reader runs the archive's code: fine for files this test just made.
        reference = quiet(torch.jit.load, str(path)).state_dict()
        assert_same_tensors(util.torchscript.read_torchscript_tensors(path), dict(reference))


def test_load_clip_reads_openai_like_torchscript_archive(tiny_clip, openai_like_archive):
    torch.manual_seed(123)  # another random init, which the file must overwrite
    loaded = backbone.load_clip(TINY, pretrained=str(openai_like_archive))
    want = {k: v.half().float() for k, v in tiny_clip.state_dict().items()}
    assert_same_tensors(loaded.state_dict(), want)
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training


class FileWriter(nn.Module):
    """TorchScript whose __setstate__, run by torch.jit.load, creates ``target`` (3 floats)."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.weight = nn.Parameter(torch.zeros(3))

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return self.target, self.weight, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        self.target, self.training = state[0], state[2]
        mapped = torch.from_file(self.target, shared=True, size=3)  # creates the file
        self.weight = state[1] + mapped * 0  # used, so that it is not optimised away

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class Holder(nn.Module):
    """A module with real weights and the payload one level down."""

    def __init__(self, target: str):
        super().__init__()
        self.proj = nn.Linear(3, 3)
        self.payload = FileWriter(target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.payload(self.proj(x))


def payload_archive(path: Path, target: Path, nested: bool) -> Path:
    module = Holder(str(target)) if nested else FileWriter(str(target))
    quiet(torch.jit.script, module).save(str(path))
    return path


def test_torchscript_payload_really_runs_under_jit_load(tmp_path):
    target = tmp_path / "written_by_jit_load"
    archive = payload_archive(tmp_path / "payload.pt", target, nested=False)
    quiet(torch.jit.load, str(archive))
    assert target.exists()  # so the files of the next test are real attacks


@pytest.mark.parametrize("nested", [False, True])
def test_torchscript_setstate_payload_is_not_run(tmp_path, nested):
    target = tmp_path / "written_by_payload"
    archive = payload_archive(tmp_path / "payload.pt", target, nested)
    with pytest.raises(CheckpointError) as err:
        backbone.load_clip(TINY, pretrained=str(archive))
    assert not target.exists()
    message = str(err.value)
    assert message.startswith(f"--pretrained: not reading the CLIP weights in {archive}")
    assert "FileWriter" in message and "__setstate__" in message and "state dict" in message
    # torch.load reads none of it with weights_only=True (and would run it without):
    with pytest.raises(RuntimeError, match="TorchScript"):
        quiet(torch.load, archive, weights_only=True)
    assert not target.exists()


def test_torchscript_archive_with_other_globals_is_refused(openai_like_archive, tmp_path):
    target = tmp_path / "written_by_os_system"

    class System:
        def __reduce__(self):
            return os.system, (f"touch {target}",)

    crafted = tmp_path / "crafted.pt"
    with zipfile.ZipFile(openai_like_archive) as src, zipfile.ZipFile(crafted, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, pickle.dumps(System(), 2) if name.endswith("/data.pkl") else data)
    with pytest.raises(CheckpointError) as err:
        backbone.load_clip(TINY, pretrained=str(crafted))
    assert not target.exists()
    message = str(err.value)
    assert message.startswith("--pretrained: ") and f"{os.system.__module__}.system" in message
    assert "TorchScript ViT-B-16.pt" in message


def test_project_never_calls_jit_load_or_unsafe_torch_load():
    """Source check: no ``torch.jit.load(...)`` / ``jit.load(...)`` call and no call with
    ``weights_only=False`` outside the tests."""
    offenders = []
    for path in REPO.rglob("*.py"):
        parts = path.relative_to(REPO).parts
        if parts[0] in ("tests", ".venv") or parts[0].startswith("."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            unsafe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                         and k.value.value is False for k in node.keywords)
            if func.endswith("jit.load") or unsafe:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {func}")
    assert offenders == []


# ------------------------------------------------------------------ other --pretrained files

@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_numpy_weights_are_refused_naming_the_flag(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    if suffix == ".npy":
        np.save(path, np.zeros(3, dtype=np.float32))
    else:
        np.savez(path, w=np.zeros(3, dtype=np.float32))
    with pytest.raises(CheckpointError) as err:
        backbone.load_clip(TINY, pretrained=str(path))
    message = str(err.value)
    assert message.startswith(f"--pretrained: not reading the CLIP weights in {path}")
    assert suffix in message and "state dict" in message and "'openai'" in message


class WritesOnLoad:
    """Pickled, it calls open(target, 'w') when unpickled: a file that carries code."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


def odd_file(kind: str, path: Path, target: Path) -> None:
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not weights\n")
    elif kind == "code (torch.save)":
        torch.save({"visual.proj": torch.zeros(2), "extra": WritesOnLoad(target)}, path)
    elif kind == "code (pickle)":
        path.write_bytes(pickle.dumps(WritesOnLoad(target), 2))
    elif kind == "bad tensor call":  # torch's safe reader raises TypeError on it, not its own error
        path.write_bytes(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)R.")
    elif kind == "list of tensors":
        torch.save([torch.zeros(2)], path)


@pytest.mark.parametrize("kind", ["random bytes", "empty", "text", "code (torch.save)",
                                  "code (pickle)", "bad tensor call", "list of tensors"])
def test_odd_pretrained_files_give_a_clean_error(tmp_path, kind):
    path, target = tmp_path / "weights.pt", tmp_path / "written_by_file"
    odd_file(kind, path, target)
    with pytest.raises(CheckpointError) as err:
        backbone.load_clip(TINY, pretrained=str(path))
    assert not target.exists()
    message = str(err.value)
    assert message.startswith("--pretrained: ") and str(path) in message
    assert "weights_only" not in message and "state dict" in message


def test_safetensors_and_open_clip_training_checkpoints_load(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    want = tiny_clip.state_dict()
    save_file({k: v.contiguous().clone() for k, v in want.items()}, tmp_path / "w.safetensors")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in want.items()}},
               tmp_path / "epoch_3.pt")
    for name in ("w.safetensors", "epoch_3.pt"):
        torch.manual_seed(123)
        assert_same_tensors(backbone.load_clip(TINY, str(tmp_path / name)).state_dict(), want)


def test_is_local_weights_tells_files_from_tags():
    assert not backbone.is_local_weights("openai", "ViT-B-16")
    assert not backbone.is_local_weights("openai", "ViT-B/16")
    for value in (None, "", "none", "None"):
        assert not backbone.is_local_weights(value, TINY)
    assert backbone.is_local_weights("downloads/ViT-B-16.pt", "ViT-B-16")
    assert backbone.is_local_weights("openai", TINY)  # GET-tiny has no tags: a file name


# ------------------------------------------------------------------ load_checkpoint

def test_load_checkpoint_refuses_code_without_unsafe_advice(tmp_path):
    path, target = tmp_path / "last.pt", tmp_path / "written_by_checkpoint"
    torch.save({"meta": {"dataset": "cub"}, "model": WritesOnLoad(target)}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert not target.exists()
    message = str(err.value)
    assert str(path) in message and "weights_only" not in message
    assert "train.py" in message and "tes.pt" in message and "could run" in message


def test_load_checkpoint_of_a_truncated_file_says_so(tmp_path):
    path = tmp_path / "tes.pt"
    torch.save({"meta": {}, "model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(CheckpointError, match="may be truncated") as err:
        load_checkpoint(path)
    assert "weights_only" not in str(err.value)
