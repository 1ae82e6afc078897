"""The names a run uses everywhere: its two stages, the heads of the stage-2 model, the
evaluated splits and the keys of the accuracy metrics. The model's outputs, the evaluation, the
logs, the reports, ``predict.py`` and the flag checks all take them from here.

Accuracy metrics are keyed ``<split>/<head>/<group>``, e.g. ``train_unlabelled/visual/all``:
Hungarian-matched accuracy of one head's clusters on one split, over all samples or the samples
of the old or the new classes.
"""
from __future__ import annotations

STAGE1 = "tes"   # stage 1: the Text Embedding Synthesizer
STAGE2 = "get"   # stage 2: the dual-branch GCD model
STAGES = (STAGE1, STAGE2)  # in run order; also the prefixes of their logged scalars

HEADS = ("visual", "text", "fused")
# The output of GETModel.predict whose argmax is each head's cluster.
HEAD_OUTPUTS = {"visual": "v_logits", "text": "t_logits", "fused": "fused_probs"}

# --branches: what stage 2 trains. both: GET; visual: the visual branch alone, which is SimGCD
# on CLIP (no stage 1, no text branch, no CICO); text: the text branch alone on a frozen TES.
BRANCHES = ("both", "visual", "text")


def heads_of(branches: str) -> tuple[str, ...]:
    """The heads a model of ``branches`` predicts with, in HEADS order."""
    return HEADS if branches == "both" else (branches,)


def reported_head(branches: str) -> str:
    """The head whose accuracy is the run's result: the visual one, which GET's paper reports
    (the text and fused heads are diagnostics), or the only one of a single-branch model."""
    return "text" if branches == "text" else "visual"


def reported_in(metrics: dict) -> str:
    """The reported head (``reported_head``) of a model from its metrics: the visual one where
    it has one (GET, SimGCD), else the text one."""
    return "visual" if any((parse_metric_key(key) or "  ")[1] == "visual" for key in metrics) else "text"


# TensorBoard: stage 2's evaluation under eval/, and the reported head's again under accuracy/,
# which sorts first.
EVAL_TAG, REPORTED_TAG = "eval", "accuracy"

# train_unlabelled: the transductive protocol papers report; test: the inductive split.
SPLITS = ("train_unlabelled", "test")
GROUPS = ("all", "old", "new")


def metric_key(split: str, head: str, group: str) -> str:
    """The key of one accuracy, e.g. ``train_unlabelled/visual/all``."""
    return f"{split}/{head}/{group}"


def parse_metric_key(key: str) -> tuple[str, str, str] | None:
    """(split, head, group) of an accuracy key; None for any other key."""
    parts = tuple(key.split("/"))
    if len(parts) == 3 and parts[0] in SPLITS and parts[1] in HEADS and parts[2] in GROUPS:
        return parts
    return None
