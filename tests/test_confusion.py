"""Confusion matrices (views/confusion.py): the counts against an independent count, the matching
against brute force and against the reported accuracy, the most confused pairs on a hand-made
case, the heat map (a real image, old and new blocks marked, legible at 200 classes within its
size cap), and what a tiny run of train.py and report.py over it write; nothing without ground
truth."""
from __future__ import annotations

import itertools
import json

import matplotlib.image
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import report
import train
from data.task import task_from_args
from evaluation.accuracy import split_cluster_acc_v2, split_cluster_acc_v2_balanced
from evaluation.evaluate import Evaluator
from errors import InputError
from params import parse_args
from tests import data_fixtures as F
from tests.helpers import run_dirs, tiny_argv
from views import confusion
from views.confusion import Confused, confusion_matrix, most_confused

HEADS = ("visual", "text", "fused")
SPLITS = ("train_unlabelled", "test")


def brute_counts(y_true, y_pred, num_classes: int, num_clusters: int) -> np.ndarray:
    counts = np.zeros((num_classes, num_clusters), dtype=np.int64)
    np.add.at(counts, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return counts


def names(n: int) -> list[str]:
    return [f"class{i}" for i in range(n)]


# ------------------------------------------------------------------ the matrix and its matching
def test_counts_and_matching_equal_brute_force_and_the_reported_accuracy():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 4, 60)
    y_pred = np.array([3, 0, 4, 1])[y_true]  # clusters 3, 0, 4, 1 hold classes 0-3; cluster 2 none
    noisy = rng.random(60) < 0.3
    y_pred[noisy] = rng.integers(0, 5, noisy.sum())
    counts = brute_counts(y_true, y_pred, 4, 5)
    # Every one-to-one assignment of the 4 classes to 4 of the 5 clusters; the best is unique.
    totals = {p: sum(counts[t, c] for t, c in enumerate(p)) for p in itertools.permutations(range(5), 4)}
    best = max(totals.values())
    (assignment,) = [p for p, total in totals.items() if total == best]

    m = confusion_matrix(y_true, y_pred, names(4), num_old=2, num_clusters=5)
    assert m.clusters[:4] == list(assignment) and m.column_class == [0, 1, 2, 3, None]
    np.testing.assert_array_equal(m.counts, counts[:, m.clusters])
    assert m.diagonal().sum() == best and np.all(np.diag(m.counts) == m.diagonal())
    assert m.blocks() == (2, 4) and m.num_old == 2
    mask = y_true < 2
    assert m.accuracy("v2") == pytest.approx(split_cluster_acc_v2(y_true, y_pred, mask)[0], abs=1e-12)
    assert m.accuracy("v2b") == pytest.approx(split_cluster_acc_v2_balanced(y_true, y_pred, mask)[0], abs=1e-12)


def test_a_perfect_result_is_diagonal_and_empty_rows_and_columns_are_left_out():
    y_true = np.array([0, 0, 1, 2, 2, 2, 4, 4])  # class 3 absent from this split
    y_pred = np.array([5, 5, 0, 7, 7, 7, 2, 2])  # 8 clusters, 4 of them used
    m = confusion_matrix(y_true, y_pred, names(5), num_old=2, num_clusters=8)
    assert m.classes == ["class0", "class1", "class2", "class4"] and m.clusters == [5, 0, 7, 2]
    np.testing.assert_array_equal(m.counts, np.diag([2, 1, 3, 2]))
    assert m.accuracy() == 1.0 and m.num_old == 2


def test_fewer_clusters_than_classes_leave_a_class_unmatched():
    y_true = np.array([0, 0, 1, 1, 2, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 1, 1])  # K = 2 for 3 classes: class 1 or 2 gets no cluster
    m = confusion_matrix(y_true, y_pred, names(3), num_old=1, num_clusters=2)
    assert m.column_class == [0, 2] and m.diagonal().tolist() == [2, 0, 3]
    assert m.accuracy() == pytest.approx(split_cluster_acc_v2(y_true, y_pred, y_true < 1)[0])
    assert most_confused([m]) == [Confused("class1", "class2", 2, 2)]


def test_most_confused_pairs_on_a_hand_made_case():
    # (class, cluster, images): clusters A..D = 0..3 hold classes a..d, cluster 4 is unmatched.
    cells = [(0, 0, 7), (0, 1, 3), (1, 1, 8), (1, 2, 2), (2, 2, 5), (2, 0, 1), (3, 3, 2), (3, 4, 2), (2, 4, 1)]
    y_true = np.repeat([c for c, _, n in cells], [n for *_, n in cells])
    y_pred = np.repeat([k for _, k, n in cells], [n for *_, n in cells])
    m = confusion_matrix(y_true, y_pred, ["a", "b", "c", "d"], num_old=2, num_clusters=5)
    assert m.column_class == [0, 1, 2, 3, None]
    # The images in the unmatched cluster 4 belong to no pair.
    expected = [Confused("a", "b", 3, 10), Confused("b", "c", 2, 10), Confused("c", "a", 1, 7)]
    assert most_confused([m]) == expected
    assert most_confused([m], top=2) == expected[:2]
    # Pooled over runs: images and class sizes summed.
    assert most_confused([m, m])[0] == Confused("a", "b", 6, 20)
    text = confusion.format_confused(expected)
    assert "a -> b: 3 of 10 images (30.0%)" in text and "c -> a: 1 of 7 images (14.3%)" in text
    table = confusion.pairs_table({"visual": [m], "fused": [m]})
    assert table[0] == "| rank | visual | fused |" and "| 1 | a → b: 3/10 (30%) | a → b: 3/10 (30%) |" in table


# ------------------------------------------------------------------ files and heat maps
def test_saved_counts_load_back_and_a_bad_file_is_refused(tmp_path):
    m = confusion_matrix([0, 1, 1, 2], [1, 0, 2, 2], names(3), num_old=1, num_clusters=3)
    path = tmp_path / "test_fused.json"
    confusion.save(m, path)
    back = confusion.load(path)
    np.testing.assert_array_equal(back.counts, m.counts)
    assert (back.classes, back.clusters, back.column_class, back.num_old) == (
        m.classes, m.clusters, m.column_class, m.num_old)
    assert json.loads(path.read_text())["matched_images"] == m.diagonal().sum()
    record = json.loads(path.read_text())
    record["counts"] = record["counts"][:-1]
    path.write_text(json.dumps(record))
    with pytest.raises(InputError, match="test_fused.json"):
        confusion.load(path)


def test_the_heat_map_is_a_png_with_old_and_new_blocks_marked(tmp_path):
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 6, 120)
    y_pred = np.where(rng.random(120) < 0.8, y_true, rng.integers(0, 8, 120))
    m = confusion_matrix(y_true, y_pred, names(6), num_old=3, num_clusters=8)
    old_columns, matched = m.blocks()
    assert (old_columns, matched) == (3, 6) and len(m.clusters) == 8
    fig = confusion.figure(m, "test / fused")
    ax, bar = fig.axes[:2]
    assert "rows normalised" in bar.get_ylabel()
    lines = {(tuple(line.get_xdata()), tuple(line.get_ydata())) for line in ax.lines}
    assert ((0, 1), (2.5, 2.5)) in lines  # between the old and new classes
    assert {((2.5, 2.5), (0, 1)), ((5.5, 5.5), (0, 1))} <= lines  # old | new | unmatched clusters
    blocks = {t.get_text() for child in ax.child_axes for t in child.get_xticklabels() + child.get_yticklabels()}
    assert blocks == {"old", "new", "unmatched"}

    png = confusion.draw(m, "test / fused", tmp_path / "test_fused.png")
    pixels = matplotlib.image.imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 400
    assert pixels[..., :3].std() > 0.05  # drawn on, not a blank canvas


def test_200_classes_are_labelled_every_few_within_the_size_cap():
    rng = np.random.default_rng(1)
    y_true = np.arange(4000) % 200
    y_pred = np.where(rng.random(4000) < 0.7, y_true, rng.integers(0, 200, 4000))
    m = confusion_matrix(y_true, y_pred, [f"{i:03d}.A_rather_long_bird_name" for i in range(200)], 100, 200)
    fig = confusion.figure(m, "test / visual")
    width, height = fig.get_size_inches()
    cap = confusion.MAP_INCHES[1]
    assert confusion.map_inches(6) < confusion.map_inches(100) < confusion.map_inches(200) == cap
    assert confusion.map_inches(1000) == cap and width <= cap + 4 and height <= cap + 2
    ax = fig.axes[0]
    step = confusion.label_step(200)
    assert step == 4 and list(ax.get_yticks()) == list(range(0, 200, step))
    assert [t.get_text() for t in ax.get_yticklabels()] == [m.classes[i][:confusion.NAME_CHARS]
                                                           for i in range(0, 200, step)]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(m.clusters[i]) for i in range(0, 200, step)]
    assert min(t.get_fontsize() for t in ax.get_yticklabels()) >= 6


# ------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cub_root):
    """A finished tiny run (CUB layout, 3 old + 3 new classes of 200) and the predictions of its
    final evaluation, caught on their way from the model."""
    out = tmp_path_factory.mktemp("confusion")
    caught = {}
    predict = Evaluator.predict

    def catch(self, model, split, loader):
        caught[split] = preds = predict(self, model, split, loader)
        return preds

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Evaluator, "predict", catch)
        metrics = train.main(tiny_argv(out, cub_root, "--epochs", "1"))
    (run_dir,) = run_dirs(out)
    class_names = task_from_args(parse_args(tiny_argv(out, cub_root))).class_names
    return out, run_dir, metrics, caught, class_names


def test_a_run_saves_the_matrices_of_its_final_evaluation(tiny_run):
    _, run_dir, metrics, caught, class_names = tiny_run
    log = (run_dir / "log.txt").read_text()
    for split, head in itertools.product(SPLITS, HEADS):
        m = confusion.load(run_dir / "confusion" / f"{split}_{head}.json")
        y_true, y_pred = caught[split]["target"].numpy(), caught[split][head].numpy()
        counts = brute_counts(y_true, y_pred, len(class_names), len(class_names))
        present = np.flatnonzero(counts.sum(1))
        assert m.classes == [class_names[i] for i in present] and m.num_old == 3
        np.testing.assert_array_equal(m.counts, counts[present][:, m.clusters])
        assert set(np.flatnonzero(counts.sum(0))) <= set(m.clusters)  # every cluster with images
        # An independent optimal matching holds as many images as the matrix's diagonal, which
        # over all images is the reported All accuracy.
        rows, cols = linear_sum_assignment(counts, maximize=True)
        assert m.diagonal().sum() == counts[rows, cols].sum()
        assert m.diagonal().sum() / len(y_true) == pytest.approx(metrics[f"{split}/{head}/all"], abs=1e-12)
        assert m.accuracy() == pytest.approx(metrics[f"{split}/{head}/all"], abs=1e-12)
        assert log.count(f"most confused classes, {split} / {head} ") == 1
        assert confusion.format_confused(most_confused([m])) in log
        pixels = matplotlib.image.imread(run_dir / "confusion" / f"{split}_{head}.png")
        assert pixels.ndim == 3 and pixels[..., :3].std() > 0.01


def test_stage_eval_of_the_checkpoint_saves_the_same_matrices(tiny_run, cub_root):
    out, run_dir, *_ = tiny_run
    train.main(tiny_argv(out, cub_root, "--stage", "eval", "--eval_checkpoint", str(run_dir / "last.pt"),
                         exp_name="eval"))
    (eval_dir,) = run_dirs(out, "eval")
    for split, head in itertools.product(SPLITS, HEADS):
        name = f"{split}_{head}.json"
        again, final = (confusion.load(d / "confusion" / name) for d in (eval_dir, run_dir))
        np.testing.assert_array_equal(again.counts, final.counts)
        assert (eval_dir / "confusion" / f"{split}_{head}.png").is_file()


def test_report_lists_the_pairs_and_redraws_the_matrices(tiny_run, tmp_path):
    _, run_dir, *_ = tiny_run
    report.main([str(run_dir), "--out_dir", str(tmp_path), "--split", "test", "--plots"])
    markdown = (tmp_path / "results.md").read_text()
    assert "## Most confused classes: test" in markdown and "summed over 1 of 1 run(s)" in markdown
    first = {head: most_confused([confusion.load(run_dir / "confusion" / f"test_{head}.json")])[0]
             for head in HEADS}
    assert "| 1 | " + " | ".join(confusion.pair_cell(first[head]) for head in HEADS) + " |" in markdown
    for head in HEADS:
        png = tmp_path / "plots" / "confusion" / "cub_t" / f"{run_dir.name}_test_{head}.png"
        assert png.relative_to(tmp_path).as_posix() in markdown
        assert matplotlib.image.imread(png)[..., :3].std() > 0.01


def test_no_ground_truth_no_matrix(tmp_path):
    root = F.write_folder(tmp_path / "data", "labelled")
    train.main(["--dataset_name", "folder", "--data_root", str(root), "--clip_model", "GET-tiny",
                "--pretrained", "none", "--device", "cpu", "--grad_from_block", "2", "--tes_epochs", "1",
                "--epochs", "1", "--batch_size", "8", "--num_workers", "0", "--num_classes", "5",
                "--exp_root", str(tmp_path / "out"), "--no-progress"])
    (run_dir,) = run_dirs(tmp_path / "out", "get", "folder")
    assert not (run_dir / "confusion").exists()
    log = (run_dir / "log.txt").read_text()
    assert log.count("no confusion matrices: the unlabelled images have no ground truth") == 1
    assert "most confused" not in log
