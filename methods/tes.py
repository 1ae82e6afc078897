"""Stage 1: the loss of the Text Embedding Synthesizer and the training step that computes it
(docs/method.md, "Stage 1").

    loss = align_weight·align + distill_ce_weight·distill_ce + distill_mse_weight·distill_mse

with every weight 1 in GET; the ablations switch terms off with a weight of 0. Components are
the unweighted terms, and ``distill_acc``, a logged measurement that is not part of the loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods import Losses, masked_mean
from model import sample_keep_mask
from util.dist import DistInfo, gather_views, local_rows
from util.rng import derive_seed
from vocabulary import STAGE1


def tes_alignment_loss(
    f: torch.Tensor, t: torch.Tensor, logit_scale: float | torch.Tensor
) -> Losses:
    """align = CE(L, arange) + CE(Lᵀ, arange), L = logit_scale·norm(f)·norm(t)ᵀ [2B, 2B].

    f: image embeddings [2B, D], t: pseudo text embeddings [2B, D]; logit_scale is the
    exponentiated CLIP scale (100). Each CE is a mean over rows; the two are summed.
    """
    logits = logit_scale * F.normalize(f, dim=1) @ F.normalize(t, dim=1).T
    targets = torch.arange(f.shape[0], device=f.device)
    loss = F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)
    return loss, {"align": loss.detach()}


def tes_distill_loss(
    t: torch.Tensor, labels: torch.Tensor, labelled_mask: torch.Tensor, class_text: torch.Tensor,
    ce_weight: float = 1.0, mse_weight: float = 1.0,
) -> Losses:
    """ce_weight·distill_ce + mse_weight·distill_mse over the M labelled rows, both means over
    them (0 if M = 0).

    t [2B, D]; class_text T [K_old, D], the CLIP text of the old classes (row = label).
    distill_ce = CE(norm(t)·norm(T)ᵀ, y); distill_mse = ‖norm(t) − norm(T)[y]‖².
    The components add distill_acc, the fraction of the M rows whose nearest class text is
    their own (argmax of norm(t)·norm(T)ᵀ = y; 0 if M = 0): a measurement, not in the total.
    """
    text, class_text = F.normalize(t, dim=1), F.normalize(class_text, dim=1)
    safe_labels = labels.where(labelled_mask, 0)  # unlabelled rows: any valid class, masked out
    logits = text @ class_text.T
    ce_rows = F.cross_entropy(logits, safe_labels, reduction="none")
    distill_ce = masked_mean(ce_rows, labelled_mask)
    distill_mse = masked_mean((text - class_text[safe_labels]).pow(2).sum(dim=1), labelled_mask)
    hits = (logits.detach().argmax(dim=1) == safe_labels).to(logits.dtype)
    components = {"distill_ce": distill_ce.detach(), "distill_mse": distill_mse.detach(),
                  "distill_acc": masked_mean(hits, labelled_mask)}
    return ce_weight * distill_ce + mse_weight * distill_mse, components


def tes_loss(
    f: torch.Tensor,
    t: torch.Tensor,
    logit_scale: float | torch.Tensor,
    labels: torch.Tensor,
    labelled_mask: torch.Tensor,
    class_text: torch.Tensor,
    align_weight: float = 1.0,
    distill_ce_weight: float = 1.0,
    distill_mse_weight: float = 1.0,
) -> Losses:
    """align_weight·align + distill_ce_weight·distill_ce + distill_mse_weight·distill_mse;
    f, t [2B, D], class_text [K_old, D]. Components: align, distill_ce, distill_mse (unweighted)
    and the measurement distill_acc (not in the total)."""
    align, align_parts = tes_alignment_loss(f, t, logit_scale)
    distill, distill_parts = tes_distill_loss(t, labels, labelled_mask, class_text, distill_ce_weight,
                                              distill_mse_weight)
    return align_weight * align + distill, {**align_parts, **distill_parts}


# The flags that weigh tes_loss's terms: its keyword arguments of the same names.
TES_LOSS_WEIGHTS = ("align_weight", "distill_ce_weight", "distill_mse_weight")


def word_drop_mask(seed: int, word_drop: float, n_words: int, info: DistInfo, epoch: int, step: int,
                   rows: int) -> Tensor | None:
    """Stage 1's word dropout (--word_drop; None when off) for this process's ``rows`` of a
    step: drawn for the whole global batch from the step's own seed, so that neither the number
    of processes nor a resume changes it."""
    if not word_drop:
        return None
    generator = torch.Generator().manual_seed(derive_seed(seed, STAGE1, epoch, step, "word_drop"))
    keep = sample_keep_mask(rows * info.world_size, n_words, word_drop, generator)
    return local_rows(keep, info)  # on the CPU; the TES moves it


@dataclass
class TESStep:
    """Stage 1's step: the loss of one batch.

    The TES runs on the images of both views (with word dropout if asked); the rows of every
    process are gathered into the global batch, and ``tes_loss`` is taken over it, so N
    processes compute the loss of one.
    """
    net: nn.Module             # model.TESStage, or its DDP wrapper
    class_text: Tensor         # [K_old, D] CLIP text of the old classes
    logit_scale: float         # CLIP's exp(logit_scale): 100 for OpenAI's weights
    info: DistInfo
    seed: int = 0              # --seed (the word-dropout masks)
    word_drop: float = 0.0
    n_words: int = 7
    weights: dict[str, float] = field(default_factory=dict)  # tes_loss's weights (default: its defaults)

    def __call__(self, images: Tensor, labels: Tensor, labelled: Tensor, epoch: int, step: int) -> Losses:
        keep = word_drop_mask(self.seed, self.word_drop, self.n_words, self.info, epoch, step, len(images))
        f, t = self.net(images, keep)
        b = gather_views({"f": f, "t": t, "labels": labels, "labelled": labelled}, self.info)
        return tes_loss(b["f"], b["t"], self.logit_scale, b["labels"], b["labelled"], self.class_text, **self.weights)
