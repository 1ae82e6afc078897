"""The evaluation cache: predictions and metrics of a cached evaluation equal the uncached
ones exactly (CPU, fp32), also after the trainable part has changed and with a budget that
holds only part of the split; a cached evaluation loads no image."""
from __future__ import annotations

from argparse import Namespace

import pytest
import torch
from torch.utils.data import DataLoader

import model
from backbone import load_clip
from data.augmentations import get_transforms
from data.get_datasets import get_datasets
from data.samplers import ShardSampler
from data.task import task_from_args
from evaluation.cache import EvalCache
from evaluation.evaluate import Evaluator
from evaluation.predict import predict_split
from util.dist import DistInfo


CPU = torch.device("cpu")


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
    task = task_from_args(Namespace(dataset_name="cub", data_root=str(cub_root), prop_train_labels=0.5))
    _, test_tf = get_transforms(image_size=32)
    dataset = CountingDataset(get_datasets("cub", test_tf, test_tf, task)[2])  # 18 unlabelled images
    loader = DataLoader(dataset, batch_size=4, sampler=ShardSampler(len(dataset)))
    torch.manual_seed(0)
    clip = load_clip("GET-tiny", None)
    net = model.GETModel(clip, model.TextEmbeddingSynthesizer(clip), num_classes=6, grad_from_block=2,
                         head=model.HeadConfig(hidden_dim=64, bottleneck_dim=32)).eval()
    return net, loader, task


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
    net, loader, task = setup
    tokens, tes_out = net.frozen_part(next(iter(loader))[0])
    cache = EvalCache("train_unlabelled", budget_batches * (tokens.nbytes + tes_out.nbytes))
    cached = Evaluator(task, CPU, DistInfo(), caches={"train_unlabelled": cache})
    for _ in range(2):  # the evaluation that builds the cache, then one that uses it
        assert_equal(predict_split(net, loader, CPU, DistInfo(), cache), predict_split(net, loader, CPU, DistInfo()))
        splits = {"train_unlabelled": loader}
        assert cached(net, splits) == Evaluator(task, CPU, DistInfo())(net, splits)
        change_trainable_part(net)  # stage 2 trains between evaluations
    assert len(cache.batches) == min(budget_batches, 5)


def test_a_cached_evaluation_loads_no_image(setup):
    net, loader, task = setup
    cache = EvalCache("train_unlabelled", 2**30)
    predict_split(net, loader, CPU, DistInfo(), cache)
    loaded = loader.dataset.loads
    predict_split(net, loader, CPU, DistInfo(), cache)
    assert loaded == 18 and loader.dataset.loads == loaded
