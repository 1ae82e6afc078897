"""bench/clip_cost.py against an independent count: the parameters and the forward FLOPs of a CLIP
ViT written out from the open_clip config alone (no model), for ViT-B-16, ViT-B-32 and the
project's GET-tiny; the towers the project refuses are reported as refused; the script's table
and JSON hold the measured rows. Everything runs on the meta device (no weights)."""
from __future__ import annotations

import json

import open_clip
import pytest

from bench import clip_cost
from config import register_model_configs

MODELS = ("ViT-B-16", "ViT-B-32", "GET-tiny")
TEXT_TOKENS = clip_cost.N_WORDS + 2  # SOT + pseudo words + EOT


@pytest.fixture(scope="module")
def rows() -> dict[str, dict]:
    register_model_configs()
    measured = [clip_cost.measure(name) for name in MODELS]
    clip_cost.add_ratios(measured)
    return {r["model"]: r for r in measured}


def sizes(name: str) -> dict:
    cfg = open_clip.get_model_config(name)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    assert vision.get("mlp_ratio", 4.0) == 4.0 and text.get("mlp_ratio", 4.0) == 4.0  # formulas below
    return {"e": cfg["embed_dim"], "w": vision["width"], "L": vision["layers"],
            "p": vision["patch_size"], "tokens": (vision["image_size"] // vision["patch_size"]) ** 2 + 1,
            "tw": text["width"], "tL": text["layers"], "vocab": text["vocab_size"],
            "context": text["context_length"]}


def block_params(w: int) -> int:
    # attention in-projection 3w^2 + 3w, out-projection w^2 + w, MLP 4w^2 + 4w and 4w^2 + w,
    # two LayerNorms 2 * 2w
    return 12 * w * w + 13 * w


def block_macs(n: int, w: int) -> int:
    # Q, K, V and output projections 4 n w^2; Q K^T and attention x V 2 n^2 w (whatever the
    # number of heads); MLP n w 4w twice
    return 4 * n * w * w + 2 * n * n * w + 8 * n * w * w


@pytest.mark.parametrize("name", MODELS)
def test_parameters_match_the_architecture(rows, name):
    s, r = sizes(name), rows[name]
    w, tw = s["w"], s["tw"]
    # patch conv (no bias), class token, positions, ln_pre; blocks, ln_post, projection
    image = (3 * s["p"] ** 2 * w + w + s["tokens"] * w + 2 * w
             + s["L"] * block_params(w) + 2 * w + w * s["e"])
    text = (s["vocab"] * tw + s["context"] * tw + s["tL"] * block_params(tw) + 2 * tw + tw * s["e"])
    assert (r["image_params"], r["text_params"], r["total_params"]) == (image, text, image + text + 1)
    clip = clip_cost.build_on_meta(name)  # and the plain sum over the built model
    assert r["image_params"] == sum(p.numel() for p in clip.visual.parameters())
    assert r["total_params"] == sum(p.numel() for p in clip.parameters())
    assert r["last_block_params"] == block_params(w)


@pytest.mark.parametrize("name", MODELS)
def test_flops_match_the_hand_formula(rows, name):
    s, r = sizes(name), rows[name]
    n, w = s["tokens"], s["w"]
    patch_macs = (n - 1) * w * 3 * s["p"] ** 2  # patch embedding: one w x 3p^2 product per patch
    image_macs = s["L"] * block_macs(n, w) + patch_macs + w * s["e"]  # + projection of the class token
    text_macs = s["tL"] * block_macs(TEXT_TOKENS, s["tw"]) + s["tw"] * s["e"]
    # 2 FLOPs per multiply-add; the counter leaves out the elementwise work, so the match is
    # exact up to rounding
    assert r["image_flops"] == pytest.approx(2 * image_macs, rel=1e-6)
    assert r["text_flops"] == pytest.approx(2 * text_macs, rel=1e-6)
    # all but the patch embedding are matrix products (97% of ViT-B-32's image FLOPs)
    assert r["image_matmul_share"] == pytest.approx(1 - patch_macs / image_macs, rel=1e-6)
    assert r["text_matmul_share"] == 1.0


def test_sizes_defaults_and_ratios(rows):
    b16, b32 = rows["ViT-B-16"], rows["ViT-B-32"]
    for r in (b16, b32):
        got = (r["image_size"], r["depth"], r["grad_from_block"], r["width"], r["embed_dim"])
        assert got == (224, 12, 11, 768, 512)
        assert r["supported"] and r["refused_because"] is None
    assert b16["image_flops_vs_baseline"] == 1.0
    # ViT-B-16 has 197 tokens, ViT-B-32 50: 3.94x the linear work, a little more for the
    # quadratic attention term (about 3.98x in all)
    ratio = b16["image_flops"] / b32["image_flops"]
    assert ratio == pytest.approx(1 / b32["image_flops_vs_baseline"])
    assert 197 / 50 < ratio < 4.05
    assert b16["text_flops"] == b32["text_flops"]  # the same text tower
    tiny = rows["GET-tiny"]
    assert (tiny["depth"], tiny["grad_from_block"], tiny["width"], tiny["embed_dim"]) == (4, 3, 64, 32)


@pytest.mark.parametrize("name, reason", [
    ("RN50", "ViT image encoder"),  # a ResNet tower
    ("ViT-L-14-CLIPA", "class-token pooling"),  # a ViT pooled another way
])
def test_refused_towers_are_reported_with_check_supported_clips_reason(name, reason):
    r = clip_cost.measure(name)
    assert not r["supported"] and reason in r["refused_because"]
    assert "image_flops" not in r and r["total_params"] > 0


def test_unknown_architecture_is_a_row_with_its_error():
    r = clip_cost.measure("ViT-no-such-model")
    assert set(r) == {"model", "error"} and r["error"]


def test_main_prints_the_table_and_writes_the_rows(tmp_path, capsys):
    path = tmp_path / "cost.json"
    clip_cost.main(["--models", "ViT-B-32,RN50", "--json", str(path)])
    out = capsys.readouterr().out
    assert "2 FLOPs per multiply-add" in out
    assert "| ViT-B-32 | 224 | 12 | 11 | 768 | 512 | 87.8 | 63.4 | 151.3 | 8.82 | 0.25 | 0.682 | yes |" in out
    assert "- RN50: refused: GET needs" in out
    result = json.loads(path.read_text())
    assert [r["model"] for r in result["rows"]] == ["ViT-B-16", "ViT-B-32", "RN50"]  # baseline added
    assert result["rows"][0]["image_flops"] == pytest.approx(35.13e9, rel=1e-3)
