"""The paper's ablations and baseline as flags (--branches, --cico_weight, the stage-1 term
weights), the reported head (--best_metric, final_metrics.json, TensorBoard) and
scripts/run_ablation.sh with report.py --ablation on real runs of the demo."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import backbone
import model
import predict
import train
from errors import CheckpointError
from methods.get import GETStep, dual_branch_loss
from methods.tes import tes_loss
from params import parse_args
from tests.helpers import scalar_tags
from tests.test_losses import ref_branch
from util.dist import DistInfo

REPO = Path(__file__).resolve().parents[1]
K, TEACHER_TEMP, SUP_WEIGHT, MEMAX_WEIGHT = 5, 0.06, 0.35, 1.5


def tiny_clip():
    torch.manual_seed(0)
    return backbone.load_clip("GET-tiny", pretrained=None)


def tiny_tes(clip):
    torch.manual_seed(1)
    return model.TextEmbeddingSynthesizer(clip, n_words=7)


def fixed_batch(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(8, 3, 32, 32, generator=gen)
    labels = torch.tensor([0, 1, 2, 0, 3, 4, 1, 2]).repeat(2)
    labelled = torch.tensor([1, 1, 0, 1, 0, 0, 1, 0], dtype=torch.bool).repeat(2)
    return torch.cat([images, images.flip(0)]), labels, labelled


def step_of(net) -> GETStep:
    weights = {"sup_weight": SUP_WEIGHT, "memax_weight": MEMAX_WEIGHT, "cico_weight": 1.0}
    return GETStep(net, DistInfo(), lambda epoch: TEACHER_TEMP, weights)


def independent_branch_loss(out: dict, key: str, labels, labelled) -> torch.Tensor:
    """SimGCD's branch loss by the loop references of test_losses.py, in float64."""
    return ref_branch(out[f"{key}_logits"].double(), out[f"{key}_proj"].double(), labels.tolist(),
                      labelled.tolist(), TEACHER_TEMP, SUP_WEIGHT, MEMAX_WEIGHT)


def test_visual_branch_is_simgcd_alone_without_any_tes():
    clip = tiny_clip()
    torch.manual_seed(2)
    net = model.GETModel(clip, None, K, grad_from_block=2, branches="visual")
    assert net.tes is None and net.text_map is None and net.frozen_tail is None
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    expected = {f"clip.visual.transformer.resblocks.{i}.{name}" for i in (2, 3)
                for name, _ in clip.visual.transformer.resblocks[i].named_parameters()}
    expected |= {f"head.{name}" for name, _ in net.head.named_parameters()}
    assert trainable == expected  # no text parameter, no text mapping, no second head
    images, labels, labelled = fixed_batch()
    loss, terms = step_of(net)(images, labels, labelled, epoch=0, step=0)
    assert set(terms) == {f"visual/{t}" for t in ("cls", "self_distill", "memax", "info_nce", "supcon", "total")}
    out = net(images)
    assert set(out) == {"v_feat", "v_proj", "v_logits"}
    assert loss.item() == pytest.approx(independent_branch_loss(out, "v", labels, labelled).item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in net.trainable_parameters())
    assert set(net.eval().predict(images)) == {"v_logits"}


def test_text_branch_alone_trains_only_the_text_mapping_and_head():
    clip = tiny_clip()
    net = model.GETModel(clip, tiny_tes(clip), K, grad_from_block=2, branches="text")
    trainable = {name.split(".")[0] for name, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"text_map", "head"}
    images, labels, labelled = fixed_batch()
    loss, terms = step_of(net)(images, labels, labelled, epoch=0, step=0)
    assert {name.split("/")[0] for name in terms} == {"text"}
    out = net(images)
    assert set(out) == {"t_feat", "t_proj", "t_logits"}
    assert loss.item() == pytest.approx(independent_branch_loss(out, "t", labels, labelled).item(), rel=1e-5)
    # Its TES input is the frozen CLIP's image embedding, as GET's text branch.
    with torch.no_grad():
        assert torch.allclose(net.frozen_part(images)[1], net.tes(clip, clip.encode_image(images)), atol=1e-5)


def test_both_branches_is_the_sum_and_cico_weight_only_moves_cico():
    clip = tiny_clip()
    net = model.GETModel(clip, tiny_tes(clip), K, grad_from_block=2)
    images, labels, labelled = fixed_batch()
    out = {k: v.detach() for k, v in net(images).items()}
    totals = {}
    for weight in (1.0, 0.0, 2.5):
        total, terms = dual_branch_loss(out, labels, labelled, TEACHER_TEMP, SUP_WEIGHT, MEMAX_WEIGHT, weight)
        totals[weight] = total.item()
        assert total.item() == pytest.approx(
            (terms["visual/total"] + terms["text/total"] + weight * terms["cico"]).item(), rel=1e-6)
    assert totals[1.0] - totals[0.0] == pytest.approx((totals[2.5] - totals[0.0]) / 2.5, rel=1e-5)
    assert totals[1.0] != totals[0.0]


@pytest.mark.parametrize("off", ["align_weight", "distill_ce_weight", "distill_mse_weight"])
def test_each_stage1_weight_switches_off_exactly_its_term(off):
    gen = torch.Generator().manual_seed(5)
    f, class_text = torch.randn(8, 16, generator=gen), torch.randn(3, 16, generator=gen)
    t = torch.randn(8, 16, generator=gen, requires_grad=True)
    labels, labelled = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.tensor([1, 1, 0, 1, 1, 0, 0, 1]).bool()
    full, parts = tes_loss(f, t, 100.0, labels, labelled, class_text)
    ablated, ablated_parts = tes_loss(f, t, 100.0, labels, labelled, class_text, **{off: 0.0})
    assert {k: v.item() for k, v in parts.items()} == {k: v.item() for k, v in ablated_parts.items()}  # logged as is
    term = {"align_weight": "align", "distill_ce_weight": "distill_ce", "distill_mse_weight": "distill_mse"}[off]
    assert full.item() == pytest.approx(sum(parts[k].item() for k in ("align", "distill_ce", "distill_mse")))
    assert ablated.item() == pytest.approx(full.item() - parts[term].item(), rel=1e-6)
    (grad,) = torch.autograd.grad(ablated, t)
    assert grad.abs().sum() > 0


def test_flags_of_the_ablations_and_the_reported_head():
    base = ["--dataset_name", "herbarium_19"]
    args = parse_args(base)
    assert (args.best_metric, args.memax_weight) == ("train_unlabelled/visual/all", 1.0)
    simgcd = parse_args(base + ["--branches", "visual"])
    assert (simgcd.best_metric, simgcd.memax_weight) == ("train_unlabelled/visual/all", 2.0)  # SimGCD's script
    assert parse_args(["--dataset_name", "cub", "--branches", "visual"]).memax_weight == 2.0
    assert parse_args(base + ["--branches", "text"]).best_metric == "train_unlabelled/text/all"
    for bad, says in ((["--branches", "visual", "--best_metric", "test/fused/all"], "only the visual head"),
                      (["--branches", "visual", "--stage", "tes"], "no stage 1"),
                      (["--branches", "visual", "--stage", "get", "--tes_checkpoint", "x.pt"], "no stage 1"),
                      (["--align_weight", "0", "--distill_ce_weight", "0", "--distill_mse_weight", "0"], "not all 0"),
                      (["--distill_ce_weight", "-1"], "must be >= 0")):
        with pytest.raises(SystemExit):
            parse_args(base + bad)


def logged_losses(run_dir: Path) -> dict[str, list[dict]]:
    """{stage: [the epoch's mean loss terms]} of metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stages: dict[str, list[dict]] = {}
    for record in records:
        stages.setdefault(record["stage"], []).append(record["loss"])
    return stages


def test_run_ablation_rows_and_their_table(tmp_path):
    """Two rows of scripts/run_ablation.sh on the demo, one seed, a few steps; the runs show
    what each row changed, and report.py --ablation tables them."""
    flags = ["--epochs", "1", "--tes_epochs", "1", "--max_steps_per_epoch", "2", "--exp_root", str(tmp_path)]
    result = subprocess.run(["bash", "scripts/run_ablation.sh", "digits", "1", *flags], cwd=REPO, text=True,
                            capture_output=True, timeout=300,
                            env={**os.environ, "ROWS": "simgcd get-no-align", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (simgcd,) = (tmp_path / "digits").glob("ablation-simgcd-seed0-*")
    (no_align,) = (tmp_path / "digits").glob("ablation-get-no-align-seed0-*")

    # SimGCD on CLIP: no stage 1, no TES anywhere, the visual branch's terms alone.
    assert not (simgcd / "tes.pt").exists() and not (simgcd / "tes_last.pt").exists()
    state = torch.load(simgcd / "last.pt", map_location="cpu", weights_only=True)
    assert "tes_projector" not in state and not any(k.startswith(("text_map", "text_head")) for k in state["model"])
    losses = logged_losses(simgcd)
    assert set(losses) == {"get"} and all(k == "total" or k.startswith("visual/") for k in losses["get"][0])
    assert losses["get"][0]["total"] == pytest.approx(losses["get"][0]["visual/total"], rel=1e-5)
    final = json.loads((simgcd / "final_metrics.json").read_text())
    assert final["reported"]["head"] == "visual" and not any("/text/" in k or "/fused/" in k for k in final)
    tags = scalar_tags(simgcd)
    assert {"accuracy/train_unlabelled/all", "eval/train_unlabelled/visual/all"} <= tags
    # Its checkpoint, without a TES, evaluates again; predictions (GET's fused clusters) refuse it.
    again = train.main(["--dataset_name", "digits", "--clip_model", "GET-tiny-digits", "--pretrained",
                        str(REPO / "weights" / "GET-tiny-digits.pt"), "--device", "cpu", "--num_workers", "0",
                        "--stage", "eval", "--eval_checkpoint", str(simgcd / "last.pt"),
                        "--exp_root", str(tmp_path / "eval"), "--no-progress"])
    assert again["train_unlabelled/visual/all"] == final["train_unlabelled/visual/all"]
    with pytest.raises(CheckpointError, match="--branches visual run"):
        predict.main(["--checkpoint", str(simgcd / "last.pt"), "--images", str(tmp_path), "--out",
                      str(tmp_path / "p.csv"), "--pretrained", str(REPO / "weights" / "GET-tiny-digits.pt")])

    # Without the alignment term: stage 1's total is the distillation alone, align still logged;
    # stage 2 is GET's, with CICO.
    losses = logged_losses(no_align)
    tes, get = losses["tes"][0], losses["get"][0]
    assert tes["align"] > 0 and tes["total"] == pytest.approx(tes["distill_ce"] + tes["distill_mse"], rel=1e-5)
    assert get["total"] == pytest.approx(get["visual/total"] + get["text/total"] + get["cico"], rel=1e-5)
    final = json.loads((no_align / "final_metrics.json").read_text())
    assert final["reported"]["all"] == final["train_unlabelled/visual/all"]

    table = (tmp_path / "digits" / "ablation_report" / "results.md").read_text()
    assert table in result.stdout
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ablation-")}
    assert "--branches visual" in rows["ablation-simgcd"] and "--align_weight 0.0" in rows["ablation-get-no-align"]
    for name, run in (("ablation-simgcd", simgcd), ("ablation-get-no-align", no_align)):
        all_acc = json.loads((run / "final_metrics.json").read_text())["train_unlabelled/visual/all"]
        assert f"| {100 * all_acc:.1f} |" in rows[name]
