"""The optimised computation of model.py (frozen trunk once, one CLIP) against the reference's
computation kept in bench/reference.py (separate full encoders, three CLIPs): the same GET /
TES losses, the same parameter gradients, and the same weights after a few SGD steps.
(The split image encoder itself is checked against CLIP's ``encode_image`` in test_model.py.)
"""
from __future__ import annotations

import pytest
import torch

import model
from backbone import load_clip
from bench.reference import ReferenceGETModel, ReferenceTESStage
from methods.get import dual_branch_loss
from methods.tes import tes_loss

TINY, K, B = "GET-tiny", 6, 4
HEAD = model.HeadConfig(hidden_dim=128, bottleneck_dim=32)
OPTIMISED, REFERENCE = "optimised", "reference"


def batch(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 1, 0, 4]).repeat(2)  # remapped labels; rows of view 1 then view 2
    labelled = torch.tensor([True, True, True, False]).repeat(2)
    return {"images": torch.randn(2 * B, 3, 32, 32, generator=gen), "labels": labels,
            "labelled": labelled}


CLASS_TEXT = torch.nn.functional.normalize(
    torch.randn(3, 32, generator=torch.Generator().manual_seed(5)), dim=-1)


def twin_models(build_optimised, build_reference):
    """The same model built twice, optimised and reference, from identically seeded CLIP and
    weights."""
    out = {}
    for path, build in ((OPTIMISED, build_optimised), (REFERENCE, build_reference)):
        torch.manual_seed(0)
        clip = load_clip(TINY, pretrained=None)
        torch.manual_seed(1)
        tes = model.TextEmbeddingSynthesizer(clip, n_words=7)
        torch.manual_seed(2)
        out[path] = build(clip, tes)
    return out


def stage2_twins(grad_from_block: int):
    return twin_models(
        lambda clip, tes: model.GETModel(clip, tes, K, grad_from_block=grad_from_block, head=HEAD),
        lambda clip, tes: ReferenceGETModel(clip, tes, K, grad_from_block=grad_from_block,
                                            head=HEAD))


def stage1_twins():
    return twin_models(model.TESStage, ReferenceTESStage)


def stage2_loss(net, b: dict):
    return dual_branch_loss(net(b["images"]), b["labels"], b["labelled"], teacher_temp=0.05)


def stage1_loss(stage, b: dict):
    f, t = stage(b["images"])
    return tes_loss(f, t, 100.0, b["labels"].clamp(max=2), b["labelled"], CLASS_TEXT)


def gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same(a: dict, b: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


def one_step(models: dict, loss_fn) -> tuple[dict, dict]:
    """{path: loss terms} and {path: parameter gradients} of one backward pass per path."""
    b, parts, grads = batch(), {}, {}
    for path, net in models.items():
        loss, components = loss_fn(net, b)
        loss.backward()
        parts[path] = {"total": loss.detach(), **components}
        grads[path] = gradients(net)
    return parts, grads


@pytest.mark.parametrize("grad_from_block", [1, 2, 3])
def test_stage2_step_losses_and_gradients_match(grad_from_block):
    parts, grads = one_step(stage2_twins(grad_from_block), stage2_loss)
    assert_same(parts[OPTIMISED], parts[REFERENCE])
    assert_same(grads[OPTIMISED], grads[REFERENCE])
    expected = {f"clip.visual.transformer.resblocks.{grad_from_block}.mlp.c_fc.weight",
                "text_map.weight", "head.weight_v"}
    assert expected <= grads[OPTIMISED].keys()


def test_stage1_step_losses_and_gradients_match():
    parts, grads = one_step(stage1_twins(), stage1_loss)
    assert_same(parts[OPTIMISED], parts[REFERENCE])
    assert set(grads[OPTIMISED]) == {"tes.projector.weight", "tes.projector.bias"}
    assert_same(grads[OPTIMISED], grads[REFERENCE])


@pytest.mark.parametrize("stage", [1, 2])
def test_sgd_steps_give_the_same_trainable_weights(stage):
    """Three SGD steps (the GET optimiser) on three batches: after them the trainable blocks
    differ from the frozen copies both paths keep, which must not change the text branch."""
    models = stage1_twins() if stage == 1 else stage2_twins(grad_from_block=2)
    loss_fn = stage1_loss if stage == 1 else stage2_loss
    weights, losses = {}, {}
    for path, net in models.items():
        start = {k: v.clone() for k, v in net.trainable_state_dict().items()}
        optimizer = torch.optim.SGD(net.trainable_parameters(), lr=0.1, momentum=0.9,
                                    weight_decay=5e-5)
        losses[path] = []
        for step in range(3):
            loss, _ = loss_fn(net, batch(seed=10 + step))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses[path].append(loss.detach())
        weights[path] = net.trainable_state_dict()
        assert any(not torch.equal(start[k], v) for k, v in weights[path].items())
    torch.testing.assert_close(torch.stack(losses[OPTIMISED]), torch.stack(losses[REFERENCE]),
                               rtol=1e-5, atol=1e-6)
    assert_same(weights[OPTIMISED], weights[REFERENCE], rtol=1e-4, atol=1e-5)
