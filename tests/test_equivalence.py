"""The optimised computation (frozen trunk once, one CLIP) against the straightforward one of
the reference (separate full encoders): same GET / TES losses, same parameter gradients, and
the same training run through train.py."""
from __future__ import annotations

import pytest
import torch

import model
import train
from methods.get import get_loss
from methods.tes import tes_loss
from tests.helpers import run_dirs, tiny_argv, trainable_weights

TINY, K, B = "GET-tiny", 6, 4


def batch(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 1, 0, 4]).repeat(2)  # remapped labels; rows of view 1 then view 2
    labelled = torch.tensor([True, True, True, False]).repeat(2)
    return {"images": torch.randn(2 * B, 3, 32, 32, generator=gen), "labels": labels,
            "labelled": labelled}


def twin_models(build):
    """The same model built twice, once per path, from identically seeded CLIP and weights."""
    out = {}
    for shared in (True, False):
        torch.manual_seed(0)
        clip = model.load_clip(TINY, pretrained=None)
        torch.manual_seed(1)
        tes = model.TextEmbeddingSynthesizer(clip, n_words=7)
        torch.manual_seed(2)
        out[shared] = build(clip, tes, shared)
    return out


def gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("grad_from_block", [1, 2, 3])
def test_stage2_step_losses_and_gradients_match(grad_from_block):
    models = twin_models(lambda clip, tes, shared: model.GETModel(
        clip, tes, K, grad_from_block=grad_from_block, shared_trunk=shared))
    b, parts, grads = batch(), {}, {}
    for shared, net in models.items():
        loss, components = get_loss(net(b["images"]), b["labels"], b["labelled"], teacher_temp=0.05)
        loss.backward()
        parts[shared] = {"total": loss.detach(), **components}
        grads[shared] = gradients(net)
    assert_same(parts[True], parts[False])
    assert_same(grads[True], grads[False])
    expected = {f"clip.visual.transformer.resblocks.{grad_from_block}.mlp.c_fc.weight",
                "text_map.weight", "head.weight_v"}
    assert expected <= grads[True].keys()


def test_stage1_step_losses_and_gradients_match():
    models = twin_models(lambda clip, tes, shared: model.TESStage(clip, tes, shared_encoder=shared))
    b, parts, grads = batch(), {}, {}
    class_text = torch.nn.functional.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(5)), dim=-1)
    for shared, stage in models.items():
        f, t = stage(b["images"])
        loss, components = tes_loss(f, t, 100.0, b["labels"].clamp(max=2), b["labelled"], class_text)
        loss.backward()
        parts[shared] = {"total": loss.detach(), **components}
        grads[shared] = gradients(stage)
    assert_same(parts[True], parts[False])
    assert set(grads[True]) == {"tes.projector.weight", "tes.projector.bias"}
    assert_same(grads[True], grads[False])


def test_train_flag_restores_the_straightforward_computation(tmp_path, cub_root):
    shared = train.main(tiny_argv(tmp_path, cub_root, exp_name="shared"))
    straight = train.main(tiny_argv(tmp_path, cub_root, "--no-shared_trunk", exp_name="straight"))
    (a_dir,), (b_dir,) = run_dirs(tmp_path, "shared"), run_dirs(tmp_path, "straight")
    a, b = trainable_weights(a_dir / "last.pt"), trainable_weights(b_dir / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert shared == straight
    assert "ref_image_clip" in (b_dir / "log.txt").read_text()  # the reference's CLIP copies
