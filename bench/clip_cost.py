"""What each open_clip CLIP architecture costs next to ViT-B/16, the paper's backbone: parameters
of the image and text towers, forward FLOPs of the image encoder per image and of the text
encoder per pseudo text, the sizes that set GET's defaults, and whether this code supports it.

    python bench/clip_cost.py                              # the default list: a few seconds
    python bench/clip_cost.py --models ViT-B-16,ViT-L-14 --json clip_cost.json

Everything is counted on the meta device: the models are built without weights (nothing is
allocated or downloaded) and ``torch.utils.flop_counter.FlopCounterMode`` reads the shapes of
the operations a forward pass dispatches. FLOPs follow that counter's convention, 2 FLOPs per
multiply-add; it counts matrix products and convolutions only (LayerNorm, GELU, softmax and the
additions are left out), and the text's causal attention as full 9 x 9 products.

* image FLOPs: ``clip.visual`` on one image at the model's own size, the work of the frozen
  trunk, the trained block and the projection together (stage 2 runs the last block twice:
  trainable and its frozen copy for the TES);
* text FLOPs: ``TextEmbeddingSynthesizer.encode_words`` on one pseudo text, the 9 tokens
  SOT + 7 pseudo words + EOT that the TES feeds CLIP's text transformer (not CLIP's 77);
* supported: ``backbone.check_supported_clip``; the refused models get their reason, and no
  FLOPs (the project never runs them).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import open_clip
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backbone import check_supported_clip  # noqa: E402
from config import register_model_configs, vision_image_size  # noqa: E402
from model import TextEmbeddingSynthesizer  # noqa: E402
from params import last_block  # noqa: E402

BASELINE = "ViT-B-16"
# The ViTs of the brief, then towers the project refuses: a ViT without class-token pooling
# (CLIPA), a SigLIP (another text tower), a ResNet and a timm ConvNeXt.
MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-g-14",
          "ViT-bigG-14", "ViT-L-14-CLIPA", "ViT-B-16-SigLIP", "RN50", "convnext_base")
N_WORDS = 7  # GET's pseudo words per image; the text is SOT + words + EOT
# Matrix products; the other counted FLOPs are convolutions (the ViTs' patch embedding).
MATMUL_OPS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm")
CONVENTION = ("FLOPs as counted by torch.utils.flop_counter.FlopCounterMode: 2 FLOPs per "
              "multiply-add, matrix products and convolutions only; 1 GFLOP = 1e9 FLOPs")


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated open_clip architectures (ViT-B-16 is always added: "
                        "the ratios are to it)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- counting
def build_on_meta(name: str) -> nn.Module:
    """open_clip's ``name`` with every tensor on the meta device.

    Both the device context and ``device=`` are needed: with ``device`` alone open_clip builds
    and initialises the weights on the CPU first (25 s for ViT-bigG-14), then moves them.
    """
    with torch.device("meta"):
        return open_clip.create_model(name, pretrained=None, device="meta")


def tower_params(clip: nn.Module) -> dict[str, int]:
    """Parameters of the image tower (``visual.*``), of the text tower (all the others but the
    logit scale / bias, one or two scalars of neither tower) and of the whole model."""
    counts = {"image": 0, "text": 0, "total": 0}
    for name, p in clip.named_parameters():
        counts["total"] += p.numel()
        if name.startswith("visual."):
            counts["image"] += p.numel()
        elif not name.startswith("logit_"):
            counts["text"] += p.numel()
    return counts


def count_flops(fn) -> dict[str, int]:
    """FLOPs of ``fn()`` per operation, and their ``total``; raises if nothing was counted (the
    counter would then not have seen the model's operations at all)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    by_op = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    total = counter.get_total_flops()
    if total <= 0:
        raise RuntimeError("FlopCounterMode counted no FLOPs")
    return {**by_op, "total": total}


def image_flops(clip: nn.Module, image_size: int) -> dict[str, int]:
    """FLOPs of the image encoder on one image: stem, every block, ln_post and projection."""
    images = torch.empty(1, 3, image_size, image_size, device="meta")
    return count_flops(lambda: clip.visual(images))


def text_flops(clip: nn.Module, n_words: int = N_WORDS) -> dict[str, int]:
    """FLOPs of CLIP's text tower on one pseudo text of ``n_words`` + 2 tokens, through the
    project's own path (``encode_words``: transformer, ln_final, text projection)."""
    tes = TextEmbeddingSynthesizer(clip, n_words)
    words = torch.empty(1, n_words, tes.text_width, device="meta")
    return count_flops(lambda: tes.encode_words(clip, words))


def matmul_share(flops: dict[str, int]) -> float:
    return sum(flops.get(op, 0) for op in MATMUL_OPS) / flops["total"]


def refusal(clip: nn.Module) -> str | None:
    """Why the project cannot use ``clip`` (check_supported_clip's message), or None."""
    try:
        check_supported_clip(clip)
    except ValueError as err:
        return str(err)
    return None


def measure(name: str) -> dict:
    """One row: sizes, parameters, FLOPs and support of architecture ``name``; a row with
    ``error`` when open_clip cannot build it."""
    start = time.perf_counter()
    try:
        clip = build_on_meta(name)
    except Exception as err:  # an unknown name, a missing timm, a config this open_clip lacks
        return {"model": name, "error": f"{type(err).__name__}: {err}"}
    visual = clip.visual
    transformer = getattr(visual, "transformer", None)
    reason = refusal(clip)
    params = tower_params(clip)
    row = {"model": name, "image_size": vision_image_size(name),
           "depth": len(transformer.resblocks) if transformer is not None else None,
           "grad_from_block": last_block(name),
           "width": transformer.width if transformer is not None else None,
           "embed_dim": getattr(visual, "output_dim", None),
           "image_params": params["image"], "text_params": params["text"], "total_params": params["total"],
           "last_block_params": (sum(p.numel() for p in transformer.resblocks[-1].parameters())
                                 if transformer is not None else None),
           "supported": reason is None, "refused_because": reason}
    if reason is None:
        if row["grad_from_block"] != row["depth"] - 1:  # config and built model must agree
            raise RuntimeError(f"{name}: config depth {row['grad_from_block'] + 1}, "
                               f"built model {row['depth']} blocks")
        img, txt = image_flops(clip, row["image_size"]), text_flops(clip)
        row.update(image_flops=img["total"], text_flops=txt["total"], image_flops_by_op=img,
                   text_flops_by_op=txt, image_matmul_share=matmul_share(img),
                   text_matmul_share=matmul_share(txt))
    row["seconds"] = time.perf_counter() - start
    return row


def add_ratios(rows: list[dict], baseline: str = BASELINE) -> None:
    """Image FLOPs and parameters of every measured row relative to ``baseline``'s."""
    base = next(r for r in rows if r["model"] == baseline)
    for r in rows:
        if "image_flops" in r:
            r["image_flops_vs_baseline"] = r["image_flops"] / base["image_flops"]
            r["text_flops_vs_baseline"] = r["text_flops"] / base["text_flops"]
        if "total_params" in r:
            r["total_params_vs_baseline"] = r["total_params"] / base["total_params"]


# ----------------------------------------------------------------------------- output
COLUMNS = ("model", "image size", "depth", "default grad_from_block", "width", "embed dim",
           "image params (M)", "text params (M)", "total params (M)", "image GFLOPs/img",
           f"image x {BASELINE}", "text GFLOPs / 9-token text", "supported")


def table_cells(r: dict) -> list[str]:
    def num(value, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    millions = {k: num(r[k] / 1e6, ".1f") for k in ("image_params", "text_params", "total_params")}
    return [r["model"], str(r["image_size"]), num(r["depth"], "d"),
            num(r["grad_from_block"] if r["supported"] else None, "d"), num(r["width"], "d"),
            num(r["embed_dim"], "d"), millions["image_params"], millions["text_params"],
            millions["total_params"],
            num(r["image_flops"] / 1e9 if "image_flops" in r else None, ".2f"),
            num(r.get("image_flops_vs_baseline"), ".2f"),
            num(r["text_flops"] / 1e9 if "text_flops" in r else None, ".3f"),
            "yes" if r["supported"] else "no"]


def markdown_table(rows: list[dict]) -> str:
    """The table of the measured rows, then the refused and unbuildable models with why."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in rows if "error" not in r]
    notes = [f"- {r['model']}: refused: {r['refused_because']}" for r in rows
             if "error" not in r and not r["supported"]]
    notes += [f"- {r['model']}: not built: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "initialized randomly" per model
    register_model_configs()  # the project's own architectures (GET-tiny) can be measured too
    names = list(dict.fromkeys(m.strip() for m in args.models.split(",") if m.strip()))
    if BASELINE not in names:
        names.insert(0, BASELINE)
    start = time.perf_counter()
    rows = [measure(name) for name in names]
    add_ratios(rows)
    seconds = time.perf_counter() - start
    shares = [r[k] for r in rows for k in ("image_matmul_share", "text_matmul_share") if k in r]
    print(f"{CONVENTION}. Image: one image at the model's size; text: one {N_WORDS + 2}-token "
          f"pseudo text (SOT + {N_WORDS} words + EOT). Matrix products are at least "
          f"{100 * min(shares):.1f}% of every count (the rest: the patch-embedding convolution). "
          f"Counted on the meta device in {seconds:.1f} s.\n")
    print(markdown_table(rows))
    if args.json:
        result = {"convention": CONVENTION, "baseline": BASELINE, "text_tokens": N_WORDS + 2,
                  "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
                  "seconds": seconds, "rows": rows}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
