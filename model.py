"""The models of GET: the Text Embedding Synthesizer (TES), the DINO head and the two stage
models, on the frozen CLIP of backbone.py.

* ``TextEmbeddingSynthesizer`` turns a CLIP image embedding into 7 pseudo words and encodes them
  with CLIP's own frozen text transformer (stage 1 trains its projector);
* ``DINOHead`` is the SimGCD head (MLP projection + cosine classifier with a fixed norm),
  ``HeadConfig`` its layout in ``GETModel``;
* ``TESStage`` (stage 1) and ``GETModel`` (stage 2) assemble them and own the frozen CLIP (a
  submodule of theirs, handed to the TES at each call); each has one ``set_trainable`` that
  decides what trains and a ``parameter_summary`` for the log. Their outputs are float32;
* ``GETConfig`` is the stage-2 architecture: what a stage-2 checkpoint carries to rebuild it.

The method as implemented: docs/method.md. The reference's slower computation (three CLIP
copies, two image-encoder passes per step) is not here: ``bench/reference.py`` keeps it as the
baseline of the benchmarks and of the equivalence tests.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbone import (check_supported_clip, clip_autocast, device_of, frozen_copy, text_project, visual_project,
                      visual_tail, visual_trunk)
from vocabulary import BRANCHES, heads_of

# open_clip's tokenizer pads with id 0; the TES pads a shortened pseudo text with its embedding.
PAD_TOKEN_ID = 0
# The reference fuses the two heads as the mean of softmax(raw logits): temperature 1, although
# the losses use logits / 0.1. ``predict`` keeps that default and lets the caller choose.
FUSE_TEMPERATURE = 1.0


# --------------------------------------------------------------------------------------------


# Text Embedding Synthesizer
# --------------------------------------------------------------------------------------------

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
    """TES (docs/method.md, stage 1): image embedding -> n_words pseudo word embeddings ->
    CLIP's text encoder.

    Only ``projector`` is a parameter of this module: the frozen CLIP belongs to the stage
    model, which passes it to every call, so ``state_dict()`` is the projector alone. The
    projector is created on CLIP's device; its init follows the global torch RNG.
    """

    def __init__(self, clip_model: open_clip.CLIP, n_words: int = 7,
                 tokenizer: open_clip.tokenizer.SimpleTokenizer | None = None):
        """
        Args:
            clip_model: the frozen CLIP whose text tower will encode the pseudo words (its
                sizes are read here; it is not kept).
            n_words: pseudo words per image (7 in GET).
            tokenizer: gives the start/end-of-text ids; default open_clip's CLIP tokenizer.
        """
        super().__init__()
        check_supported_clip(clip_model)
        if n_words < 1 or n_words + 2 > clip_model.context_length:
            raise ValueError(f"n_words must be in [1, {clip_model.context_length - 2}]; "
                             f"got {n_words}")
        tokenizer = tokenizer or open_clip.SimpleTokenizer()
        device = device_of(clip_model)
        # [SOT, EOT, PAD] token ids; a non-persistent buffer so that it follows .to() and stays
        # out of the state_dict.
        special_ids = [tokenizer.sot_token_id, tokenizer.eot_token_id, PAD_TOKEN_ID]
        self.register_buffer("special_ids", torch.tensor(special_ids, device=device),
                             persistent=False)
        self.n_words = n_words
        self.text_width = clip_model.token_embedding.embedding_dim
        self.projector = nn.Linear(clip_model.visual.output_dim, n_words * self.text_width,
                                   device=device)

    def check_fits(self, clip: open_clip.CLIP) -> None:
        """Raise ValueError unless ``clip`` has the sizes this TES was built for."""
        if (self.projector.in_features, self.text_width) != (clip.visual.output_dim, clip.token_embedding.embedding_dim):
            raise ValueError("the TES was built for another CLIP architecture than the stage model's: build it "
                             "on the same CLIP model")

    def forward(self, clip: open_clip.CLIP, image_embeddings: Tensor, keep_mask: Tensor | None = None) -> Tensor:
        """[B, embed_dim] CLIP image embeddings -> [B, embed_dim] pseudo text embeddings, encoded
        by ``clip``'s text tower.

        keep_mask: word dropout, bool [B, n_words] from ``sample_keep_mask`` (stage 1 with
        --word_drop draws one per step); None keeps every word.
        """
        words = self.projector(image_embeddings).unflatten(1, (self.n_words, self.text_width))
        return self.encode_words(clip, words, keep_mask)

    def encode_words(self, clip: open_clip.CLIP, words: Tensor, keep_mask: Tensor | None = None) -> Tensor:
        """Encode pseudo words with ``clip``'s text tower as the text ``[SOT] words [EOT]``.

        Args:
            clip: the frozen CLIP the TES was built for.
            words: [B, n_words, text_width] word embeddings (any float dtype).
            keep_mask: optional bool [B, n_words]; the kept words are packed to the front in
                their order, followed by EOT and padded with the embedding of token 0, as if
                the dropped tokens had never been in the text. Rows should keep >= 1 word.

        Returns:
            [B, embed_dim] text embeddings (not normalised), read at the EOT position.
        """
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
        return text_project(clip, x[torch.arange(batch, device=x.device), eot_pos])

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


class TESStage(_PartlyTrainable):
    """Stage 1 (docs/method.md): frozen CLIP image embedding f and the TES output t; only the
    TES projector trains. One frozen image-encoder pass gives both f and the TES input."""

    def __init__(self, clip_model: open_clip.CLIP, tes: TextEmbeddingSynthesizer,
                 amp: bool = False):
        """
        Args:
            clip_model: the frozen CLIP from ``load_clip``; this model owns it.
            tes: a TES built for ``clip_model``; its projector trains.
            amp: run the image encoder and the TES under bf16 autocast (``clip_autocast``).
        """
        super().__init__()
        tes.check_fits(clip_model)
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
            t = self.tes(self.clip, f, keep_mask)
        return f.float(), t.float()


class GETModel(_PartlyTrainable):
    """Stage 2 (docs/method.md): visual branch (CLIP ViT, blocks >= g train) and text branch
    (frozen TES on the frozen CLIP image embedding, then a trainable ``text_map``), each
    followed by a DINO head (one shared head by default).

    The frozen blocks [0, g) run once per image without autograd; their tokens feed both the
    trainable blocks and a frozen copy of blocks [g, depth) (taken when the model is built)
    that yields the CLIP image embedding for the TES. ``encode`` is the CLIP part (under bf16
    autocast with ``amp``), ``forward`` adds the fp32 text mapping and heads.

    ``branches`` other than "both" keep one branch (vocabulary.BRANCHES): "visual" is SimGCD on
    CLIP (no TES, no text mapping, no frozen copy), "text" the text branch alone (the whole
    image encoder frozen). A missing branch's outputs are absent from every dict below, and
    ``frozen_part`` gives None in its place.
    """

    def __init__(self, clip_model: open_clip.CLIP, tes: TextEmbeddingSynthesizer | None,
                 num_classes: int, grad_from_block: int = 11, use_projection: bool = False,
                 head: HeadConfig = HeadConfig(), amp: bool = False, branches: str = "both"):
        """
        Args:
            clip_model: the frozen CLIP from ``load_clip``; this model owns it, and its blocks
                >= g become trainable (with a visual branch).
            tes: the stage-1 TES built for ``clip_model`` (always in eval mode here); None,
                and only None, for branches "visual".
            num_classes: K, the number of clusters.
            grad_from_block: g in [0, depth]; 0 trains every block, depth none (unused
                without a visual branch).
            use_projection: keep CLIP's visual projection in the visual branch (ImageNet-1K).
            head: shared or per-branch heads and their widths.
            amp: run the CLIP encoders under bf16 autocast (``clip_autocast``).
            branches: "both" (GET), "visual" or "text".
        """
        super().__init__()
        if branches not in BRANCHES or (tes is None) != (branches == "visual"):
            raise ValueError(f"branches must be one of {BRANCHES}, with a TES unless 'visual'; got "
                             f"{branches!r} {'without' if tes is None else 'with'} a TES")
        if tes is not None:
            tes.check_fits(clip_model)
        visual = clip_model.visual
        depth = len(visual.transformer.resblocks)
        if not 0 <= grad_from_block <= depth:
            raise ValueError(f"--grad_from_block must be in [0, {depth}]; got {grad_from_block}")
        self.clip, self.tes, self.amp, self.branches = clip_model, tes, amp, branches
        self.depth, self.use_projection = depth, use_projection
        # Without a visual branch nothing of the image encoder trains: it all runs frozen.
        self.grad_from_block = grad_from_block if branches != "text" else depth
        self.frozen_tail = (frozen_copy(visual.transformer.resblocks[grad_from_block:])
                            if branches == "both" else None)
        embed_dim = visual.output_dim
        self.feat_dim = embed_dim if use_projection else visual.transformer.width
        self.text_map = nn.Linear(embed_dim, self.feat_dim) if tes is not None else None
        dims = dict(hidden_dim=head.hidden_dim, bottleneck_dim=head.bottleneck_dim)
        self.head = DINOHead(self.feat_dim, num_classes, **dims)
        separate = branches == "both" and not head.shared
        self.text_head = DINOHead(self.feat_dim, num_classes, **dims) if separate else None
        self.to(device_of(clip_model))
        self.set_trainable()
        self.train()

    @property
    def heads_out(self) -> tuple[str, ...]:
        """The heads this model predicts with (vocabulary.heads_of)."""
        return heads_of(self.branches)

    def trainable_modules(self) -> dict[str, nn.Module]:
        blocks = self.clip.visual.transformer.resblocks
        modules = {f"clip.visual.transformer.resblocks.{i}": blocks[i]
                   for i in range(self.grad_from_block, self.depth)}
        if self.text_map is not None:
            modules["text_map"] = self.text_map
        modules["head"] = self.head
        if self.text_head is not None:
            modules["text_head"] = self.text_head
        return modules

    def frozen_part(self, images: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """What never trains in stage 2, without autograd and under bf16 autocast with ``amp``.

        Args:
            images: [N, 3, H, W].

        Returns:
            tokens [N, L, width] after the frozen blocks [0, g) (None without a visual
            branch); tes_out [N, embed_dim], the TES output on the frozen CLIP image embedding
            (None without a text branch). For the same images they never change while stage 2
            trains, so evaluation computes them once (evaluation.cache.EvalCache).
        """
        visual = self.clip.visual
        with torch.no_grad(), clip_autocast(images.device.type, self.amp):
            tokens = visual_trunk(visual, images, self.grad_from_block)
            if self.tes is None:
                return tokens, None
            tail = self.frozen_tail if self.frozen_tail is not None else []
            tes_out = self.tes(self.clip, visual_project(visual, visual_tail(tail, visual.ln_post, tokens)))
            return (tokens if self.branches == "both" else None), tes_out

    def encode_from(self, tokens: Tensor | None, tes_out: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """The trainable blocks, ln_post (and the visual projection with ``use_projection``) on
        the frozen part's outputs: (v_feat [N, feat_dim], tes_out), in the encoders' precision
        (v_feat None without a visual branch)."""
        if tokens is None:
            return None, tes_out
        visual = self.clip.visual
        with clip_autocast(tokens.device.type, self.amp):
            v_feat = visual_tail(visual.transformer.resblocks[self.grad_from_block:], visual.ln_post, tokens)
            if self.use_projection:
                v_feat = visual_project(visual, v_feat)
        return v_feat, tes_out

    def encode(self, images: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The CLIP part of the model: (v_feat [N, feat_dim], tes_out [N, embed_dim]), in the
        encoders' precision (bf16 with amp); the frozen trunk runs once, without autograd."""
        return self.encode_from(*self.frozen_part(images))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images [N, 3, H, W] -> dict of float32 tensors: 'v_feat', 't_feat' [N, feat_dim];
        'v_proj', 't_proj' [N, bottleneck_dim] (head MLP outputs); 'v_logits', 't_logits'
        [N, K] (cosine logits); those of the branches the model has. The text mapping and the
        heads run in fp32."""
        return self.heads(*self.encode(images))

    def heads(self, v_feat: Tensor | None, tes_out: Tensor | None) -> dict[str, Tensor]:
        """The text mapping and the head(s), in true fp32 (see ``forward``)."""
        out = {}
        with clip_autocast((v_feat if v_feat is not None else tes_out).device.type, False):
            if v_feat is not None:
                out["v_feat"] = v_feat.float()
                out["v_proj"], out["v_logits"] = self.head(out["v_feat"])
            if tes_out is not None:
                out["t_feat"] = self.text_map(tes_out.float())
                text_head = self.text_head if self.text_head is not None else self.head
                out["t_proj"], out["t_logits"] = text_head(out["t_feat"])
        return out

    @torch.no_grad()
    def predict(self, images: Tensor, fuse_temperature: float = FUSE_TEMPERATURE) -> dict[str, Tensor]:
        """Evaluation outputs: 'v_logits', 't_logits' [N, K] and 'fused_probs' [N, K], the mean
        of softmax(logits / fuse_temperature) of both heads (1 as in the reference; 0.1 is the
        training temperature); all float32; a single-branch model gives its logits only. Does
        not change the train/eval mode: call ``eval()`` first."""
        return fuse(self(images), fuse_temperature)

    @torch.no_grad()
    def predict_from(self, tokens: Tensor | None, tes_out: Tensor | None,
                     fuse_temperature: float = FUSE_TEMPERATURE) -> dict[str, Tensor]:
        """``predict`` on the outputs of ``frozen_part`` (the same computation, without it)."""
        return fuse(self.heads(*self.encode_from(tokens, tes_out)), fuse_temperature)


def fuse(out: dict[str, Tensor], fuse_temperature: float) -> dict[str, Tensor]:
    """The logits of the heads and, with both, their fused prediction (see ``GETModel.predict``)."""
    logits = {key: out[key] for key in ("v_logits", "t_logits") if key in out}
    if len(logits) < 2:
        return logits
    with clip_autocast(out["v_logits"].device.type, False):
        fused = (F.softmax(out["v_logits"] / fuse_temperature, dim=-1)
                 + F.softmax(out["t_logits"] / fuse_temperature, dim=-1)) / 2
    return {**logits, "fused_probs": fused}


@dataclass(frozen=True)
class GETConfig:
    """The stage-2 architecture: everything needed to rebuild ``GETModel`` besides CLIP. Every
    stage-2 checkpoint carries it (``meta()``, keyed by the flags' names), so --stage eval and
    predict.py rebuild a model from its checkpoint, whatever their own flags say."""
    num_classes: int
    n_words: int = 7
    grad_from_block: int = 11
    use_projection: bool = False
    head: HeadConfig = HeadConfig()
    branches: str = "both"

    @classmethod
    def from_flags(cls, args, num_classes: int) -> GETConfig:
        """The architecture the flags ask for, with K = ``num_classes``."""
        head = HeadConfig(args.shared_head, args.head_hidden_dim, args.head_bottleneck_dim)
        return cls(num_classes, args.n_words, args.grad_from_block, args.use_projection, head, args.branches)

    @classmethod
    def from_meta(cls, meta: Mapping) -> GETConfig:
        head = HeadConfig(meta["shared_head"], meta["head_hidden_dim"], meta["head_bottleneck_dim"])
        # Checkpoints from before --branches are GET's, both branches.
        return cls(meta["num_classes"], meta["n_words"], meta["grad_from_block"], meta["use_projection"], head,
                   meta.get("branches", "both"))

    def meta(self) -> dict:
        """The architecture as a checkpoint's meta records it."""
        fields = {k: v for k, v in asdict(self).items() if k != "head"}
        return {**fields, "shared_head": self.head.shared, "head_hidden_dim": self.head.hidden_dim,
                "head_bottleneck_dim": self.head.bottleneck_dim}


def build_get_model(clip_model: open_clip.CLIP, tes_projector: dict | None, config: GETConfig,
                    amp: bool = False) -> GETModel:
    """The stage-2 model of ``config`` on ``clip_model``, with a trained TES projector (None for
    branches "visual", which has no TES)."""
    tes = None
    if config.branches != "visual":
        tes = TextEmbeddingSynthesizer(clip_model, n_words=config.n_words)
        tes.projector.load_state_dict(tes_projector)
    return GETModel(clip_model, tes, config.num_classes, config.grad_from_block, config.use_projection,
                    config.head, amp=amp, branches=config.branches)
