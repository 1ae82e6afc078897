"""CLIP backbone, Text Embedding Synthesizer (TES), DINO head and the two GET stage models.

Everything GET needs from CLIP lives here (GET_SPEC.md §2-§4):

* ``load_clip`` builds a frozen fp32 open_clip CLIP (ViT-B/16 with OpenAI weights by default,
  or the random-init ``GET-tiny`` architecture used by the tests and the demo, registered with
  open_clip when this module is imported);
* ``clip_autocast`` is the one precision switch: bf16 autocast covers the CLIP encoders only;
  the text mapping, the heads and (in the callers) the losses run in fp32;
* ``visual_trunk`` / ``visual_tail`` / ``visual_project`` split the image encoder at
  ``grad_from_block`` so that the frozen blocks run once, without autograd;
* ``TextEmbeddingSynthesizer`` turns a CLIP image embedding into 7 pseudo words and encodes them
  with CLIP's own frozen text transformer (stage 1 trains its projector);
* ``DINOHead`` is the SimGCD head (MLP projection + cosine classifier with a fixed norm),
  ``HeadConfig`` its layout in ``GETModel``;
* ``TESStage`` (stage 1) and ``GETModel`` (stage 2) assemble them; each has one
  ``set_trainable`` that decides what trains and a ``parameter_summary`` for the log. Their
  outputs are float32.

The reference's slower computation (three CLIP copies, two image-encoder passes per step) is
not here: ``bench/reference.py`` keeps it as the baseline of the benchmarks and of the
equivalence tests. Used by ``train.py``, e.g.::

    python train.py --dataset_name cub --stage all                     # ViT-B-16, OpenAI weights
    python train.py --dataset_name digits --clip_model GET-tiny --pretrained none   # CPU demo
"""
from __future__ import annotations

import contextlib
import copy
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from util.checkpoint import CheckpointError
from util.rng import seed_everything

TINY_MODEL_NAME = "GET-tiny"
_MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

# open_clip's tokenizer pads with id 0; the TES pads a shortened pseudo text with its embedding.
PAD_TOKEN_ID = 0
# The reference fuses the two heads as the mean of softmax(raw logits): temperature 1, although
# the losses use logits / 0.1. ``predict`` keeps that default and lets the caller choose.
FUSE_TEMPERATURE = 1.0
# Non-weight entries of OpenAI's TorchScript checkpoints.
_OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


# --------------------------------------------------------------------------------------------
# CLIP loading
# --------------------------------------------------------------------------------------------

def _register_tiny_clip() -> None:
    """Register the configs of ``model_configs/`` with open_clip; idempotent.

    Called once, when this module is imported. ``GET-tiny``: a 4-block ViT (32x32 images,
    patch 8, width 64) and a 2-block text transformer with the real CLIP vocabulary and
    tokenizer, embedding size 32; no pretrained weights (its random init follows the global
    torch RNG, so seed torch before ``load_clip`` for identical models). ``GET-tiny-digits``:
    the same ViT with a narrower text tower (width 32, 16 tokens), the architecture of the
    demo's pretrained weights ``weights/GET-tiny-digits.pt`` (scripts/pretrain_tiny_clip.py).
    """
    if TINY_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(_MODEL_CONFIG_DIR)


_register_tiny_clip()


def _vision_config(model_name: str) -> dict:
    cfg = open_clip.get_model_config(model_name.replace("/", "-"))
    if cfg is None:
        raise ValueError(f"unknown CLIP architecture {model_name!r} (flag --clip_model); "
                         f"known ones include ViT-B-16 and {TINY_MODEL_NAME}")
    return cfg["vision_cfg"]


def vision_image_size(model_name: str) -> int:
    """Input resolution (pixels per side) of an open_clip architecture, read from its config."""
    size = _vision_config(model_name)["image_size"]
    return size[0] if isinstance(size, (tuple, list)) else size


def vision_depth(model_name: str) -> int:
    """Number of transformer blocks of the image encoder of an open_clip ViT architecture.

    Raises ValueError for an unknown name or a non-ViT image encoder.
    """
    cfg = {"vision_cfg": _vision_config(model_name)}
    layers = cfg["vision_cfg"].get("layers")
    if not isinstance(layers, int) or "timm_model_name" in cfg["vision_cfg"]:
        raise ValueError(f"--clip_model {model_name!r} does not have a plain ViT image encoder; "
                         "GET needs one (e.g. ViT-B-16)")
    return layers


def get_tokenizer(model_name: str = "ViT-B-16") -> open_clip.tokenizer.SimpleTokenizer:
    """open_clip's tokenizer for ``model_name`` (callable: list[str] -> LongTensor [N, 77])."""
    return open_clip.get_tokenizer(model_name.replace("/", "-"))


def load_clip(model_name: str = "ViT-B-16", pretrained: str | None = "openai",
              device: str | torch.device = "cpu", cache_dir: str | None = None) -> open_clip.CLIP:
    """A frozen open_clip CLIP in fp32 and eval mode (every parameter has requires_grad=False).

    Args:
        model_name: open_clip architecture, e.g. ``ViT-B-16`` or ``GET-tiny``.
        pretrained: an open_clip tag (``openai``), a local checkpoint file (an open_clip / OpenAI
            state dict, or OpenAI's TorchScript ``ViT-B-16.pt``), or None / '' for random init
            (also 'none'; seed torch first for a reproducible model).
        device: where the model lives.
        cache_dir: open_clip's download cache (flag ``--clip_cache_dir``).

    QuickGELU (the activation of OpenAI's CLIP) is used unless the pretrained tag says its
    weights were trained without it: local files are taken to hold OpenAI weights, as in GET.
    """
    model_name = model_name.replace("/", "-")
    vision_depth(model_name)  # clear error for unknown or non-ViT architectures
    checkpoint, quick_gelu = _resolve_pretrained(model_name, pretrained, cache_dir)
    try:
        jit_archive = checkpoint is not None and _is_torchscript_archive(checkpoint)
        clip = open_clip.create_model(model_name, pretrained=None if jit_archive else checkpoint,
                                      precision="fp32", device=device, force_quick_gelu=quick_gelu)
        if jit_archive:
            _load_torchscript_weights(clip, checkpoint)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"--pretrained: could not read the CLIP weights in {checkpoint} ({type(err).__name__}: "
            f"{err}). The file may be truncated or not a {model_name} checkpoint; download it "
            "again or pass another file") from err
    check_supported_clip(clip)
    clip.requires_grad_(False)
    return clip.eval()


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


def _is_torchscript_archive(path: str) -> bool:
    """True for a TorchScript zip (OpenAI's original checkpoints), which torch.load refuses
    with weights_only=True."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def _load_torchscript_weights(clip: nn.Module, path: str) -> None:
    """Copy the weights of a TorchScript CLIP archive into ``clip`` (strict key match)."""
    with warnings.catch_warnings():
        # torch.jit.load is deprecated, but it is the only reader of these archives.
        warnings.simplefilter("ignore", FutureWarning)
        state = torch.jit.load(path, map_location="cpu").state_dict()
    non_persistent = set(dict(clip.named_buffers())) - set(clip.state_dict())
    skip = set(_OPENAI_METADATA_KEYS) | non_persistent
    clip.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=True)


def check_supported_clip(clip: nn.Module) -> None:
    """Raise ValueError unless ``clip`` is an open_clip CLIP whose towers this module can split:
    a ViT with class-token pooling and ln_post before pooling, batch-first transformers."""
    if not isinstance(clip, open_clip.CLIP) or not isinstance(clip.visual, VisionTransformer):
        raise ValueError("GET needs an open_clip CLIP with a ViT image encoder and the standard "
                         f"text tower; got {type(clip).__name__} "
                         "(choose e.g. --clip_model ViT-B-16)")
    visual = clip.visual
    if (visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool
            or visual.proj is None):
        raise ValueError("GET needs a CLIP ViT with class-token pooling, ln_post before pooling "
                         "and a visual projection (as ViT-B-16)")
    if not (getattr(visual.transformer, "batch_first", False)
            and getattr(clip.transformer, "batch_first", False)):
        raise ValueError("this open_clip version runs its transformers sequence-first; "
                         "upgrade open_clip_torch (>= 3.0)")
    if clip.attn_mask is None:
        raise ValueError("GET needs CLIP's causal text attention mask")


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with requires_grad=False everywhere, in eval mode."""
    clone = copy.deepcopy(module)
    clone.requires_grad_(False)
    return clone.eval()


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------

def clip_autocast(device_type: str, enabled: bool) -> contextlib.AbstractContextManager:
    """The one precision switch (GET_SPEC §4 "Precision"): bf16 autocast for the CLIP encoders.

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
# Text Embedding Synthesizer
# --------------------------------------------------------------------------------------------

def _text_project(clip: open_clip.CLIP, x: Tensor) -> Tensor:
    """CLIP's text projection [B, text_width] -> [B, embed_dim] (a Parameter or a Linear)."""
    if isinstance(clip.text_projection, nn.Linear):
        return clip.text_projection(x)
    return x @ clip.text_projection


def sample_keep_mask(rows: int, n_words: int, word_drop: float,
                     generator: torch.Generator | None = None) -> Tensor:
    """Word dropout: bool [rows, n_words] on the CPU, each word kept with prob 1 - word_drop;
    a row that would keep nothing keeps one uniformly chosen word instead. Drawn from
    ``generator`` (default torch's global one)."""
    if not 0.0 <= word_drop < 1.0:
        raise ValueError(f"word_drop must be in [0, 1); got {word_drop}")
    keep = torch.rand(rows, n_words, generator=generator) >= word_drop
    rescue = F.one_hot(torch.randint(n_words, (rows,), generator=generator), n_words).bool()
    return keep | (rescue & ~keep.any(dim=1, keepdim=True))


class TextEmbeddingSynthesizer(nn.Module):
    """TES (GET_SPEC §3): image embedding -> n_words pseudo word embeddings -> CLIP text encoder.

    Only ``projector`` is a parameter of this module. The CLIP model is held as a plain
    attribute, not a submodule, so ``state_dict()`` is the projector alone and ``.to()`` moves
    only the projector: the owner of the CLIP model (``TESStage``, ``GETModel``) moves it.
    The projector is created on CLIP's device; its init follows the global torch RNG.
    """

    def __init__(self, clip_model: open_clip.CLIP, n_words: int = 7,
                 tokenizer: open_clip.tokenizer.SimpleTokenizer | None = None):
        """
        Args:
            clip_model: frozen CLIP whose text tower encodes the pseudo words.
            n_words: pseudo words per image (7 in GET).
            tokenizer: gives the start/end-of-text ids; default open_clip's CLIP tokenizer.
        """
        super().__init__()
        check_supported_clip(clip_model)
        if n_words < 1 or n_words + 2 > clip_model.context_length:
            raise ValueError(f"n_words must be in [1, {clip_model.context_length - 2}]; "
                             f"got {n_words}")
        # Bypasses nn.Module registration: no CLIP weights in this module's state_dict.
        object.__setattr__(self, "clip", clip_model)
        tokenizer = tokenizer or open_clip.SimpleTokenizer()
        device = _device_of(clip_model)
        # [SOT, EOT, PAD] token ids; a non-persistent buffer so that it follows .to() and stays
        # out of the state_dict.
        special_ids = [tokenizer.sot_token_id, tokenizer.eot_token_id, PAD_TOKEN_ID]
        self.register_buffer("special_ids", torch.tensor(special_ids, device=device),
                             persistent=False)
        self.n_words = n_words
        self.text_width = clip_model.token_embedding.embedding_dim
        self.projector = nn.Linear(clip_model.visual.output_dim, n_words * self.text_width,
                                   device=device)

    def forward(self, image_embeddings: Tensor, keep_mask: Tensor | None = None) -> Tensor:
        """[B, embed_dim] CLIP image embeddings -> [B, embed_dim] pseudo text embeddings.

        keep_mask: word dropout, bool [B, n_words] from ``sample_keep_mask`` (stage 1 with
        --word_drop draws one per step); None keeps every word.
        """
        words = self.projector(image_embeddings).unflatten(1, (self.n_words, self.text_width))
        return self.encode_words(words, keep_mask)

    def encode_words(self, words: Tensor, keep_mask: Tensor | None = None) -> Tensor:
        """Encode pseudo words with CLIP's text tower as the text ``[SOT] words [EOT]``.

        Args:
            words: [B, n_words, text_width] word embeddings (any float dtype).
            keep_mask: optional bool [B, n_words]; the kept words are packed to the front in
                their order, followed by EOT and padded with the embedding of token 0, as if
                the dropped tokens had never been in the text. Rows should keep >= 1 word.

        Returns:
            [B, embed_dim] text embeddings (not normalised), read at the EOT position.
        """
        clip = self.clip
        batch, n_words, width = words.shape
        if (n_words, width) != (self.n_words, self.text_width):
            raise ValueError(f"words must be [B, {self.n_words}, {self.text_width}]; "
                             f"got {tuple(words.shape)}")
        sot, eot, pad = clip.token_embedding(self.special_ids).to(words.dtype).unbind(0)  # [width]
        if keep_mask is None:
            body = torch.cat([words, eot.expand(batch, 1, width)], dim=1)  # [B, n+1, width]
            eot_pos = torch.full((batch,), n_words + 1, device=words.device)
        else:
            body, eot_pos = self._pack_kept_words(words, keep_mask, eot, pad)
        x = torch.cat([sot.expand(batch, 1, width), body], dim=1)  # [B, n+2, width]
        length = n_words + 2
        x = x + clip.positional_embedding[:length].to(x.dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        x = clip.ln_final(x)
        return _text_project(clip, x[torch.arange(batch, device=x.device), eot_pos])

    def _pack_kept_words(self, words: Tensor, keep_mask: Tensor, eot: Tensor,
                         pad: Tensor) -> tuple[Tensor, Tensor]:
        """Kept words first (order kept), then EOT, then padding; vectorised with a gather.

        Returns:
            body [B, n_words+1, width] (the text after SOT) and the EOT position [B] long
            (1 + number of kept words) in the full sequence.
        """
        batch, n_words, width = words.shape
        if keep_mask.shape != (batch, n_words):
            raise ValueError(f"keep_mask must be [{batch}, {n_words}]; "
                             f"got {tuple(keep_mask.shape)}")
        keep = keep_mask.to(device=words.device, dtype=torch.bool)
        n_kept = keep.sum(dim=1, keepdim=True)                                    # [B, 1]
        # Indices of kept words first, in their original order (stable sort of 0=kept, 1=dropped).
        kept_first = torch.sort((~keep).int(), dim=1, stable=True).indices        # [B, n]
        kept_first = torch.cat([kept_first, kept_first[:, :1]], dim=1)            # [B, n+1]
        # Candidate rows: the words, then EOT (index n_words), then PAD (index n_words + 1).
        pool = torch.cat([words, eot.expand(batch, 1, width), pad.expand(batch, 1, width)], dim=1)
        slot = torch.arange(n_words + 1, device=words.device)
        source = torch.where(slot < n_kept, kept_first,
                             torch.where(slot == n_kept, n_words, n_words + 1))   # [B, n+1]
        body = pool.gather(1, source.unsqueeze(-1).expand(-1, -1, width))
        return body, n_kept.squeeze(1) + 1


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
    device = _device_of(clip_model)
    prompts = [template.format(name) for name in class_names]
    chunks = [clip_model.encode_text(tokenizer(prompts[i:i + batch_size]).to(device)).float()
              for i in range(0, len(prompts), batch_size)]
    return F.normalize(torch.cat(chunks), dim=-1)


# --------------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadConfig:
    """The DINO heads of ``GETModel``.

    Attributes:
        shared: one head for both branches (the reference) or one per branch.
        hidden_dim, bottleneck_dim: widths of the head's projection MLP (2048 and 256 in GET;
            smaller only for the tiny demo model).
    """

    shared: bool = True
    hidden_dim: int = 2048
    bottleneck_dim: int = 256


class DINOHead(nn.Module):
    """SimGCD's head: an MLP projection for the contrastive losses and a cosine classifier.

    The classifier is a weight-normalised Linear(in_dim -> out_dim, no bias) whose norm g is
    fixed at 1, written explicitly: logits = normalize(x) @ (g * v / ||v||_row)^T with
    ``weight_g`` a constant buffer of ones (never trained) and ``weight_v`` the trainable
    direction, initialised like a default PyTorch Linear. It acts on the normalised INPUT x,
    not on the MLP output.
    """

    def __init__(self, in_dim: int, out_dim: int, nlayers: int = 3, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1; got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        # PyTorch's default Linear init (what nn.Linear.reset_parameters does for the weight).
        nn.init.kaiming_uniform_(self.weight_v, a=5 ** 0.5)
        self.register_buffer("weight_g", torch.ones(out_dim, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, in_dim] -> (z [B, bottleneck_dim] unnormalised, logits [B, out_dim] cosines)."""
        z = self.mlp(x)
        weight = self.weight_g * F.normalize(self.weight_v, dim=1)
        logits = F.normalize(x, dim=-1) @ weight.t()
        return z, logits


# --------------------------------------------------------------------------------------------
# Stage models
# --------------------------------------------------------------------------------------------

class _PartlyTrainable(nn.Module):
    """Base of the stage models: subclasses name their trainable modules, the rest is frozen.

    ``set_trainable`` is the one place that decides what trains; ``train()`` only switches the
    trainable modules, every frozen one stays in eval mode.
    """

    def trainable_modules(self) -> dict[str, nn.Module]:
        """{qualified name: module} of everything that trains."""
        raise NotImplementedError

    def set_trainable(self) -> None:
        """Freeze every parameter, then unfreeze the trainable modules."""
        self.requires_grad_(False)
        for module in self.trainable_modules().values():
            module.requires_grad_(True)

    def train(self, mode: bool = True) -> _PartlyTrainable:
        self.training = mode
        for module in self.children():
            module.train(False)
        for module in self.trainable_modules().values():
            module.train(mode)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimiser should update."""
        return [p for module in self.trainable_modules().values() for p in module.parameters()]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """{name: tensor} of the trainable modules (what a checkpoint stores; CLIP is reloaded)."""
        return {f"{prefix}.{key}": value
                for prefix, module in self.trainable_modules().items()
                for key, value in module.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy ``state`` (from ``trainable_state_dict``) into the model.

        Keys and shapes must match exactly; a ValueError names the differences.
        """
        own = self.trainable_state_dict()
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        wrong_shape = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
        if missing or unexpected or wrong_shape:
            raise ValueError(
                "checkpoint does not match this model: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong_shape[:5]}"
                f" (counts {len(missing)}/{len(unexpected)}/{len(wrong_shape)}). Was it saved with "
                "another --clip_model, --grad_from_block, --use_projection, --shared_head or "
                "number of classes?")
        with torch.no_grad():
            for key, tensor in own.items():
                tensor.copy_(state[key])

    def parameter_summary(self) -> list[tuple[str, int, int]]:
        """[(part, trainable parameters, total parameters)] for the log; every trainable module
        is its own row, frozen parameters are grouped by top-level part."""
        prefixes = list(self.trainable_modules())
        rows: dict[str, list[int]] = {}
        for name, param in self.named_parameters():
            group = next((p for p in prefixes if name.startswith(p + ".")), None)
            if group is None:
                head, _, rest = name.partition(".")
                group = head
                if head == "clip":
                    group = "clip.visual" if rest.startswith("visual.") else "clip.text"
            counts = rows.setdefault(group, [0, 0])
            counts[0] += param.numel() if param.requires_grad else 0
            counts[1] += param.numel()
        return [(group, trainable, total) for group, (trainable, total) in rows.items()]


def _check_tes_clip(clip_model: nn.Module, tes: TextEmbeddingSynthesizer) -> None:
    if tes.clip is not clip_model:
        raise ValueError("the TES must be built on the same CLIP model as the stage model")


class TESStage(_PartlyTrainable):
    """Stage 1 (GET_SPEC §3): frozen CLIP image embedding f and the TES output t; only the TES
    projector trains. One frozen image-encoder pass gives both f and the TES input."""

    def __init__(self, clip_model: open_clip.CLIP, tes: TextEmbeddingSynthesizer,
                 amp: bool = False):
        """
        Args:
            clip_model: the frozen CLIP from ``load_clip``.
            tes: a TES built on ``clip_model``; its projector trains.
            amp: run the image encoder and the TES under bf16 autocast (``clip_autocast``).
        """
        super().__init__()
        _check_tes_clip(clip_model, tes)
        self.clip, self.tes, self.amp = clip_model, tes, amp
        self.set_trainable()
        self.train()

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"tes": self.tes}

    def forward(self, images: Tensor, keep_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """images [N, 3, H, W] -> (f [N, embed_dim] CLIP image embedding, t [N, embed_dim] TES
        output), both float32; ``keep_mask``: the TES's word dropout (bool [N, n_words])."""
        with clip_autocast(images.device.type, self.amp):
            with torch.no_grad():
                f = self.clip.encode_image(images)
            t = self.tes(f, keep_mask)
        return f.float(), t.float()


class GETModel(_PartlyTrainable):
    """Stage 2 (GET_SPEC §4): visual branch (CLIP ViT, blocks >= g train) and text branch
    (frozen TES on the frozen CLIP image embedding, then a trainable ``text_map``), each
    followed by a DINO head (one shared head by default).

    The frozen blocks [0, g) run once per image without autograd; their tokens feed both the
    trainable blocks and a frozen copy of blocks [g, depth) (taken when the model is built)
    that yields the CLIP image embedding for the TES. ``encode`` is the CLIP part (under bf16
    autocast with ``amp``), ``forward`` adds the fp32 text mapping and heads.
    """

    def __init__(self, clip_model: open_clip.CLIP, tes: TextEmbeddingSynthesizer,
                 num_classes: int, grad_from_block: int = 11, use_projection: bool = False,
                 head: HeadConfig = HeadConfig(), amp: bool = False):
        """
        Args:
            clip_model: the frozen CLIP from ``load_clip``; its blocks >= g become trainable.
            tes: the stage-1 TES on ``clip_model`` (always in eval mode here).
            num_classes: K, the number of clusters.
            grad_from_block: g in [0, depth]; 0 trains every block, depth none.
            use_projection: keep CLIP's visual projection in the visual branch (ImageNet-1K).
            head: shared or per-branch heads and their widths.
            amp: run the CLIP encoders under bf16 autocast (``clip_autocast``).
        """
        super().__init__()
        _check_tes_clip(clip_model, tes)
        visual = clip_model.visual
        depth = len(visual.transformer.resblocks)
        if not 0 <= grad_from_block <= depth:
            raise ValueError(f"--grad_from_block must be in [0, {depth}]; got {grad_from_block}")
        self.clip, self.tes, self.amp = clip_model, tes, amp
        self.grad_from_block, self.depth = grad_from_block, depth
        self.use_projection = use_projection
        self.frozen_tail = frozen_copy(visual.transformer.resblocks[grad_from_block:])
        embed_dim = visual.output_dim
        self.feat_dim = embed_dim if use_projection else visual.transformer.width
        self.text_map = nn.Linear(embed_dim, self.feat_dim)
        dims = dict(hidden_dim=head.hidden_dim, bottleneck_dim=head.bottleneck_dim)
        self.head = DINOHead(self.feat_dim, num_classes, **dims)
        self.text_head = None if head.shared else DINOHead(self.feat_dim, num_classes, **dims)
        self.to(_device_of(clip_model))
        self.set_trainable()
        self.train()

    def trainable_modules(self) -> dict[str, nn.Module]:
        blocks = self.clip.visual.transformer.resblocks
        modules = {f"clip.visual.transformer.resblocks.{i}": blocks[i]
                   for i in range(self.grad_from_block, self.depth)}
        modules.update(text_map=self.text_map, head=self.head)
        if self.text_head is not None:
            modules["text_head"] = self.text_head
        return modules

    def frozen_part(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """What never trains in stage 2, without autograd and under bf16 autocast with ``amp``.

        Args:
            images: [N, 3, H, W].

        Returns:
            tokens [N, L, width] after the frozen blocks [0, g); tes_out [N, embed_dim], the
            TES output on the frozen CLIP image embedding. For the same images they never
            change while stage 2 trains, so evaluation computes them once (engine.EvalCache).
        """
        visual = self.clip.visual
        with torch.no_grad(), clip_autocast(images.device.type, self.amp):
            tokens = visual_trunk(visual, images, self.grad_from_block)
            clip_emb = visual_project(visual, visual_tail(self.frozen_tail, visual.ln_post, tokens))
            return tokens, self.tes(clip_emb)

    def encode_from(self, tokens: Tensor, tes_out: Tensor) -> tuple[Tensor, Tensor]:
        """The trainable blocks, ln_post (and the visual projection with ``use_projection``) on
        the frozen part's outputs: (v_feat [N, feat_dim], tes_out), in the encoders' precision."""
        visual = self.clip.visual
        with clip_autocast(tokens.device.type, self.amp):
            v_feat = visual_tail(visual.transformer.resblocks[self.grad_from_block:], visual.ln_post, tokens)
            if self.use_projection:
                v_feat = visual_project(visual, v_feat)
        return v_feat, tes_out

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The CLIP part of the model: (v_feat [N, feat_dim], tes_out [N, embed_dim]), in the
        encoders' precision (bf16 with amp); the frozen trunk runs once, without autograd."""
        return self.encode_from(*self.frozen_part(images))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images [N, 3, H, W] -> dict of float32 tensors: 'v_feat', 't_feat' [N, feat_dim];
        'v_proj', 't_proj' [N, bottleneck_dim] (head MLP outputs); 'v_logits', 't_logits'
        [N, K] (cosine logits). The text mapping and the heads run in fp32."""
        return self.heads(*self.encode(images))

    def heads(self, v_feat: Tensor, tes_out: Tensor) -> dict[str, Tensor]:
        """The text mapping and the head(s), in true fp32 (see ``forward``)."""
        with clip_autocast(v_feat.device.type, False):
            v_feat = v_feat.float()
            t_feat = self.text_map(tes_out.float())
            text_head = self.text_head if self.text_head is not None else self.head
            v_proj, v_logits = self.head(v_feat)
            t_proj, t_logits = text_head(t_feat)
        return {"v_feat": v_feat, "t_feat": t_feat, "v_proj": v_proj, "v_logits": v_logits,
                "t_proj": t_proj, "t_logits": t_logits}

    @torch.no_grad()
    def predict(self, images: Tensor, fuse_temperature: float = FUSE_TEMPERATURE) -> dict[str, Tensor]:
        """Evaluation outputs: 'v_logits', 't_logits' [N, K] and 'fused_probs' [N, K], the mean
        of softmax(logits / fuse_temperature) of both heads (1 as in the reference; 0.1 is the
        training temperature); all float32. Does not change the train/eval mode: call
        ``eval()`` first."""
        return fuse(self(images), fuse_temperature)

    @torch.no_grad()
    def predict_from(self, tokens: Tensor, tes_out: Tensor,
                     fuse_temperature: float = FUSE_TEMPERATURE) -> dict[str, Tensor]:
        """``predict`` on the outputs of ``frozen_part`` (the same computation, without it)."""
        return fuse(self.heads(*self.encode_from(tokens, tes_out)), fuse_temperature)


def fuse(out: dict[str, Tensor], fuse_temperature: float) -> dict[str, Tensor]:
    """The logits of both heads and their fused prediction (see ``GETModel.predict``)."""
    with clip_autocast(out["v_logits"].device.type, False):
        fused = (F.softmax(out["v_logits"] / fuse_temperature, dim=-1)
                 + F.softmax(out["t_logits"] / fuse_temperature, dim=-1)) / 2
    return {"v_logits": out["v_logits"], "t_logits": out["t_logits"], "fused_probs": fused}


def build_clip(args) -> open_clip.CLIP:
    """The frozen CLIP of the flags (--clip_model, --pretrained, --device, --clip_cache_dir)."""
    # Seeded first, a randomly initialised CLIP is identical in every process, in a resumed run
    # and in predict.py; pretrained weights are loaded, not drawn.
    seed_everything(args.seed, "clip")
    return load_clip(args.clip_model, args.pretrained, device=args.device, cache_dir=args.clip_cache_dir)


def build_get_model(clip_model: open_clip.CLIP, tes_projector: dict, meta: Mapping,
                    amp: bool = False) -> GETModel:
    """The stage-2 model on ``clip_model`` with a trained TES projector, as ``meta`` (that of a
    stage-2 checkpoint) describes it: ``num_classes``, ``n_words`` and the architecture flags
    (``params.ARCHITECTURE_FLAGS``)."""
    tes = TextEmbeddingSynthesizer(clip_model, n_words=meta["n_words"])
    tes.projector.load_state_dict(tes_projector)
    head = HeadConfig(meta["shared_head"], meta["head_hidden_dim"], meta["head_bottleneck_dim"])
    return GETModel(clip_model, tes, meta["num_classes"], meta["grad_from_block"], meta["use_projection"],
                    head, amp=amp)


def get_model_from_checkpoint(clip_model: open_clip.CLIP, ckpt: dict, path: str, amp: bool = False) -> GETModel:
    """The stage-2 model of ``ckpt`` (read from ``path``, see ``load_stage2_checkpoint``) with
    its trained weights."""
    model = build_get_model(clip_model, ckpt["tes_projector"], ckpt["meta"], amp)
    try:
        model.load_trainable_state_dict(ckpt["model"])
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from err
    return model


def format_parameter_summary(rows: list[tuple[str, int, int]]) -> str:
    """A small table of ``parameter_summary()`` rows with a total line."""
    lines = [f"{name:<40s} trainable {trainable:>12,d} / {total:>12,d}"
             for name, trainable, total in rows]
    trainable, total = sum(r[1] for r in rows), sum(r[2] for r in rows)
    lines.append(f"{'total':<40s} trainable {trainable:>12,d} / {total:>12,d}")
    return "\n".join(lines)
