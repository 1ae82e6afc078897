"""The CUDA tier: what only a GPU exercises, on the project's tiny CLIPs (GET-tiny with random
weights; GET-tiny-digits with weights/GET-tiny-digits.pt for the demo), so nothing is downloaded.

    python -m pytest -m cuda tests/test_gpu.py      # on a CUDA machine; scripts/gpu_check.sh runs it

Without CUDA every test here is collected and skipped, with the reason. With
GET_GPU_TEST_REPORT=PATH each test adds what it found (the attention kernels, the TF32 switches,
the largest differences it allowed) to that JSON file, which bench/gpu_check.py reports.

* the precision policy (backbone.clip_autocast) under CUDA bf16 autocast: CLIP's encoders and the
  TES in bf16; the text mapping, the heads, the fused prediction and the losses in float32
  without TF32, equal to a float64 recomputation, also inside a caller's autocast region;
* the attention kernel that scaled_dot_product_attention runs in each tower (profiler);
* the evaluation cache on the GPU and spilled to pinned host memory: predictions equal to the
  uncached path's;
* torch.compile of the stage-2 model (``--compile``): losses and gradients equal to eager within
  the tolerances stated at the test;
* a short demo on CUDA learns as on the CPU (tests/test_demo.py's thresholds).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# The project's modules are imported in the tests: without CUDA, collecting this file costs only
# torch (bench/gpu_check.py's CPU mode runs it in a fresh process).

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (torch.cuda.is_available() is False)")]

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")  # the tier's device: every tensor it makes goes there
BATCH = 16         # samples per step: 2 * BATCH rows, view 1 then view 2
NUM_CLASSES = 10
TEACHER_TEMP = 0.07

# Float32 against float64 on the same inputs: measured 4e-7 (relative, MLP outputs) and 6e-8
# (absolute, cosine logits) in float32; TF32 gives 5e-4 and 3e-5 to 1e-4, bf16 about 1e-2.
FP32_REL, FP32_COSINE_ABS = 2e-5, 3e-6


def record(key: str, value) -> None:
    """Add ``value`` under ``key`` to the GET_GPU_TEST_REPORT file, when one is named."""
    name = os.environ.get("GET_GPU_TEST_REPORT")
    if not name:
        return
    path = Path(name)
    report = json.loads(path.read_text()) if path.is_file() else {}
    report[key] = value
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")


def tiny_clip(name: str = "GET-tiny"):
    from backbone import load_clip

    torch.manual_seed(0)
    return load_clip(name, None, device=CUDA)


def stage2_model(amp: bool, clip_model: str = "GET-tiny"):
    """GET (model.GETModel) on a random CLIP, its last block trained, as train.py builds it
    (amp: --amp)."""
    from model import GETModel, TextEmbeddingSynthesizer

    clip = tiny_clip(clip_model)
    depth = len(clip.visual.transformer.resblocks)
    return GETModel(clip, TextEmbeddingSynthesizer(clip), NUM_CLASSES, grad_from_block=depth - 1, amp=amp)


def training_batch(image_size: int = 32, batch: int = BATCH, seed: int = 0):
    """(images [2B, 3, S, S], labels [2B], labelled [2B]) on the GPU: half of the samples labelled."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2 * batch, 3, image_size, image_size, generator=g)
    labels = torch.randint(0, NUM_CLASSES // 2, (batch,), generator=g).repeat(2)
    labelled = (torch.arange(batch) % 2 == 0).repeat(2)
    return images.to(CUDA), labels.to(CUDA), labelled.to(CUDA)


def tf32_switches() -> dict:
    switches = {"matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                "float32_matmul_precision": torch.get_float32_matmul_precision(),
                "cudnn.allow_tf32 (convolutions: CLIP's patch embedding, under bf16 autocast)":
                    torch.backends.cudnn.allow_tf32}
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)  # torch >= 2.9
    if precision is not None:
        switches["matmul.fp32_precision"] = precision
    return switches


def assert_no_tf32_in_matmuls() -> dict:
    switches = tf32_switches()
    assert switches["matmul.allow_tf32"] is False, switches
    assert switches["float32_matmul_precision"] == "highest", switches
    assert switches.get("matmul.fp32_precision") in (None, "none", "ieee"), switches
    return switches


def watch(modules: dict[str, nn.Module]):
    """Record, per call of each module, its outputs' dtypes and whether CUDA autocast was on
    where it was called: ({name: [(dtypes, autocast on)]}, the hooks' handles)."""
    seen: dict[str, list[tuple[list[str], bool]]] = {}

    def hook_of(name):
        def hook(module, inputs, output):
            tensors = [output] if isinstance(output, torch.Tensor) else [t for t in output if isinstance(t, torch.Tensor)]
            seen.setdefault(name, []).append((sorted({str(t.dtype) for t in tensors}),
                                              torch.is_autocast_enabled("cuda")))
        return hook

    return seen, [module.register_forward_hook(hook_of(name)) for name, module in modules.items()]


def check_calls(seen: dict, names, dtype: torch.dtype, autocast: bool) -> None:
    for name in names:
        assert seen.get(name), f"{name} never ran"
        for dtypes, autocast_on in seen[name]:
            assert dtypes == [str(dtype)] and autocast_on == autocast, (name, seen[name])


def encoder_modules(clip) -> dict[str, nn.Module]:
    blocks = {f"image encoder block {i}": b for i, b in enumerate(clip.visual.transformer.resblocks)}
    blocks.update({f"text encoder block {i}": b for i, b in enumerate(clip.transformer.resblocks)})
    return blocks


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference|."""
    return ((value.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def absolute_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (value.double() - reference).abs().max().item()


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------

def test_stage2_bf16_encoders_and_fp32_text_map_heads_fused_prediction_and_losses():
    import train  # noqa: F401  (whatever train.py switches on when imported counts too)
    from methods.get import dual_branch_loss

    model = stage2_model(amp=True)
    images, labels, labelled = training_batch()
    encoders = {**encoder_modules(model.clip), "TES projector": model.tes.projector,
                **{f"frozen copy of block {model.grad_from_block + i}": b for i, b in enumerate(model.frozen_tail)}}
    fp32_parts = {"text_map": model.text_map, "head": model.head,
                  **{f"head.mlp.{i}": m for i, m in enumerate(model.head.mlp) if isinstance(m, nn.Linear)}}
    seen, handles = watch({**encoders, **fp32_parts})
    captured = {}
    handles.append(model.tes.register_forward_hook(lambda module, inputs, output: captured.update(tes_out=output)))
    try:
        out = model(images)
    finally:
        for handle in handles:
            handle.remove()

    # CLIP's encoders and the TES run under bf16 autocast; the text map and the head do not.
    check_calls(seen, encoders, torch.bfloat16, autocast=True)
    check_calls(seen, fp32_parts, torch.float32, autocast=False)
    assert captured["tes_out"].dtype == torch.bfloat16
    assert {k: v.dtype for k, v in out.items()} == {k: torch.float32 for k in
                                                     ("v_feat", "v_proj", "v_logits", "t_feat", "t_proj", "t_logits")}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    switches = assert_no_tf32_in_matmuls()

    # The text map and the head equal a float64 recomputation on the same inputs: true fp32.
    head64, text_map64 = copy.deepcopy(model.head).double(), copy.deepcopy(model.text_map).double()
    t_feat64 = text_map64(captured["tes_out"].double())
    v_proj64, v_logits64 = head64(out["v_feat"].double())
    t_proj64, t_logits64 = head64(out["t_feat"].double())
    errors = {"t_feat": relative_error(out["t_feat"], t_feat64),
              "v_proj": relative_error(out["v_proj"], v_proj64), "t_proj": relative_error(out["t_proj"], t_proj64),
              "v_logits (absolute)": absolute_error(out["v_logits"], v_logits64),
              "t_logits (absolute)": absolute_error(out["t_logits"], t_logits64)}
    for name, error in errors.items():
        assert error <= (FP32_COSINE_ABS if "logits" in name else FP32_REL), (name, errors)

    # Inside a caller's bf16 autocast region the heads are still fp32: the same values.
    with torch.autocast("cuda", dtype=torch.bfloat16):
        again = model.heads(out["v_feat"], captured["tes_out"])
    for key in out:
        assert again[key].dtype == torch.float32, key
        torch.testing.assert_close(again[key], out[key], rtol=1e-6, atol=1e-7)

    # The losses: float32, equal to their float64 value on the same outputs.
    loss, terms = dual_branch_loss(out, labels, labelled, TEACHER_TEMP)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in terms.values()), terms
    loss64, terms64 = dual_branch_loss({k: v.detach().double() for k, v in out.items()}, labels, labelled, TEACHER_TEMP)
    loss_errors = {name: abs(terms[name].item() - terms64[name].item()) / max(1.0, abs(terms64[name].item()))
                   for name in terms}
    loss_errors["total"] = abs(loss.item() - loss64.item()) / max(1.0, abs(loss64.item()))
    assert max(loss_errors.values()) <= 1e-4, loss_errors

    # fp32 gradients for what trains, none for the frozen CLIP.
    loss.backward()
    trainable = {id(p) for p in model.trainable_parameters()}
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name

    # The fused prediction: the mean of the heads' softmax, in fp32.
    model.eval()
    pred = model.predict(images[:BATCH])
    fused64 = (F.softmax(pred["v_logits"].double(), dim=-1) + F.softmax(pred["t_logits"].double(), dim=-1)) / 2
    assert pred["fused_probs"].dtype == torch.float32
    fused_error = absolute_error(pred["fused_probs"], fused64)
    assert fused_error <= 1e-6

    record("precision_stage2", {"tf32": switches, "errors_against_float64": errors, "loss_errors": loss_errors,
                                "fused_error": fused_error,
                                "encoder_outputs": "bfloat16", "text_map_head_outputs": "float32"})


def test_stage1_bf16_clip_and_tes_with_fp32_outputs_and_loss():
    from methods.tes import tes_loss
    from model import TESStage, TextEmbeddingSynthesizer

    clip = tiny_clip()
    model = TESStage(clip, TextEmbeddingSynthesizer(clip), amp=True)
    images, labels, labelled = training_batch()
    encoders = {**encoder_modules(clip), "TES projector": model.tes.projector}
    seen, handles = watch(encoders)
    try:
        f, t = model(images)
    finally:
        for handle in handles:
            handle.remove()
    check_calls(seen, encoders, torch.bfloat16, autocast=True)
    assert f.dtype == t.dtype == torch.float32
    class_text = F.normalize(torch.randn(NUM_CLASSES // 2, clip.visual.output_dim, device=CUDA), dim=-1)
    scale = float(clip.logit_scale.exp())
    loss, terms = tes_loss(f, t, scale, labels, labelled, class_text)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in terms.values())
    loss64, terms64 = tes_loss(f.detach().double(), t.detach().double(), scale, labels, labelled, class_text.double())
    errors = {name: abs(terms[name].item() - terms64[name].item()) / max(1.0, abs(terms64[name].item()))
              for name in terms}
    errors["total"] = abs(loss.item() - loss64.item()) / max(1.0, abs(loss64.item()))
    assert max(errors.values()) <= 1e-4, errors
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.tes.projector.parameters())
    assert all(p.grad is None for p in clip.parameters())
    record("precision_stage1", {"tf32": assert_no_tf32_in_matmuls(), "loss_errors": errors})


# --------------------------------------------------------------------------------------------
# Attention kernels
# --------------------------------------------------------------------------------------------

# The profiler's names of scaled_dot_product_attention's kernels (their backward: "_backward").
SDPA_OPS = {"aten::_scaled_dot_product_flash_attention": "flash",
            "aten::_scaled_dot_product_efficient_attention": "efficient",
            "aten::_scaled_dot_product_cudnn_attention": "cudnn",
            "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
            "aten::_scaled_dot_product_attention_math": "math"}
FUSED = {"flash", "efficient", "cudnn"}


def attention_kernels(fn) -> dict:
    """{"forward": {kernel: calls}, "backward": {kernel: calls}} of the attention that fn() runs,
    and the names of every attention-like op seen (for the failure message)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    counts = {"forward": Counter(), "backward": Counter()}
    names = set()
    for event in prof.events():
        if "attention" in event.name:
            names.add(event.name)
        backward = event.name.endswith("_backward")
        base = event.name[:-len("_backward")] if backward else event.name
        if base in SDPA_OPS:
            counts["backward" if backward else "forward"][SDPA_OPS[base]] += 1
    return {"forward": dict(counts["forward"]), "backward": dict(counts["backward"]), "ops": sorted(names)}


@pytest.mark.parametrize("clip_model, batch", [("GET-tiny", BATCH), ("ViT-B-16", 4)])
def test_attention_runs_a_fused_kernel_in_the_image_encoder_and_reports_each_towers(clip_model, batch):
    # ViT-B-16 with random weights: the paper's head size (64), nothing downloaded.
    from backbone import clip_autocast, visual_trunk
    from config import vision_image_size

    model = stage2_model(amp=True, clip_model=clip_model)
    clip, g = model.clip, model.grad_from_block
    images = training_batch(vision_image_size(clip_model), batch)[0]
    embeddings = torch.randn(2 * batch, clip.visual.output_dim, device=CUDA)
    text_layers = len(clip.transformer.resblocks)

    def frozen_blocks():
        with torch.no_grad(), clip_autocast("cuda", True):
            visual_trunk(clip.visual, images, g)

    with torch.no_grad(), clip_autocast("cuda", True):
        tokens = visual_trunk(clip.visual, images, g)

    def trained_block():
        v_feat, _ = model.encode_from(tokens, None)
        v_feat.float().sum().backward()

    def tes_text_frozen():  # stage 2: the frozen TES on the frozen image embedding
        with torch.no_grad(), clip_autocast("cuda", True):
            model.tes(clip, embeddings)

    def tes_text_trained():  # stage 1: gradients flow through the text encoder to the projector
        with clip_autocast("cuda", True):
            model.tes(clip, embeddings.requires_grad_(True)).float().sum().backward()

    found = {name: attention_kernels(fn) for name, fn in (
        ("image encoder, frozen blocks", frozen_blocks), ("image encoder, trained block", trained_block),
        ("TES text encoder, frozen (stage 2)", tes_text_frozen), ("TES text encoder, trained (stage 1)", tes_text_trained))}
    flags = {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")()
             for name in ("flash", "mem_efficient", "cudnn", "math")}
    report = {**found, "sdp_enabled": flags, "device": torch.cuda.get_device_name()}
    path = os.environ.get("GET_GPU_TEST_REPORT")
    if path:
        previous = json.loads(Path(path).read_text()).get("attention", {}) if Path(path).is_file() else {}
        record("attention", {**previous, clip_model: report})
    print(json.dumps({clip_model: report}, indent=1))

    # Every attention call goes through scaled_dot_product_attention: one kernel call per layer run.
    calls = {"image encoder, frozen blocks": g, "image encoder, trained block": model.depth - g,
             "TES text encoder, frozen (stage 2)": text_layers, "TES text encoder, trained (stage 1)": text_layers}
    for name, layers in calls.items():
        assert sum(found[name]["forward"].values()) >= layers, (name, found[name])
    # In bf16 without a mask the image encoder gets a fused kernel (flash, memory-efficient or
    # cuDNN), never the math fallback; the text encoder's causal mask may rule flash out, so its
    # kernels are reported, not required.
    for name in ("image encoder, frozen blocks", "image encoder, trained block"):
        assert set(found[name]["forward"]) <= FUSED, (name, found[name])


# --------------------------------------------------------------------------------------------
# Evaluation cache
# --------------------------------------------------------------------------------------------

def test_eval_cache_on_the_gpu_and_in_pinned_host_memory_predicts_as_without():
    from torch.utils.data import DataLoader, TensorDataset

    from data.samplers import ShardSampler
    from evaluation.cache import EvalCache
    from evaluation.predict import predict_split
    from util.dist import DistInfo

    model = stage2_model(amp=True).eval()
    n, batch = 40, 16  # batches of 16, 16 and 8
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % NUM_CLASSES, torch.arange(n))
    loader = DataLoader(data, batch_size=batch, sampler=ShardSampler(n), pin_memory=True)
    device, info = CUDA, DistInfo()
    reference = predict_split(model, loader, device, info)
    tokens, tes_out = model.frozen_part(next(iter(loader))[0].to(device))
    one_batch = tokens.nbytes + tes_out.nbytes
    free = torch.cuda.mem_get_info(device)[0]
    budgets = {"gpu": min(2**30, free // 4),   # at most half the free memory: kept on the GPU
               "host": 2 * free + 2**30,        # more than half: spilled to pinned host memory
               "prefix": one_batch}             # one batch cached (on the GPU), the others computed
    found = {}
    for name, budget in budgets.items():
        cache = EvalCache(name, budget)
        built = predict_split(model, loader, device, info, cache)   # computes and fills the cache
        cached = predict_split(model, loader, device, info, cache)  # reads it
        for predictions in (built, cached):
            assert predictions.keys() == reference.keys()
            assert all(torch.equal(predictions[k], reference[k]) for k in reference), name
        stored = [t for frozen, _, _ in cache.batches for t in frozen]
        images = sum(len(targets) for _, targets, _ in cache.batches)
        assert images == (batch if name == "prefix" else n), (name, images)
        assert (cache.rest is not None) == (name == "prefix")
        assert all(t.dtype == torch.bfloat16 for t in stored)  # half the fp32 size under --amp
        if name == "host":
            assert cache.device.type == "cpu" and all(t.device.type == "cpu" and t.is_pinned() for t in stored)
        else:
            assert cache.device.type == "cuda" and all(t.is_cuda for t in stored)
        found[name] = {"device": str(cache.device), "images": images, "bytes": cache.size,
                       "pinned": all(t.is_pinned() for t in stored) if name == "host" else None}
    record("eval_cache", found)


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------

def has_c_compiler() -> bool:
    """Triton builds its launchers with the system's C compiler ($CC, gcc or clang)."""
    return any(shutil.which(name) for name in (os.environ.get("CC") or "gcc", "gcc", "clang", "cc"))


def losses_and_grads(net, model, batch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One stage-2 step's loss terms (total included) and the gradient of every trained parameter."""
    from methods.get import dual_branch_loss

    images, labels, labelled = batch
    model.zero_grad(set_to_none=True)
    loss, terms = dual_branch_loss(net(images), labels, labelled, TEACHER_TEMP)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return {"total": loss.item(), **{k: v.item() for k, v in terms.items()}}, grads


def differences(a: tuple, b: tuple) -> tuple[dict[str, float], dict[str, float]]:
    """Per loss term |a - b| / max(1, |b|); per parameter ||grad a - grad b|| / ||grad b||, the
    norm floored at 1e-3 of all the gradients' norm (a gradient that is zero in exact arithmetic,
    rounding noise only, is measured against the whole gradient)."""
    (losses_a, grads_a), (losses_b, grads_b) = a, b
    losses = {k: abs(losses_a[k] - losses_b[k]) / max(1.0, abs(losses_b[k])) for k in losses_b}
    scale = torch.stack([g.norm() for g in grads_b.values()]).norm()
    grads = {k: ((grads_a[k] - grads_b[k]).norm() / torch.maximum(grads_b[k].norm(), 1e-3 * scale)).item()
             for k in grads_b}
    return losses, grads


@pytest.mark.skipif(not has_c_compiler(), reason="torch.compile's Triton kernels need a C compiler "
                                                  "(none found: install gcc or set CC)")
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_compiled_stage2_model_gives_eager_losses_and_gradients(amp):
    # Stated tolerances (differences as ``differences`` measures them). fp32: every loss term
    # within 1e-4 and every parameter's gradient within 1e-3: float32 reordering only. bf16
    # autocast (train.py's default on CUDA): the compiled step may round the encoders' bf16
    # values elsewhere than eager does, so it must stay within 3x of what bf16 autocast itself
    # changes (eager bf16 against eager fp32, the largest over the terms and over the parameters)
    # plus 1e-3, and within 0.1 (loss terms) and 0.3 (gradients) in any case.
    torch._dynamo.reset()
    model = stage2_model(amp=amp)
    batch = training_batch()
    eager = losses_and_grads(model, model, batch)
    compiled = losses_and_grads(torch.compile(model), model, batch)
    loss_diff, grad_diff = differences(compiled, eager)
    found = {"max_loss_difference": max(loss_diff.values()), "max_gradient_difference": max(grad_diff.values()),
             "loss_difference": loss_diff}
    if amp:
        model.amp = False
        bf16_effect = differences(eager, losses_and_grads(model, model, batch))
        model.amp = True
        loss_tolerance = min(3 * max(bf16_effect[0].values()) + 1e-3, 0.1)
        grad_tolerance = min(3 * max(bf16_effect[1].values()) + 1e-3, 0.3)
        found.update(bf16_effect_on_loss=max(bf16_effect[0].values()),
                     bf16_effect_on_gradients=max(bf16_effect[1].values()))
    else:
        loss_tolerance, grad_tolerance = 1e-4, 1e-3
    found.update(loss_tolerance=loss_tolerance, gradient_tolerance=grad_tolerance)
    record(f"compile_{'bf16' if amp else 'fp32'}", found)
    torch._dynamo.reset()
    assert max(loss_diff.values()) <= loss_tolerance, found
    assert max(grad_diff.values()) <= grad_tolerance, {k: v for k, v in grad_diff.items() if v > grad_tolerance}


# --------------------------------------------------------------------------------------------
# The demo on CUDA
# --------------------------------------------------------------------------------------------

def test_short_demo_on_cuda_learns_as_on_the_cpu(tmp_path):
    # tests/test_demo.py's short run (2 + 6 epochs of scripts/run_demo.sh's settings) with
    # --device cuda, so bf16 autocast (--amp's default on CUDA), and its thresholds.
    import math
    from argparse import Namespace

    import numpy as np

    import train
    from bench.demo_seeds import demo_flags
    from data.get_datasets import get_datasets
    from data.task import task_from_args
    from tests.test_demo import chance_accuracy, supcon_chance

    flags = demo_flags() + ["--device", "cuda"]
    metrics = train.main(flags + ["--tes_epochs", "2", "--epochs", "6", "--eval_every", "6",
                                  "--exp_root", str(tmp_path), "--no-progress"])
    (run_dir,) = (tmp_path / "digits").glob("demo-*")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["device"] == "cuda" and config["amp"] is True
    task = task_from_args(Namespace(dataset_name="digits", data_root=None, prop_train_labels=0.5))
    chance = chance_accuracy(np.asarray(get_datasets("digits", None, None, task)[2].targets))
    visual, text = metrics["train_unlabelled/visual/all"], metrics["train_unlabelled/text/all"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["stage"] == "get"][-1]["loss"]
    record("demo_short", {"chance": chance, **{k: v for k, v in metrics.items() if k.startswith("train_unlabelled/")},
                          "distill_acc": [r for r in records if r["stage"] == "tes"][-1]["loss"]["distill_acc"],
                          "last_epoch_loss": {k: v for k, v in last.items() if k.endswith(("info_nce", "supcon"))}})
    assert visual >= 2 * chance, (chance, metrics)
    assert text >= 2 * chance, (chance, metrics)
    assert metrics["train_unlabelled/fused/all"] >= (visual + chance) / 2, (chance, metrics)
    assert metrics["train_unlabelled/agreement/matched"] >= 2 * chance, metrics
    assert [r for r in records if r["stage"] == "tes"][-1]["loss"]["distill_acc"] > 0.5
    batch = int(flags[flags.index("--batch_size") + 1])
    for branch in ("visual", "text"):
        assert last[f"{branch}/info_nce"] < math.log(2 * batch - 1) - 0.3, last
        assert last[f"{branch}/supcon"] < supcon_chance(batch) - 0.6, last
