"""Images through a model, outputs gathered: the one loop behind training's evaluation,
``predict.py`` and the K estimate.

``gather_outputs`` runs a computation over batches and gathers its outputs from every process
in sample order; ``predict_split`` uses it for the cluster of every image by each head of a
stage-2 model (through the evaluation cache when there is one):

    preds = predict_split(model, loader, device, info)   # {'visual': [N], 'text', 'fused', 'target', 'index'}

(a single-branch model, --branches visual or text, gives its one head).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from util.dist import DistInfo, gather_predictions
from vocabulary import HEAD_OUTPUTS, HEADS

# (the computation's input, targets [n], dataset indices [n]) of one batch.
Batch = tuple[Any, Tensor, Tensor]


@torch.no_grad()
def gather_outputs(batches: Iterable[Batch], compute: Callable[[Any], dict[str, Tensor]], info: DistInfo,
                   total: int | None = None, progress: bool = False, stop: Callable[[], bool] | None = None,
                   desc: str | None = None) -> dict[str, Tensor] | None:
    """``compute(input)`` of every batch ({name: [n, ...]}) with its 'target' and 'index', on
    the host, concatenated over the batches and gathered from every process in sample order
    ('index'). ``stop`` is asked before each batch (on every process: it must answer alike
    everywhere); None when it says to stop. ``total``, ``progress``, ``desc``: the progress bar."""
    parts: dict[str, list[Tensor]] = defaultdict(list)
    for inputs, target, index in tqdm(batches, total=total, desc=desc, leave=False, disable=not progress):
        if stop is not None and stop():
            return None
        for name, value in compute(inputs).items():
            parts[name].append(value.cpu())
        parts["target"].append(torch.as_tensor(target))
        parts["index"].append(torch.as_tensor(index))
    empty = torch.empty(0, dtype=torch.long)
    local = {name: torch.cat(values) for name, values in parts.items()} or {"target": empty, "index": empty}
    return gather_predictions(local, info)


def frozen_batches(model, loader: Iterable, device: torch.device) -> Iterator[Batch]:
    """((tokens, tes_out), targets, indices) of each (images, targets, indices) batch of
    ``loader``: the outputs of the model's frozen part (``GETModel.frozen_part``)."""
    for images, targets, indices in loader:
        yield model.frozen_part(images.to(device, non_blocking=True)), targets, indices


def head_clusters(out: dict[str, Tensor], heads: tuple[str, ...] = HEADS) -> Tensor:
    """Long [n, len(heads)]: each head's cluster (argmax) in the outputs of
    ``GETModel.predict``, in ``heads`` order (one tensor: one copy to the host)."""
    return torch.stack([out[HEAD_OUTPUTS[head]].argmax(1) for head in heads], dim=1)


def by_head(gathered: dict[str, Tensor], heads: tuple[str, ...] = HEADS) -> dict[str, Tensor]:
    """``gathered`` with its 'clusters' [N, len(heads)] split into one [N] entry per head."""
    clusters = gathered.pop("clusters", torch.empty(0, len(heads), dtype=torch.long))
    return {**dict(zip(heads, clusters.T)), **gathered}


@torch.no_grad()
def predict_split(model, loader: DataLoader, device: torch.device, info: DistInfo, cache=None,
                  progress: bool = False, stop: Callable[[], bool] | None = None) -> dict[str, Tensor] | None:
    """The cluster of every image of ``loader`` by each head ({head: long [N]}), its 'target'
    and its 'index', in sample order over all processes; through ``cache``
    (evaluation.cache.EvalCache) when given. None when ``stop`` says to stop."""
    model.eval()
    batches = cache.batches_of(model, loader, device) if cache else frozen_batches(model, loader, device)
    heads = model.heads_out
    gathered = gather_outputs(batches, lambda frozen: {"clusters": head_clusters(model.predict_from(*frozen), heads)},
                              info, total=len(loader), progress=progress, stop=stop)
    return None if gathered is None else by_head(gathered, heads)
