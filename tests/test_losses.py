"""Numerical tests of the GET losses (methods/) against independent float64 references.

The references below loop over rows / classes and build every softmax by hand from
exp / sum, so they share no code path with methods/. Run:
    python -m pytest -q tests/test_losses.py
"""
from __future__ import annotations

import math

import pytest
import torch

from methods.get import cico_loss, dual_branch_loss
from methods.simgcd import (
    branch_loss,
    info_nce,
    mean_entropy_regulariser,
    self_distillation,
    supcon,
    supervised_ce,
    teacher_temperature,
)
from methods.tes import tes_alignment_loss, tes_distill_loss, tes_loss

B = 4  # samples per batch -> 2B = 8 rows
K = 5  # classes
D = 6  # feature width


# ----------------------------------------------------------------------------- references
def ref_log_softmax(row: torch.Tensor) -> torch.Tensor:
    """log softmax of a 1-D tensor written out by hand (max shift, exp, sum, log)."""
    shift = row.max().detach()
    return row - shift - torch.log(torch.exp(row - shift).sum())


def ref_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of two 1-D vectors."""
    return (a * b).sum() / (torch.sqrt((a * a).sum()) * torch.sqrt((b * b).sum()))


def ref_unit(a: torch.Tensor) -> torch.Tensor:
    """a / ||a|| for a 1-D vector."""
    return a / torch.sqrt((a * a).sum())


def ref_ce(logits: torch.Tensor, labels: list[int], rows: list[int]) -> torch.Tensor:
    """Mean over ``rows`` of -log softmax(logits[i])[labels[i]]."""
    return sum(-ref_log_softmax(logits[i])[labels[i]] for i in rows) / len(rows)


def ref_self_distill(logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """Two-view cross distillation: teacher of view a on student of view b, a != b."""
    n = logits.shape[0] // 2
    total = 0.0
    for a, b in ((0, 1), (1, 0)):
        term = 0.0
        for r in range(n):
            teacher = torch.exp(ref_log_softmax(logits[a * n + r].detach() / teacher_temp))
            student = ref_log_softmax(logits[b * n + r] / 0.1)
            term = term - (teacher * student).sum()
        total = total + term / n
    return total / 2


def ref_memax(logits: torch.Tensor) -> torch.Tensor:
    """log K - H(mean softmax(logits / 0.1)), with 0 log 0 = 0."""
    probs = [torch.exp(ref_log_softmax(row / 0.1)) for row in logits]
    mean = sum(probs) / len(probs)
    entropy = -sum(p * torch.log(p) for p in mean if p > 0)
    return math.log(logits.shape[1]) - entropy


def ref_info_nce(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """SimCLR loss: positive = other view of the same sample, denominator = all rows but i."""
    n = z.shape[0]
    total = 0.0
    for i in range(n):
        positive = (i + n // 2) % n
        others = [j for j in range(n) if j != i]
        sims = torch.stack([ref_cos(z[i], z[j]) / temperature for j in others])
        total = total - ref_log_softmax(sims)[others.index(positive)]
    return total / n


def ref_supcon(z: torch.Tensor, labels: list[int], temperature: float = 0.07) -> torch.Tensor:
    """SupCon averaged over anchors that have a positive; 0 if none has."""
    n = z.shape[0]
    per_anchor = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        positives = [j for j in others if labels[j] == labels[i]]
        if not positives:
            continue
        sims = torch.stack([ref_cos(z[i], z[j]) / temperature for j in others])
        log_prob = ref_log_softmax(sims)
        per_anchor.append(-sum(log_prob[others.index(p)] for p in positives) / len(positives))
    if not per_anchor:
        return torch.zeros((), dtype=torch.float64)
    return sum(per_anchor) / len(per_anchor)


def ref_cico(
    v: torch.Tensor, t: torch.Tensor, labels: list[int], labelled: list[bool], temp: float = 0.4
) -> torch.Tensor:
    """CICO by loops: per-class anchors of raw labelled features (detached), then the two CEs."""
    classes = sorted({labels[i] for i in range(len(labels)) if labelled[i]})
    if not classes:
        return torch.zeros((), dtype=torch.float64)

    def anchor(feat: torch.Tensor, c: int) -> torch.Tensor:
        rows = [feat[i].detach() for i in range(len(labels)) if labelled[i] and labels[i] == c]
        return sum(rows) / len(rows)

    anchors_v = [anchor(v, c) for c in classes]
    anchors_t = [anchor(t, c) for c in classes]
    total = 0.0
    for i in range(v.shape[0]):
        log_qv = ref_log_softmax(torch.stack([ref_cos(v[i], a) / temp for a in anchors_v]))
        log_qt = ref_log_softmax(torch.stack([ref_cos(t[i], a) / temp for a in anchors_t]))
        total = total - (torch.exp(log_qt).detach() * log_qv).sum()
        total = total - (torch.exp(log_qv).detach() * log_qt).sum()
    return total / v.shape[0]


def ref_branch(
    logits: torch.Tensor, z: torch.Tensor, labels: list[int], labelled: list[bool],
    teacher_temp: float, sup_weight: float, memax_weight: float,
) -> torch.Tensor:
    """SimGCD branch loss assembled from the reference terms."""
    rows = [i for i in range(len(labels)) if labelled[i]]
    cls = ref_ce(logits / 0.1, labels, rows)
    lab_z = torch.stack([z[i] for i in rows])
    sup = ref_supcon(lab_z, [labels[i] for i in rows])
    unsup = ref_self_distill(logits, teacher_temp) + memax_weight * ref_memax(logits)
    return (1 - sup_weight) * (unsup + ref_info_nce(z)) + sup_weight * (cls + sup)


# ----------------------------------------------------------------------------- fixtures
def make_batch(seed: int, labelled_samples: list[int], classes: list[int]):
    """Labels / mask [2B] for B samples, views stacked; labels of unlabelled rows are -1."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.full((B,), -1, dtype=torch.long)
    mask = torch.zeros(B, dtype=torch.bool)
    for sample, cls in zip(labelled_samples, classes):
        labels[sample] = cls
        mask[sample] = True
    return gen, labels.repeat(2), mask.repeat(2)


def leaf(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """A float64 leaf tensor requiring grad."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()


def grads_match(loss_a: torch.Tensor, loss_b: torch.Tensor, tensor: torch.Tensor) -> None:
    """Assert both losses have the same gradient w.r.t. ``tensor``, and that it is finite."""
    (grad_a,) = torch.autograd.grad(loss_a, tensor, retain_graph=True)
    (grad_b,) = torch.autograd.grad(loss_b, tensor, retain_graph=True)
    assert torch.isfinite(grad_a).all()
    torch.testing.assert_close(grad_a, grad_b)


# ----------------------------------------------------------------------------- stage 1
@pytest.mark.parametrize("scale", [100.0, torch.tensor(math.log(100.0)).exp()])
def test_alignment_is_sum_of_both_directions(scale):
    gen = torch.Generator().manual_seed(0)
    f, t = leaf(gen, 2 * B, D), leaf(gen, 2 * B, D)
    s = float(scale)
    logits = torch.stack([torch.stack([s * ref_cos(f[i], t[j]) for j in range(2 * B)])
                          for i in range(2 * B)])
    rows = list(range(2 * B))
    expected = ref_ce(logits, rows, rows) + ref_ce(logits.T, rows, rows)
    loss, parts = tes_alignment_loss(f, t, scale)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(parts["align"], expected.detach())
    grads_match(loss, expected, t)


def test_distill_ce_and_squared_error():
    gen, labels, mask = make_batch(1, labelled_samples=[0, 2], classes=[3, 1])
    t = leaf(gen, 2 * B, D)
    class_text = torch.nn.functional.normalize(torch.randn(K, D, generator=gen,
                                                           dtype=torch.float64), dim=1)
    rows = [i for i in range(2 * B) if mask[i]]
    ce = sum(-ref_log_softmax(torch.stack([(ref_unit(t[i]) * class_text[k]).sum()
                                           for k in range(K)]))[labels[i]] for i in rows)
    sq = sum(((ref_unit(t[i]) - class_text[labels[i]]) ** 2).sum() for i in rows)
    loss, parts = tes_distill_loss(t, labels, mask, class_text)
    torch.testing.assert_close(parts["distill_ce"], (ce / len(rows)).detach())
    torch.testing.assert_close(parts["distill_mse"], (sq / len(rows)).detach())
    grads_match(loss, (ce + sq) / len(rows), t)


def test_distill_accuracy_counts_labelled_rows_nearest_to_their_class_text():
    # Class texts are the unit axes e0..e4 (scaled: only the direction matters). Labelled
    # samples 0 (class 3) and 2 (class 1) give rows 0, 2 (view 1) and 4, 6 (view 2).
    _, labels, mask = make_batch(0, labelled_samples=[0, 2], classes=[3, 1])
    class_text = 3.0 * torch.eye(K, D, dtype=torch.float64)
    t = torch.zeros(2 * B, D, dtype=torch.float64)
    t[0, 3] = 2.0                   # nearest e3, its class: hit
    t[2, 1], t[2, 2] = 1.0, 0.9     # nearest e1, its class: hit
    t[4, 0] = 1.0                   # nearest e0, class 3: miss
    t[6, 2] = 1.0                   # nearest e2, class 1: miss
    t[[1, 3, 5, 7]] = torch.tensor([1.0, 0, 0, 0, 0, 0], dtype=torch.float64)  # unlabelled
    t.requires_grad_()
    loss, parts = tes_distill_loss(t, labels, mask, class_text)
    assert parts["distill_acc"].item() == 0.5  # 2 hits out of 4 labelled rows
    assert not parts["distill_acc"].requires_grad
    # A measurement only: the loss is distill_ce + distill_mse.
    torch.testing.assert_close(loss.detach(), parts["distill_ce"] + parts["distill_mse"])


def test_tes_loss_total_and_no_labelled_rows():
    gen, labels, mask = make_batch(2, labelled_samples=[], classes=[])
    f, t = leaf(gen, 2 * B, D), leaf(gen, 2 * B, D)
    class_text = torch.nn.functional.normalize(torch.randn(K, D, dtype=torch.float64), dim=1)
    total, parts = tes_loss(f, t, 100.0, labels, mask, class_text)
    assert set(parts) == {"align", "distill_ce", "distill_mse", "distill_acc"}
    assert parts["distill_ce"] == 0 and parts["distill_mse"] == 0 and parts["distill_acc"] == 0
    torch.testing.assert_close(total, tes_alignment_loss(f, t, 100.0)[0])
    total.backward()
    assert torch.isfinite(t.grad).all() and torch.isfinite(f.grad).all()

    _, labels, mask = make_batch(2, labelled_samples=[1], classes=[4])
    total, parts = tes_loss(f, t, 100.0, labels, mask, class_text)
    loss_terms = ("align", "distill_ce", "distill_mse")  # distill_acc is logged, not optimised
    torch.testing.assert_close(total.detach(), sum(parts[name] for name in loss_terms))


# ----------------------------------------------------------------------------- simgcd terms
def test_supervised_ce_on_labelled_rows_only():
    gen, labels, mask = make_batch(3, labelled_samples=[1, 3], classes=[0, 4])
    logits = leaf(gen, 2 * B, K)
    rows = [i for i in range(2 * B) if mask[i]]
    expected = ref_ce(logits / 0.1, labels.tolist(), rows)
    loss, parts = supervised_ce(logits, labels, mask)
    assert set(parts) == {"cls"}
    torch.testing.assert_close(loss, expected)
    grads_match(loss, expected, logits)

    _, labels, mask = make_batch(3, labelled_samples=[], classes=[])
    loss, _ = supervised_ce(logits, labels, mask)
    assert loss == 0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_teacher_temperature_schedule():
    assert teacher_temperature(0) == pytest.approx(0.07)
    assert teacher_temperature(29) == pytest.approx(0.04)
    assert teacher_temperature(15) == pytest.approx(0.07 - 0.03 * 15 / 29)
    assert teacher_temperature(30) == pytest.approx(0.04)
    assert teacher_temperature(100) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="epoch"):
        teacher_temperature(-1)


@pytest.mark.parametrize("epoch", [0, 15, 29, 100])
def test_self_distillation_over_schedule(epoch):
    gen = torch.Generator().manual_seed(4 + epoch)
    logits = leaf(gen, 2 * B, K)
    temp = teacher_temperature(epoch)
    expected = ref_self_distill(logits, temp)
    loss, parts = self_distillation(logits, temp)
    assert set(parts) == {"self_distill"}
    torch.testing.assert_close(loss, expected)
    # The teacher is detached: only the student path contributes to the gradient.
    grads_match(loss, expected, logits)


def test_mean_entropy_regulariser_limits_and_formula():
    uniform_mean = torch.eye(K, dtype=torch.float64) * 30.0  # each row one-hot on its own class
    assert abs(mean_entropy_regulariser(uniform_mean)[0].item()) < 1e-9

    one_hot = torch.zeros(2 * B, K, dtype=torch.float64)
    one_hot[:, 2] = 1000.0  # every row certain of class 2: softmax underflows to exact 0
    one_hot.requires_grad_()
    loss, _ = mean_entropy_regulariser(one_hot)
    assert loss.item() == pytest.approx(math.log(K))
    loss.backward()
    assert torch.isfinite(one_hot.grad).all()

    gen = torch.Generator().manual_seed(5)
    logits = leaf(gen, 2 * B, K)
    expected = ref_memax(logits)
    loss, parts = mean_entropy_regulariser(logits)
    assert set(parts) == {"memax"}
    torch.testing.assert_close(loss, expected)
    grads_match(loss, expected, logits)


def test_info_nce_matches_loop():
    gen = torch.Generator().manual_seed(6)
    z = leaf(gen, 2 * B, D, scale=3.0)
    expected = ref_info_nce(z)
    loss, parts = info_nce(z)
    assert set(parts) == {"info_nce"}
    torch.testing.assert_close(loss, expected)
    grads_match(loss, expected, z)


@pytest.mark.parametrize("labels", [[0, 1, 0, 2, 0, 1, 0, 2], [3, 3, 1, 2, 3, 3, 1, 0]])
def test_supcon_matches_loop(labels):
    gen = torch.Generator().manual_seed(7)
    z = leaf(gen, len(labels), D)
    expected = ref_supcon(z, labels)
    loss, parts = supcon(z, torch.tensor(labels))
    assert set(parts) == {"supcon"}
    torch.testing.assert_close(loss, expected)
    grads_match(loss, expected, z)


@pytest.mark.parametrize("rows, labels", [(1, [2]), (0, []), (3, [0, 1, 2])])
def test_supcon_without_positive_pairs_is_zero(rows, labels):
    z = torch.randn(rows, D, dtype=torch.float64, requires_grad=True)
    loss, _ = supcon(z, torch.tensor(labels, dtype=torch.long))
    assert loss == 0
    loss.backward()
    assert torch.isfinite(z.grad).all()


# ----------------------------------------------------------------------------- CICO
@pytest.mark.parametrize(
    "samples, classes",
    [([0, 1, 3], [2, 0, 2]),  # class 0 has a single labelled sample (two rows, one per view)
     ([2], [4])],  # one class only: q is 1 everywhere, the loss is 0
)
def test_cico_matches_loop(samples, classes):
    gen, labels, mask = make_batch(8, samples, classes)
    v, t = leaf(gen, 2 * B, D, scale=2.0), leaf(gen, 2 * B, D + 1)
    expected = ref_cico(v, t, labels.tolist(), mask.tolist())
    loss, parts = cico_loss(v, t, labels, mask)
    assert set(parts) == {"cico"}
    torch.testing.assert_close(loss, expected)
    grads_match(loss, expected, v)
    grads_match(loss, expected, t)


def test_cico_anchor_of_single_row():
    """With one labelled ROW (not sample) a class anchor is exactly that row's features."""
    v = torch.randn(2 * B, D, dtype=torch.float64)
    t = torch.randn(2 * B, D, dtype=torch.float64)
    labels = torch.tensor([0, 1, -1, -1, 0, -1, -1, -1])
    mask = labels >= 0
    expected = ref_cico(v, t, labels.tolist(), mask.tolist())
    torch.testing.assert_close(cico_loss(v, t, labels, mask)[0], expected)


def test_cico_without_labelled_rows_is_zero():
    gen, labels, mask = make_batch(9, [], [])
    v, t = leaf(gen, 2 * B, D), leaf(gen, 2 * B, D)
    loss, _ = cico_loss(v, t, labels, mask)
    assert torch.isfinite(loss) and loss == 0
    loss.backward()
    assert torch.isfinite(v.grad).all() and torch.isfinite(t.grad).all()


# ----------------------------------------------------------------------------- combinations
def test_branch_loss_combination():
    gen, labels, mask = make_batch(10, [0, 1, 2], [1, 1, 3])
    logits, z = leaf(gen, 2 * B, K), leaf(gen, 2 * B, D)
    temp = teacher_temperature(7)
    total, parts = branch_loss(logits, z, labels, mask, temp, sup_weight=0.35, memax_weight=2.0)
    expected = ref_branch(logits, z, labels.tolist(), mask.tolist(), temp, 0.35, 2.0)
    torch.testing.assert_close(total, expected)
    grads_match(total, expected, logits)
    grads_match(total, expected, z)
    rows = [i for i in range(2 * B) if mask[i]]
    torch.testing.assert_close(parts["cls"], ref_ce(logits / 0.1, labels.tolist(), rows).detach())
    torch.testing.assert_close(parts["memax"], ref_memax(logits).detach())
    torch.testing.assert_close(parts["info_nce"], ref_info_nce(z).detach())
    lam = 0.35
    by_hand = ((1 - lam) * (parts["self_distill"] + 2.0 * parts["memax"]) + lam * parts["cls"]
               + (1 - lam) * parts["info_nce"] + lam * parts["supcon"])
    torch.testing.assert_close(total.detach(), by_hand)


def make_model_output(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A fake forward dict of the GET model, float64 leaves."""
    widths = {"v_feat": D, "t_feat": D, "v_proj": 3, "t_proj": 3, "v_logits": K, "t_logits": K}
    return {name: leaf(gen, 2 * B, width) for name, width in widths.items()}


def test_get_loss_is_sum_of_parts():
    gen, labels, mask = make_batch(11, [0, 3], [2, 2])
    out = make_model_output(gen)
    temp = teacher_temperature(3)
    total, parts = dual_branch_loss(out, labels, mask, temp, memax_weight=4.0, cico_weight=0.5)
    lab, lm = labels.tolist(), mask.tolist()
    visual = ref_branch(out["v_logits"], out["v_proj"], lab, lm, temp, 0.35, 4.0)
    text = ref_branch(out["t_logits"], out["t_proj"], lab, lm, temp, 0.35, 4.0)
    cico = ref_cico(out["v_feat"], out["t_feat"], lab, lm)
    torch.testing.assert_close(total, visual + text + 0.5 * cico)
    torch.testing.assert_close(parts["visual/total"], visual.detach())
    torch.testing.assert_close(parts["text/total"], text.detach())
    torch.testing.assert_close(parts["cico"], cico.detach())
    expected_keys = {f"{b}/{n}" for b in ("visual", "text")
                     for n in ("cls", "self_distill", "memax", "info_nce", "supcon", "total")}
    assert set(parts) == expected_keys | {"cico"}
    total.backward()
    assert all(torch.isfinite(x.grad).all() for x in out.values())


def test_get_loss_without_labelled_rows_is_finite():
    gen, labels, mask = make_batch(12, [], [])
    out = make_model_output(gen)
    total, parts = dual_branch_loss(out, labels, mask, teacher_temperature(0))
    assert torch.isfinite(total)
    for name in ("visual/cls", "visual/supcon", "text/cls", "text/supcon", "cico"):
        assert parts[name] == 0
    total.backward()
    assert all(torch.isfinite(x.grad).all() for x in out.values())


# ----------------------------------------------------------------------------- float32
def test_float32_follows_input_dtype():
    gen, labels, mask = make_batch(14, [0, 1], [0, 1])
    out = {k: v.detach().float().requires_grad_() for k, v in make_model_output(gen).items()}
    total, _ = dual_branch_loss(out, labels, mask, 0.07)
    assert total.dtype == torch.float32
    out64 = {k: v.detach().double() for k, v in out.items()}
    torch.testing.assert_close(total.double(), dual_branch_loss(out64, labels, mask, 0.07)[0],
                               rtol=1e-4, atol=1e-4)


def test_float32_extreme_inputs_are_finite():
    """Logits far beyond the softmax range (probabilities underflow to 0) give no NaN."""
    gen, labels, mask = make_batch(15, [0, 2], [1, 3])
    out = {k: (v.detach() * 1e4).float().requires_grad_()
           for k, v in make_model_output(gen).items()}
    f, t = (torch.randn(2 * B, D, generator=gen).mul(1e4).requires_grad_() for _ in range(2))
    class_text = torch.nn.functional.normalize(torch.randn(K, D, generator=gen), dim=1)
    stage2, parts2 = dual_branch_loss(out, labels, mask, 0.04)
    stage1, parts1 = tes_loss(f, t, 100.0, labels, mask, class_text)
    assert all(torch.isfinite(v) for v in [stage1, stage2, *parts1.values(), *parts2.values()])
    (stage1 + stage2).backward()
    assert all(torch.isfinite(x.grad).all() for x in [f, t, *out.values()])
