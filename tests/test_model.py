"""Tests of backbone.py and model.py on the random-init tiny CLIP (CPU, no network).

Each numerical check compares against an independent computation: CLIP's own encoders, the
reference's computation (bench/reference.py), or an explicit float64 formula written here.

    python -m pytest -q tests/test_model.py
"""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import open_clip
import pytest
import torch

import backbone
import config
import engine
import model
from bench.reference import ReferenceGETModel, ReferenceTESStage
from methods.get import dual_branch_loss
from methods.tes import tes_loss
from open_clip.transformer import QuickGELU
from params import parse_args

TINY = "GET-tiny"
PROMPT = "a photo of a small red bird"  # exactly 7 BPE tokens between SOT and EOT
N_WORDS = 7


def make_clip(seed: int = 0) -> open_clip.CLIP:
    torch.manual_seed(seed)
    return backbone.load_clip(TINY, pretrained=None)


@pytest.fixture(scope="module")
def tokenizer():
    return backbone.get_tokenizer(TINY)


def make_tes(clip, tokenizer, seed: int = 1, **kwargs) -> model.TextEmbeddingSynthesizer:
    torch.manual_seed(seed)
    return model.TextEmbeddingSynthesizer(clip, n_words=N_WORDS, tokenizer=tokenizer, **kwargs)


def make_get_pair(tokenizer, grad_from_block: int, **kwargs):
    """Two GET models, optimised (model.py) and reference (bench/reference.py), with equal
    weights."""
    models = []
    for cls in (model.GETModel, ReferenceGETModel):
        clip = make_clip(0)
        tes = make_tes(clip, tokenizer)
        torch.manual_seed(2)
        models.append(cls(clip, tes, num_classes=5, grad_from_block=grad_from_block, **kwargs))
    # As after some training: the trainable blocks now differ from the frozen CLIP that the
    # text branch must keep using.
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in models[0].trainable_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    models[1].load_trainable_state_dict(models[0].trainable_state_dict())
    return models


def images(n: int = 3, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def random_weighted_sum(outputs: dict[str, torch.Tensor], seed: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return sum((torch.randn(v.shape, generator=gen) * v).sum() for _, v in sorted(outputs.items()))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# ------------------------------------------------------------------------------ loading

def test_tiny_clip_architecture_and_frozen():
    clip = make_clip(0)
    visual = clip.visual
    assert visual.image_size == (32, 32) and visual.patch_size == (8, 8)
    assert visual.transformer.width == 64 and len(visual.transformer.resblocks) == 4
    assert visual.transformer.resblocks[0].attn.num_heads == 2
    assert isinstance(visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert clip.token_embedding.weight.shape == (49408, 64) and clip.context_length == 77
    assert clip.transformer.width == 64 and len(clip.transformer.resblocks) == 2
    assert clip.transformer.resblocks[0].attn.num_heads == 2
    assert visual.proj.shape == (64, 32) and clip.text_projection.shape == (64, 32)
    assert not clip.training and not any(m.training for m in clip.modules())
    assert all(not p.requires_grad for p in clip.parameters())
    again = make_clip(0)
    assert all(torch.equal(a, b) for a, b in zip(clip.state_dict().values(),
                                                  again.state_dict().values()))
    assert config.vision_depth(TINY) == 4 and config.vision_depth("ViT-B/16") == 12


def test_vision_depth_rejects_unknown_and_non_vit():
    with pytest.raises(ValueError, match="--clip_model"):
        config.vision_depth("ViT-Nope-99")
    with pytest.raises(ValueError, match="ViT"):
        config.vision_depth("RN50")


def test_load_clip_missing_checkpoint_names_path_and_flag(tmp_path):
    missing = tmp_path / "no_such_clip.pt"
    with pytest.raises(FileNotFoundError) as err:
        backbone.load_clip(TINY, pretrained=str(missing))
    assert str(missing) in str(err.value) and "--pretrained" in str(err.value)


def test_load_clip_download_failure_explains_offline_options(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    # Simulates a machine without internet; load_clip itself runs unchanged.
    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(RuntimeError) as err:
        backbone.load_clip("ViT-B-16", pretrained="openai")
    message = str(err.value)
    assert "--pretrained" in message and "--clip_cache_dir" in message
    assert "network is unreachable" in message


def test_load_clip_local_checkpoint_round_trip(tmp_path):
    source = make_clip(0)
    path = tmp_path / "tiny_clip.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(123)  # a different random init that the file must overwrite
    loaded = backbone.load_clip(TINY, pretrained=str(path))
    expected = source.state_dict()
    assert expected.keys() == loaded.state_dict().keys()
    assert all(torch.equal(expected[k], v) for k, v in loaded.state_dict().items())
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_load_clip_torchscript_archive(tmp_path, tokenizer):
    """OpenAI's original checkpoints are TorchScript archives; a traced tiny CLIP stands in."""
    source = make_clip(0)
    path = tmp_path / "tiny_clip_jit.pt"
    with warnings.catch_warnings():  # tracing is deprecated and noisy; only used to build the file
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(source, (images(2), tokenizer(["a", "b"])), check_trace=False)
    traced.save(str(path))
    torch.manual_seed(123)
    loaded = backbone.load_clip(TINY, pretrained=str(path))
    expected = source.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in loaded.state_dict().items())


# ------------------------------------------------------------------------------ split ViT

@pytest.mark.parametrize("grad_from_block", [0, 1, 3, 4])
def test_split_visual_encoder_equals_clip(grad_from_block):
    clip = make_clip(0)
    visual, x = clip.visual, images(4)
    tokens = backbone.visual_trunk(visual, x, grad_from_block)
    assert tokens.shape == (4, 1 + 16, 64)
    cls = backbone.visual_tail(visual.transformer.resblocks[grad_from_block:], visual.ln_post, tokens)
    with torch.no_grad():
        expected = clip.encode_image(x)
        unprojected = copy.deepcopy(visual)
        unprojected.proj = None  # open_clip then returns the pooled CLS before the projection
        expected_cls = unprojected(x)
    assert torch.equal(cls, expected_cls)
    assert torch.equal(backbone.visual_project(visual, cls), expected)
    whole = backbone.visual_tail(visual.transformer.resblocks, visual.ln_post,
                              backbone.visual_trunk(visual, x, 0))
    assert torch.equal(backbone.visual_project(visual, whole), expected)


# ------------------------------------------------------------------------------ TES

def test_tes_encodes_words_like_clip_text_encoder(tokenizer):
    clip = make_clip(0)
    tes = make_tes(clip, tokenizer)
    ids = tokenizer([PROMPT])
    n_tokens = int((ids[0] != 0).sum()) - 2
    assert n_tokens == N_WORDS, f"the test prompt must have {N_WORDS} tokens, has {n_tokens}"
    assert ids[0, 0] == tokenizer.sot_token_id and ids[0, N_WORDS + 1] == tokenizer.eot_token_id
    with torch.no_grad():
        words = clip.token_embedding(ids[:, 1:N_WORDS + 1])
        torch.testing.assert_close(tes.encode_words(clip, words), clip.encode_text(ids),
                                   atol=1e-5, rtol=0)


def test_tes_keep_mask_equals_text_without_dropped_tokens(tokenizer):
    clip = make_clip(0)
    tes = make_tes(clip, tokenizer)
    ids = tokenizer([PROMPT])[0]
    word_ids = ids[1:N_WORDS + 1].tolist()
    keep = torch.tensor([[1, 1, 1, 1, 1, 1, 1],
                         [1, 0, 1, 0, 0, 1, 1],
                         [0, 0, 0, 0, 0, 0, 1],
                         [0, 1, 1, 1, 1, 1, 0],
                         [1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    reduced = torch.zeros(len(keep), 77, dtype=torch.long)
    for row, mask in enumerate(keep.tolist()):
        kept = [tokenizer.sot_token_id] + [t for t, k in zip(word_ids, mask) if k]
        kept.append(tokenizer.eot_token_id)
        reduced[row, :len(kept)] = torch.tensor(kept)
    with torch.no_grad():
        words = clip.token_embedding(ids[1:N_WORDS + 1]).expand(len(keep), -1, -1)
        torch.testing.assert_close(tes.encode_words(clip, words, keep), clip.encode_text(reduced),
                                   atol=1e-5, rtol=0)


def test_tes_state_dict_holds_only_projector_and_gradients_reach_it(tokenizer):
    clip = make_clip(0)
    tes = make_tes(clip, tokenizer)
    assert set(tes.state_dict()) == {"projector.weight", "projector.bias"}
    assert tes.projector.weight.shape == (N_WORDS * 64, 32)
    out = tes(clip, torch.randn(3, 32))
    assert out.shape == (3, 32)
    random_weighted_sum({"t": out}).backward()
    assert tes.projector.weight.grad.abs().sum() > 0 and tes.projector.bias.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.parameters())


def test_word_dropout_rates_and_masks(tokenizer):
    keep = model.sample_keep_mask(20000, N_WORDS, 0.5, torch.Generator().manual_seed(5))
    assert keep.dtype == torch.bool and keep.shape == (20000, N_WORDS)
    assert bool(keep.any(dim=1).all())
    # A row keeps a word with prob 0.5, plus the rescue of all-dropped rows (prob 0.5**7,
    # then one of the 7 words kept).
    expected = 0.5 + 0.5 ** N_WORDS / N_WORDS
    assert abs(keep.float().mean().item() - expected) < 0.01
    always_drop = model.sample_keep_mask(5000, N_WORDS, 0.99)
    assert bool((always_drop.sum(dim=1) >= 1).all())
    with pytest.raises(ValueError, match="word_drop"):
        model.sample_keep_mask(4, N_WORDS, 1.0)

    clip = make_clip(0)
    tes = make_tes(clip, tokenizer)
    emb = torch.randn(16, 32)
    mask = model.sample_keep_mask(16, N_WORDS, 0.5, torch.Generator().manual_seed(6))
    with torch.no_grad():
        words = tes.projector(emb).unflatten(1, (N_WORDS, 64))
        full = tes.encode_words(clip, words)
        assert torch.equal(tes(clip, emb), full)  # no mask: every word
        dropped = tes(clip, emb, mask)
    assert not mask.all()
    torch.testing.assert_close(dropped, tes.encode_words(clip, words, mask), atol=1e-6, rtol=0)
    assert not torch.allclose(dropped, full)


def test_class_text_embeddings_match_clip(tokenizer):
    clip = make_clip(0)
    names = ["cat", "sea turtle", "red-winged blackbird"]
    emb = backbone.class_text_embeddings(clip, tokenizer, names, template="a photo of a {}",
                                      batch_size=2)
    assert emb.shape == (3, 32) and emb.dtype == torch.float32
    with torch.no_grad():
        for row, name in enumerate(names):
            one = clip.encode_text(tokenizer([f"a photo of a {name}"]))[0].double()
            torch.testing.assert_close(emb[row].double(), one / one.norm(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="{}"):
        backbone.class_text_embeddings(clip, tokenizer, names, template="a photo")


# ------------------------------------------------------------------------------ head

def test_dino_head_structure_init_and_cosine_logits():
    torch.manual_seed(0)
    head = model.DINOHead(48, 7, hidden_dim=512, bottleneck_dim=64)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(48, 512), (512, 512), (512, 64)]
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    big = torch.cat([m.weight.flatten() for m in linears[1:]])
    assert abs(big.std().item() - 0.02) < 0.002 and big.abs().max() <= 2.0
    bound = 1 / math.sqrt(48)  # default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert head.weight_v.abs().max() <= bound and head.weight_v.abs().max() > 0.9 * bound
    assert torch.equal(head.weight_g, torch.ones(7, 1))
    assert "weight_g" not in dict(head.named_parameters())  # the norm g never trains

    x = torch.randn(5, 48)
    z, logits = head(x)
    assert z.shape == (5, 64) and logits.shape == (5, 7)
    xs, vs = x.double().numpy(), head.weight_v.detach().double().numpy()
    expected = np.array([[xs[i] @ vs[k] / (np.linalg.norm(xs[i]) * np.linalg.norm(vs[k]))
                          for k in range(7)] for i in range(5)])
    np.testing.assert_allclose(logits.detach().double().numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(z.detach().numpy(), head.mlp(x).detach().numpy())


# ------------------------------------------------------------------------------ GET model

@pytest.mark.parametrize("use_projection", [False, True])
def test_get_model_equals_reference(tokenizer, use_projection):
    fast, ref = make_get_pair(tokenizer, grad_from_block=2, use_projection=use_projection)
    x = images(4)
    out_fast, out_ref = fast(x), ref(x)
    feat_dim = 32 if use_projection else 64
    assert out_fast["v_feat"].shape == (4, feat_dim) and out_fast["t_feat"].shape == (4, feat_dim)
    assert out_fast["v_proj"].shape == (4, 256) and out_fast["t_logits"].shape == (4, 5)
    for key in out_ref:
        assert rel_err(out_fast[key], out_ref[key]) < 1e-5, key
    random_weighted_sum(out_fast).backward()
    random_weighted_sum(out_ref).backward()
    grads_ref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    grads_fast = {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}
    assert grads_fast.keys() == grads_ref.keys()
    for name, grad in grads_ref.items():
        assert rel_err(grads_fast[name], grad) < 1e-5, name


@pytest.mark.parametrize("grad_from_block", [0, 2, 4])
@pytest.mark.parametrize("get_model", [model.GETModel, ReferenceGETModel])
def test_get_model_gradients_flow_only_into_trainable_parts(tokenizer, grad_from_block,
                                                            get_model):
    clip = make_clip(0)
    tes = make_tes(clip, tokenizer)
    net = get_model(clip, tes, num_classes=5, grad_from_block=grad_from_block)
    random_weighted_sum(net(images())).backward()
    trainable_prefixes = [f"visual.transformer.resblocks.{i}." for i in range(grad_from_block, 4)]
    for name, param in clip.named_parameters():
        if any(name.startswith(p) for p in trainable_prefixes):
            assert param.requires_grad and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name
    for part in (net.text_map, net.head):
        assert all(p.grad.abs().sum() > 0 for p in part.parameters())
    assert all(p.grad is None for p in tes.parameters())
    frozen = ([net.frozen_tail] if get_model is model.GETModel
              else [net.image_clip, net.text_clip])
    for part in frozen:
        assert all(p.grad is None and not p.requires_grad for p in part.parameters())
    with_grad = {id(p) for p in net.parameters() if p.grad is not None}
    assert with_grad == {id(p) for p in net.trainable_parameters()}


def test_get_model_separate_heads_both_train(tokenizer):
    clip = make_clip(0)
    net = model.GETModel(clip, make_tes(clip, tokenizer), num_classes=5, grad_from_block=3,
                         head=model.HeadConfig(shared=False))
    assert net.text_head is not net.head
    out = net(images())
    # Each branch goes through its own head: the text logits are the text head's cosines.
    torch.testing.assert_close(out["t_logits"], net.text_head(out["t_feat"])[1])
    random_weighted_sum(out).backward()
    assert net.head.weight_v.grad.abs().sum() > 0 and net.text_head.weight_v.grad.abs().sum() > 0
    assert "text_head" in net.trainable_modules()


def test_get_model_train_mode_touches_only_trainable_parts(tokenizer):
    clip = make_clip(0)
    tes = make_tes(clip, tokenizer)
    net = model.GETModel(clip, tes, num_classes=5, grad_from_block=2).train()
    blocks = clip.visual.transformer.resblocks
    assert net.training and net.head.training and net.text_map.training
    assert [b.training for b in blocks] == [False, False, True, True]
    assert not clip.training and not clip.visual.ln_post.training and not clip.transformer.training
    assert not tes.training and not net.frozen_tail.training
    # The TES stays in eval mode and gets no word-dropout mask: the text branch is deterministic.
    x = images()
    torch.testing.assert_close(net(x)["t_feat"], net(x)["t_feat"], atol=0, rtol=0)
    net.eval()
    assert not any(m.training for m in net.modules())


@pytest.mark.parametrize("temperature", [None, 0.1])
def test_get_model_predict_fuses_softmax(tokenizer, temperature):
    clip = make_clip(0)
    net = model.GETModel(clip, make_tes(clip, tokenizer), num_classes=5, grad_from_block=3).eval()
    if temperature is None:  # the reference's fusion: softmax of the raw logits
        pred, temperature = net.predict(images()), 1.0
    else:
        pred = net.predict(images(), fuse_temperature=temperature)
    v = pred["v_logits"].double().numpy() / temperature
    t = pred["t_logits"].double().numpy() / temperature
    expected = np.zeros_like(v)
    for i in range(v.shape[0]):
        ev, et = np.exp(v[i] - v[i].max()), np.exp(t[i] - t[i].max())
        expected[i] = (ev / ev.sum() + et / et.sum()) / 2
    np.testing.assert_allclose(pred["fused_probs"].double().numpy(), expected, atol=1e-6)
    assert not pred["fused_probs"].requires_grad


def test_trainable_state_dict_round_trip_and_mismatch(tokenizer):
    fast, ref = make_get_pair(tokenizer, grad_from_block=2)
    state = fast.trainable_state_dict()
    assert {k.split(".")[0] for k in state} == {"clip", "text_map", "head"}
    assert all(k.startswith(("clip.visual.transformer.resblocks.2.",
                             "clip.visual.transformer.resblocks.3.")) for k in state
               if k.startswith("clip."))
    with torch.no_grad():
        fast.text_map.weight.add_(1.0)
        fast.clip.visual.transformer.resblocks[3].mlp.c_fc.bias.add_(1.0)
    ref.load_trainable_state_dict(fast.trainable_state_dict())
    assert torch.equal(ref.text_map.weight, fast.text_map.weight)
    assert torch.equal(ref.clip.visual.transformer.resblocks[3].mlp.c_fc.bias,
                       fast.clip.visual.transformer.resblocks[3].mlp.c_fc.bias)

    clip = make_clip(0)
    other_g = model.GETModel(clip, make_tes(clip, tokenizer), num_classes=5, grad_from_block=3)
    with pytest.raises(ValueError, match="grad_from_block"):
        other_g.load_trainable_state_dict(state)
    clip = make_clip(0)
    other_k = model.GETModel(clip, make_tes(clip, tokenizer), num_classes=6, grad_from_block=2)
    with pytest.raises(ValueError, match="wrong shape"):
        other_k.load_trainable_state_dict(state)


def test_parameter_summary_counts(tokenizer):
    clip = make_clip(0)
    net = model.GETModel(clip, make_tes(clip, tokenizer), num_classes=5, grad_from_block=2)
    rows = net.parameter_summary()
    assert sum(r[2] for r in rows) == sum(p.numel() for p in net.parameters())
    assert sum(r[1] for r in rows) == sum(p.numel() for p in net.parameters() if p.requires_grad)
    by_name = {name: (trainable, total) for name, trainable, total in rows}
    assert by_name["clip.visual"][0] == 0 and by_name["tes"][0] == 0
    assert by_name["head"][0] == by_name["head"][1] > 0
    assert "total" in engine.format_parameter_summary(rows)


def test_get_model_rejects_bad_grad_from_block_and_foreign_tes(tokenizer):
    clip = make_clip(0)
    tes = make_tes(clip, tokenizer)
    with pytest.raises(ValueError, match="grad_from_block"):
        model.GETModel(clip, tes, num_classes=5, grad_from_block=5)
    with pytest.raises(ValueError, match="same CLIP"):
        model.GETModel(backbone.load_clip("GET-tiny-digits", pretrained=None), tes, num_classes=5)


# ------------------------------------------------------------------------------ stage 1

def test_tes_stage_equals_reference_and_trains_projector_only(tokenizer):
    outputs, grads = [], []
    for stage_cls in (model.TESStage, ReferenceTESStage):
        clip = make_clip(0)
        stage = stage_cls(clip, make_tes(clip, tokenizer))
        f, t = stage(images(4))
        assert f.shape == t.shape == (4, 32)
        random_weighted_sum({"t": t}).backward()
        assert all(p.grad is None for p in clip.parameters())
        if stage_cls is ReferenceTESStage:
            assert all(p.grad is None for p in stage.tes_visual.parameters())
        assert [n for n, p in stage.named_parameters() if p.grad is not None] == \
            ["tes.projector.weight", "tes.projector.bias"]
        with torch.no_grad():
            torch.testing.assert_close(f, clip.encode_image(images(4)), atol=0, rtol=0)
        outputs.append((f, t))
        grads.append([p.grad for p in stage.tes.parameters()])
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert rel_err(outputs[0][1], outputs[1][1]) < 1e-6
    for fast, ref in zip(*grads):
        assert rel_err(fast, ref) < 1e-5


# ------------------------------------------------------------------------------ precision

def labelled_batch(n: int = 4) -> dict:
    """Both views of n samples stacked (2n rows), half of them labelled."""
    labels = torch.arange(n).remainder(3).repeat(2)
    labelled = (torch.arange(n) % 2 == 0).repeat(2)
    return {"images": images(2 * n), "labels": labels, "labelled": labelled}


@pytest.mark.parametrize("use_projection", [False, True])
def test_amp_runs_encoders_in_bf16_and_heads_in_fp32(tokenizer, use_projection):
    clip = make_clip(0)
    heads = model.HeadConfig(shared=False, hidden_dim=128, bottleneck_dim=32)
    net = model.GETModel(clip, make_tes(clip, tokenizer), num_classes=5, grad_from_block=2,
                         use_projection=use_projection, head=heads, amp=True)
    x = images(4)
    v_feat, tes_out = net.encode(x)
    assert v_feat.dtype == tes_out.dtype == torch.bfloat16
    out = net(x)
    assert all(v.dtype == torch.float32 for v in out.values()), {k: v.dtype for k, v in out.items()}
    # The text mapping and the heads are not autocast: the fp32 modules on the same float32
    # inputs give exactly the model's outputs.
    assert torch.equal(out["v_feat"], v_feat.float())
    assert torch.equal(out["t_feat"], net.text_map(tes_out.float()))
    for branch, head in (("v", net.head), ("t", net.text_head)):
        proj, logits = head(out[f"{branch}_feat"])
        assert torch.equal(out[f"{branch}_proj"], proj) and torch.equal(out[f"{branch}_logits"], logits)
    # Also inside a caller's autocast region.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wrapped = net(x)
    assert all(torch.equal(wrapped[k], out[k]) for k in out)
    net.eval()
    assert all(v.dtype == torch.float32 for v in net.predict(x).values())


def test_amp_losses_are_float32_and_gradients_finite(tokenizer):
    clip = make_clip(0)
    net = model.GETModel(clip, make_tes(clip, tokenizer), num_classes=5, grad_from_block=2,
                         head=model.HeadConfig(hidden_dim=128, bottleneck_dim=32), amp=True)
    b = labelled_batch()
    loss, components = dual_branch_loss(net(b["images"]), b["labels"], b["labelled"], teacher_temp=0.07)
    assert loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in components.values()), components
    loss.backward()
    for param in net.trainable_parameters():
        assert param.dtype == torch.float32 and param.grad.dtype == torch.float32
        assert torch.isfinite(param.grad).all()


def test_amp_tes_stage_outputs_float32(tokenizer):
    outputs = {}
    for amp in (False, True):
        clip = make_clip(0)
        stage = model.TESStage(clip, make_tes(clip, tokenizer), amp=amp)
        outputs[amp] = stage(images(4))
    f, t = outputs[True]
    assert f.dtype == t.dtype == torch.float32
    assert not torch.equal(t, outputs[False][1])  # autocast was on
    for amp_out, fp32_out in zip(outputs[True], outputs[False]):
        assert rel_err(amp_out, fp32_out) < 0.05
    b = labelled_batch()
    class_text = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    f, t = stage(b["images"])
    loss, components = tes_loss(f, t, 100.0, b["labels"], b["labelled"], class_text)
    assert loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in components.values()), components


# ------------------------------------------------------------------------------ ViT-B/16

def test_tiny_config_registered_at_import():
    assert TINY in open_clip.list_models()
    assert not hasattr(model, "register_tiny_clip")


@pytest.mark.parametrize("use_projection", [False, True])
def test_vit_b16_shapes_on_meta_device(use_projection):
    """The paper's architecture (docs/method.md), built on the meta device: no weights are
    allocated, so this costs no memory and no download."""
    with torch.device("meta"):
        clip = backbone.load_clip("ViT-B-16", pretrained=None, device="meta")
        tes = model.TextEmbeddingSynthesizer(clip)
        net = model.GETModel(clip, tes, num_classes=200, use_projection=use_projection)
    assert all(p.is_meta for p in net.parameters())
    assert (tes.projector.in_features, tes.projector.out_features) == (512, 7 * 512)
    assert clip.visual.transformer.width == 768 and clip.visual.output_dim == 512
    feat = 512 if use_projection else 768
    assert net.feat_dim == feat
    assert (net.text_map.in_features, net.text_map.out_features) == (512, feat)
    linears = [m for m in net.head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(feat, 2048), (2048, 2048),
                                                                  (2048, 256)]
    assert net.head.weight_v.shape == (200, feat) and net.text_head is None
    assert [k for k in net.trainable_modules() if k.startswith("clip.")] == \
        ["clip.visual.transformer.resblocks.11"]
    out = net(torch.empty(2, 3, 224, 224, device="meta"))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "v_feat": (2, feat), "t_feat": (2, feat), "v_proj": (2, 256), "t_proj": (2, 256),
        "v_logits": (2, 200), "t_logits": (2, 200)}
    assert all(v.dtype == torch.float32 for v in out.values())
    f, t = model.TESStage(clip, tes)(torch.empty(2, 3, 224, 224, device="meta"))
    assert f.shape == t.shape == (2, 512)


@pytest.mark.parametrize("name, depth, width, embed, text_width", [
    ("ViT-B-32", 12, 768, 512, 512), ("ViT-L-14", 24, 1024, 768, 768), ("ViT-L-14-336", 24, 1024, 768, 768)])
def test_other_clips_get_their_last_block_and_their_own_widths(name, depth, width, embed, text_width):
    # Built on the meta device: the shapes of both stages' models, no memory, no weights.
    args = parse_args(["--device", "cpu", "--clip_model", name, "--pretrained", "none"])
    assert args.grad_from_block == depth - 1  # the paper trains the last block, whatever the depth
    with torch.device("meta"):  # built there directly, not on the CPU and then moved
        clip = backbone.load_clip(name, None, device="meta")
        tes = model.TextEmbeddingSynthesizer(clip, args.n_words)
    assert tuple(tes.projector.weight.shape) == (args.n_words * text_width, embed)
    projector = {k: torch.empty_like(v) for k, v in tes.projector.state_dict().items()}
    trainable = model.build_get_model(clip, projector, model.GETConfig.from_flags(args, 100)).trainable_state_dict()
    blocks = {key.split(".")[4] for key in trainable if key.startswith("clip.visual.transformer.resblocks.")}
    assert blocks == {str(depth - 1)}
    assert trainable["head.mlp.0.weight"].shape[1] == width  # the visual branch's feature: the ViT's width


@pytest.mark.parametrize("name, why", [
    ("RN50", "plain ViT image encoder"), ("convnext_base", "plain ViT image encoder"),
    ("ViT-B-16-SigLIP", "plain ViT image encoder"), ("ViT-L-14-CLIPA", "pools its image tokens"),
    ("coca_ViT-B-32", "pools its image tokens"), ("ViT-H-14-worldwide", "CLIP's own text transformer"),
    ("roberta-ViT-B-32", "CLIP's own text transformer")])
def test_clips_whose_towers_cannot_be_used_are_refused_from_their_config(name, why, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--clip_model", name, "--device", "cpu"])
    message = capsys.readouterr().err
    assert why in message and "GET supports" in message and "ViT-L-14" in message
    # Every one of them really is another layout: built, the project's own check agrees (the
    # Hugging Face text towers would need the transformers package to be built).
    if "roberta" in name:
        return
    with torch.device("meta"):
        clip = open_clip.create_model(name, pretrained=None, device="meta")
    with pytest.raises(ValueError):
        backbone.check_supported_clip(clip)
