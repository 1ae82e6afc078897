"""The reference's computation of GET's two stages, kept as a baseline; training does not use it.

The official GET code holds three CLIP copies and runs the image encoder twice per step:

* stage 1: the frozen CLIP encodes the images for the alignment target f, and a separate frozen
  copy of the image encoder encodes them again as the TES input;
* stage 2: a full frozen CLIP copy encodes the images for the TES, another full CLIP copy holds
  the text encoder that encodes the pseudo words, and the visual branch runs the whole image
  encoder of the trained CLIP with autograd.

``ReferenceTESStage`` and ``ReferenceGETModel`` compute exactly that, with the same outputs,
gradients and trainable parameters as ``model.TESStage`` and ``model.GETModel``, which run the
frozen blocks once and hold one CLIP. ``bench/step_time.py`` times both (the "straightforward"
path) and ``tests/test_equivalence.py`` checks that they agree.
"""
from __future__ import annotations

import open_clip
from torch import Tensor

from backbone import clip_autocast, frozen_copy, visual_project, visual_tail, visual_trunk
from model import GETModel, HeadConfig, TESStage, TextEmbeddingSynthesizer


class ReferenceTESStage(TESStage):
    """Stage 1 as the reference computes it: f from the frozen CLIP, the TES input from a
    second, separate frozen copy of the image encoder (two image-encoder passes per image)."""

    def __init__(self, clip_model: open_clip.CLIP, tes: TextEmbeddingSynthesizer,
                 amp: bool = False):
        """Arguments as ``TESStage``."""
        super().__init__(clip_model, tes, amp)
        self.tes_visual = frozen_copy(clip_model.visual)

    def forward(self, images: Tensor, keep_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """images [N, 3, H, W] -> (f, t), both float32 [N, embed_dim]."""
        with clip_autocast(images.device.type, self.amp):
            f = self.clip.encode_image(images)
            t = self.tes(self.clip, self.tes_visual(images), keep_mask)
        return f.float(), t.float()


class ReferenceGETModel(GETModel):
    """Stage 2 with the reference's layout: three CLIPs in memory (the trained one, a frozen
    copy that encodes the images for the TES, a frozen copy whose text encoder encodes the
    pseudo words) and a full image-encoder forward with autograd for the visual branch.

    Trainable modules, heads and ``trainable_state_dict`` keys are those of ``GETModel``, so a
    state dict moves between the two. The TES encodes through the text copy.
    """

    def __init__(self, clip_model: open_clip.CLIP, tes: TextEmbeddingSynthesizer,
                 num_classes: int, grad_from_block: int = 11, use_projection: bool = False,
                 head: HeadConfig = HeadConfig(), amp: bool = False):
        """Arguments as ``GETModel``; the CLIP copies are taken from ``clip_model`` now."""
        super().__init__(clip_model, tes, num_classes, grad_from_block, use_projection, head, amp)
        self.frozen_tail = None  # the shared trunk's copy: the reference has none
        self.image_clip = frozen_copy(clip_model)
        self.text_clip = frozen_copy(clip_model)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """As ``GETModel.encode``: (v_feat [N, feat_dim], tes_out [N, embed_dim])."""
        visual = self.clip.visual
        with clip_autocast(images.device.type, self.amp):
            tes_out = self.tes(self.text_clip, self.image_clip.encode_image(images))
            tokens = visual_trunk(visual, images, 0)
            v_feat = visual_tail(visual.transformer.resblocks, visual.ln_post, tokens)
            if self.use_projection:
                v_feat = visual_project(visual, v_feat)
            return v_feat, tes_out
