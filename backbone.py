"""The frozen CLIP that GET builds on: loading it, the one precision policy, the image encoder
split where training starts, and CLIP's text embeddings of class names.

* ``load_clip`` builds a frozen fp32 open_clip CLIP (ViT-B/16 with OpenAI weights by default,
  or an architecture of ``model_configs/`` such as the demo's ``GET-tiny-digits``); its
  weights are read by ``read_clip_weights``, which never runs code a file carries (no
  ``torch.jit.load``, no ``torch.load`` without ``weights_only``); ``is_local_weights`` tells a
  file from a tag;
* ``clip_autocast`` is the one precision switch: bf16 autocast covers the CLIP encoders only;
  the text mapping, the heads and (in the callers) the losses run in fp32;
* ``visual_trunk`` / ``visual_tail`` / ``visual_project`` split the image encoder at
  ``grad_from_block`` so that the frozen blocks run once, without autograd;
* ``class_text_embeddings``: CLIP's text embedding of "a photo of a {name}" per class.

The models built on it are in model.py.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import zipfile
from collections.abc import Iterable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

import config
from errors import CheckpointError
from util.io import unreadable_reason
from util.torchscript import read_torchscript_tensors
from util.rng import seed_everything

# Non-weight entries of OpenAI's TorchScript checkpoints.
_OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


# --------------------------------------------------------------------------------------------
# CLIP loading
# --------------------------------------------------------------------------------------------

def get_tokenizer(model_name: str = "ViT-B-16") -> open_clip.tokenizer.SimpleTokenizer:
    """open_clip's tokenizer for ``model_name`` (callable: list[str] -> LongTensor [N, 77])."""
    config.register_model_configs()
    return open_clip.get_tokenizer(model_name.replace("/", "-"))


def load_clip(model_name: str = "ViT-B-16", pretrained: str | None = "openai",
              device: str | torch.device = "cpu", cache_dir: str | None = None) -> open_clip.CLIP:
    """A frozen open_clip CLIP in fp32 and eval mode (every parameter has requires_grad=False).

    Args:
        model_name: open_clip architecture, e.g. ``ViT-B-16`` or ``GET-tiny`` (model_configs/).
        pretrained: an open_clip tag (``openai``), a local checkpoint file (an open_clip / OpenAI
            state dict, or OpenAI's TorchScript ``ViT-B-16.pt``), or None / '' for random init
            (also 'none'; seed torch first for a reproducible model).
        device: where the model lives.
        cache_dir: open_clip's download cache (flag ``--clip_cache_dir``).

    QuickGELU (the activation of OpenAI's CLIP) is used unless the pretrained tag says its
    weights were trained without it: local files are taken to hold OpenAI weights, as in GET.
    Weights are read here, never by open_clip (see ``read_clip_weights``): nothing in the file
    is run.
    """
    model_name = model_name.replace("/", "-")
    config.vision_depth(model_name)  # clear error for unknown or non-ViT architectures (registers ours)
    checkpoint, quick_gelu = _resolve_pretrained(model_name, pretrained, cache_dir)
    with _no_random_init_notice(checkpoint is not None):
        clip = open_clip.create_model(model_name, pretrained=None, precision="fp32",
                                      device=device, force_quick_gelu=quick_gelu)
    if checkpoint is not None:
        _load_weights(clip, checkpoint, model_name)
    check_supported_clip(clip)
    clip.requires_grad_(False)
    return clip.eval()


def is_local_weights(pretrained: str | None, model_name: str = "ViT-B-16") -> bool:
    """True when ``--pretrained`` names a file (neither an open_clip tag of ``model_name`` nor
    'none' / ''), i.e. when ``load_clip`` would read a local path.

    A path stored in a checkpoint's config was chosen on the machine that wrote it; callers use
    this to load such a path only when the user names it again.
    """
    if not pretrained or pretrained.lower() == "none":
        return False
    config.register_model_configs()
    return not open_clip.get_pretrained_cfg(model_name.replace("/", "-"), pretrained)


def _resolve_pretrained(model_name: str, pretrained: str | None,
                        cache_dir: str | None) -> tuple[str | None, bool]:
    """(local checkpoint path or None, whether QuickGELU is needed) for ``--pretrained``."""
    if not pretrained or pretrained.lower() == "none":
        return None, True
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if tag_cfg:
        try:
            path = open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
        except (OSError, RuntimeError) as err:
            raise CheckpointError(
                f"could not download the CLIP weights {model_name} / {pretrained!r} ({err}). "
                "Without internet, download them on a connected machine and either pass the file "
                "with --pretrained /path/to/checkpoint (an open_clip state dict or OpenAI's "
                "ViT-B-16.pt), or copy open_clip's cache folder and pass it with --clip_cache_dir "
                "(or set HF_HOME for the Hugging Face cache)") from err
        return path, bool(tag_cfg.get("quick_gelu", False))
    if os.path.isfile(pretrained):
        return pretrained, True
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
    raise FileNotFoundError(
        f"--pretrained {pretrained!r}: no CLIP checkpoint file at {os.path.abspath(pretrained)} "
        f"and not an open_clip tag of {model_name} (tags: {tags}). Pass --pretrained with an "
        "existing checkpoint file, a tag such as 'openai', or 'none' for random init")


@contextlib.contextmanager
def _no_random_init_notice(weights_follow: bool):
    """Hide open_clip's "Model initialized randomly" warning when weights are loaded next."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()  # open_clip logs through the root logger
    if weights_follow:
        root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _load_weights(clip: nn.Module, path: str, model_name: str) -> None:
    """Copy the CLIP weights of ``path`` into ``clip`` (strict key match); any failure is a
    CheckpointError naming --pretrained and what is expected."""
    try:
        state = read_clip_weights(path)
        non_persistent = set(dict(clip.named_buffers())) - set(clip.state_dict())
        skip = set(_OPENAI_METADATA_KEYS) | non_persistent
        clip.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=True)
    except CheckpointError as err:  # a file of a kind that is refused, read or not
        raise CheckpointError(f"--pretrained: not reading the CLIP weights in {path}: {err}. "
                              f"{_EXPECTED_WEIGHTS}") from err
    except Exception as err:  # torch, zipfile, pickle and safetensors raise many types
        raise CheckpointError(
            f"--pretrained: could not read the CLIP weights in {path} ({unreadable_reason(err)}). "
            f"The file may be truncated or damaged, or not a {model_name} checkpoint. "
            f"{_EXPECTED_WEIGHTS}; a file that carries code or other objects is refused, because "
            "loading it could run that code. Download it again or pass another file") from err


_EXPECTED_WEIGHTS = ("Expected an open_clip / OpenAI state dict (.pt, .pth, .bin or .safetensors), "
                     "OpenAI's TorchScript ViT-B-16.pt, or an open_clip tag such as 'openai'")


def read_clip_weights(path: str) -> dict[str, Tensor]:
    """The state dict in a CLIP weights file, read without running anything in it.

    open_clip's own reader is not used: it sends .npy / .npz files to its big_vision (SigLIP)
    converter, and retries ``torch.load`` without ``weights_only`` when the safe load raises
    TypeError, which runs pickled code on torch < 2.6. TorchScript archives (OpenAI's original
    checkpoints) are read by ``util.torchscript.read_torchscript_tensors``, never by ``torch.jit.load``.
    """
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".npy", ".npz"):
        raise CheckpointError(f"it is a {suffix} file (numpy / big_vision weights), which is not "
                              "read")
    if suffix == ".safetensors":
        from safetensors.torch import load_file  # a dependency of open_clip
        return load_file(path, device="cpu")
    if _is_torchscript_archive(path):
        return read_torchscript_tensors(path)
    return _state_dict_of(torch.load(path, map_location="cpu", weights_only=True))


def _state_dict_of(loaded: object) -> dict[str, Tensor]:
    """The state dict in what torch.load returned: itself, or its 'state_dict' entry (open_clip
    training checkpoints), with DataParallel's 'module.' prefix removed."""
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not loaded:
        raise CheckpointError(f"it holds a {type(loaded).__name__}, not a dict of tensors")
    if all(isinstance(k, str) and k.startswith("module.") for k in loaded):
        loaded = {k[len("module."):]: v for k, v in loaded.items()}
    return loaded


def _is_torchscript_archive(path: str) -> bool:
    """True for a TorchScript zip (OpenAI's original checkpoints), which torch.load refuses
    with weights_only=True."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def check_supported_clip(clip: nn.Module) -> None:
    """Raise ValueError unless ``clip`` is an open_clip CLIP whose towers this module can split:
    a ViT with class-token pooling and ln_post before pooling, batch-first transformers."""
    if not isinstance(clip, open_clip.CLIP) or not isinstance(clip.visual, VisionTransformer):
        raise ValueError("GET needs an open_clip CLIP with a ViT image encoder and the standard "
                         f"text tower; got a {type(clip).__name__} with a "
                         f"{type(getattr(clip, 'visual', None)).__name__} image encoder "
                         "(supported: the ViTs of open_clip's CLIP, e.g. ViT-B-16, ViT-L-14; see README)")
    visual = clip.visual
    if (visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool
            or visual.proj is None):
        raise ValueError("GET needs a CLIP ViT with class-token pooling, ln_post before pooling "
                         "and a visual projection (as ViT-B-16)")
    if not (getattr(visual.transformer, "batch_first", False)
            and getattr(clip.transformer, "batch_first", False)):
        raise ValueError("this open_clip version runs its transformers sequence-first; "
                         "upgrade open_clip_torch (>= 3.0)")
    if clip.attn_mask is None or getattr(clip, "text_pool_type", "argmax") != "argmax":
        raise ValueError("GET needs CLIP's causal text transformer read at the end-of-text token")


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with requires_grad=False everywhere, in eval mode."""
    clone = copy.deepcopy(module)
    clone.requires_grad_(False)
    return clone.eval()


def build_clip(args, device: str | torch.device) -> open_clip.CLIP:
    """The frozen CLIP of the flags (--clip_model, --pretrained, --clip_cache_dir, --seed) on
    ``device``."""
    # Seeded first, a randomly initialised CLIP is identical in every process, in a resumed run
    # and in predict.py; pretrained weights are loaded, not drawn.
    seed_everything(args.seed, "clip")
    return load_clip(args.clip_model, args.pretrained, device=device, cache_dir=args.clip_cache_dir)


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------

def clip_autocast(device_type: str, enabled: bool) -> contextlib.AbstractContextManager:
    """The one precision switch (docs/method.md, "Precision and several processes"): bf16 autocast for the CLIP encoders.

    The stage models run CLIP's image and text encoders (the TES included) inside
    ``clip_autocast(device, amp)`` and the text mapping, the heads and their outputs inside
    ``clip_autocast(device, False)``, which is true fp32 even within a caller's autocast
    region; the losses get float32 tensors. Weights stay fp32 either way.

    Args:
        device_type: ``tensor.device.type`` of the inputs (``cuda``, ``cpu``, ...).
        enabled: bf16 autocast on (``--amp``) or explicitly off.

    Returns:
        ``torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled)``; a no-op context
        where torch has no autocast (the meta device), which ``enabled=True`` refuses.
    """
    if not torch.amp.is_autocast_available(device_type):
        if enabled:
            raise ValueError(f"bf16 autocast is not available on device {device_type!r}")
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled)


# --------------------------------------------------------------------------------------------
# Image encoder split at grad_from_block
# --------------------------------------------------------------------------------------------

def visual_trunk(visual: VisionTransformer, images: Tensor, grad_from_block: int) -> Tensor:
    """Stem and the first ``grad_from_block`` blocks of a CLIP ViT.

    Args:
        visual: ``clip.visual``.
        images: [B, 3, H, W] float.
        grad_from_block: g in [0, depth]; g = 0 runs the stem only.

    Returns:
        tokens [B, 1 + H*W/patch^2, width]: class token first (fewer if patch dropout is on).
    """
    x = visual.conv1(images)                                  # [B, width, H/p, W/p]
    x = x.flatten(2).transpose(1, 2)                          # [B, L-1, width]
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(visual.patch_dropout(x))
    for block in visual.transformer.resblocks[:grad_from_block]:
        x = block(x)
    return x


def visual_tail(blocks: Iterable[nn.Module], ln_post: nn.Module, tokens: Tensor) -> Tensor:
    """Remaining blocks, then ln_post and class-token pooling as open_clip does for ViT-B-16.

    Args:
        blocks: the blocks after the trunk (``visual.transformer.resblocks[g:]`` or a copy).
        ln_post: ``visual.ln_post``.
        tokens: [B, L, width] from ``visual_trunk``.

    Returns:
        CLS feature [B, width] (before the visual projection).
    """
    x = tokens
    for block in blocks:
        x = block(x)
    return ln_post(x)[:, 0]


def visual_project(visual: VisionTransformer, features: Tensor) -> Tensor:
    """CLIP's visual projection: [B, width] -> [B, embed_dim]."""
    return features @ visual.proj


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

def text_project(clip: open_clip.CLIP, x: Tensor) -> Tensor:
    """CLIP's text projection [B, text_width] -> [B, embed_dim] (a Parameter or a Linear)."""
    if isinstance(clip.text_projection, nn.Linear):
        return clip.text_projection(x)
    return x @ clip.text_projection


@torch.no_grad()
def class_text_embeddings(clip_model: open_clip.CLIP, tokenizer,
                          class_names: Sequence[str], template: str = "a photo of a {}",
                          batch_size: int = 256) -> Tensor:
    """L2-normalised CLIP text embeddings of ``template.format(name)``: float32 [K, embed_dim],
    on CLIP's device, in the order of ``class_names``."""
    if "{}" not in template:
        raise ValueError(f"the prompt template needs a '{{}}' for the class name; got {template!r}")
    if not class_names:
        raise ValueError("class_names is empty")
    device = device_of(clip_model)
    prompts = [template.format(name) for name in class_names]
    chunks = [clip_model.encode_text(tokenizer(prompts[i:i + batch_size]).to(device)).float()
              for i in range(0, len(prompts), batch_size)]
    return F.normalize(torch.cat(chunks), dim=-1)
