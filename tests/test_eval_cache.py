"""The evaluation cache: predictions and metrics of a cached evaluation equal the uncached
ones exactly (CPU, fp32), also after the trainable part has changed and with a budget that
holds only part of the split; a cached evaluation loads no image."""
from __future__ import annotations

from argparse import Namespace

import pytest
import torch
from torch.utils.data import DataLoader

import model
from data.augmentations import get_transforms
from data.get_datasets import get_class_splits, get_datasets
from engine import evaluate, predict_split
from util.eval_cache import EvalCache
from util.dist import DistInfo, ShardSampler
from util.logging_utils import RunLogger
from util.runs import Run, StopSignal


class CountingDataset(torch.utils.data.Dataset):
    """The evaluation split, counting the images it loads."""

    def __init__(self, dataset):
        self.dataset, self.loads = dataset, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.loads += 1
        return self.dataset[index]


@pytest.fixture()
def setup(tmp_path, cub_root):
    args = get_class_splits(Namespace(dataset_name="cub", data_root=str(cub_root), prop_train_labels=0.5))
    _, test_tf = get_transforms(image_size=32)
    dataset = CountingDataset(get_datasets("cub", test_tf, test_tf, args)[2])  # 18 unlabelled images
    loader = DataLoader(dataset, batch_size=4, sampler=ShardSampler(len(dataset)))
    torch.manual_seed(0)
    clip = model.load_clip("GET-tiny", None)
    net = model.GETModel(clip, model.TextEmbeddingSynthesizer(clip), num_classes=6, grad_from_block=2,
                         head=model.HeadConfig(hidden_dim=64, bottleneck_dim=32)).eval()
    run = Run(Namespace(device="cpu", progress=False, eval_func="v2"), DistInfo(), tmp_path,
              RunLogger(tmp_path, enabled=False), StopSignal())
    return net, loader, run


def change_trainable_part(net) -> None:
    with torch.no_grad():
        for param in net.trainable_parameters():
            param.add_(0.1 * torch.randn_like(param))


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("budget_batches", [100, 2, 0])  # all, the first 2 of 5 batches, none
def test_cached_evaluation_equals_uncached(setup, budget_batches):
    net, loader, run = setup
    tokens, tes_out = net.frozen_part(next(iter(loader))[0])
    cache = EvalCache("train_unlabelled", budget_batches * (tokens.nbytes + tes_out.nbytes))
    for _ in range(2):  # the evaluation that builds the cache, then one that uses it
        assert_equal(predict_split(net, loader, run, cache), predict_split(net, loader, run))
        assert evaluate(net, loader, 3, run, cache) == evaluate(net, loader, 3, run)
        change_trainable_part(net)  # stage 2 trains between evaluations
    assert len(cache.batches) == min(budget_batches, 5)


def test_a_cached_evaluation_loads_no_image(setup):
    net, loader, run = setup
    cache = EvalCache("train_unlabelled", 2**30)
    predict_split(net, loader, run, cache)
    loaded = loader.dataset.loads
    predict_split(net, loader, run, cache)
    assert loaded == 18 and loader.dataset.loads == loaded
