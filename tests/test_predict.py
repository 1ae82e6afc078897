"""predict.py: the CSV of a real run's checkpoint (names of the old classes from an optimal
matching on the labelled images, checked by brute force), the naming of new clusters by
candidate names (a tiny model built so that a cluster's pseudo-text embedding is known), and
the errors for unusable input."""
from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import predict
from views import trained_run
import train
from data.augmentations import get_transforms
from data.data_utils import load_image
from backbone import build_clip, get_tokenizer
from data.get_datasets import get_datasets
from data.task import task_from_args
from errors import CheckpointError
from model import GETConfig, GETModel, HeadConfig, TextEmbeddingSynthesizer
from params import parse_args
from runs.checkpoints import task_meta

FLAGS = ["--dataset_name", "digits", "--clip_model", "GET-tiny", "--pretrained", "none", "--device", "cpu",
         "--grad_from_block", "2", "--head_hidden_dim", "64", "--head_bottleneck_dim", "32", "--num_workers", "0",
         "--no-progress"]
NAMES = list(task_from_args(parse_args(FLAGS)).class_names)  # "zero" .. "nine"; old: the first five


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train.main(FLAGS + ["--tes_epochs", "1", "--epochs", "1", "--max_steps_per_epoch", "3", "--batch_size", "16",
                        "--exp_root", str(out), "--exp_name", "p", "--seed", "2"])
    (run,) = (out / "digits").glob("p-*")
    return run


def labelled_images(args) -> tuple[list[np.ndarray], np.ndarray]:
    """The labelled training images of the run (uint8 arrays) and their labels."""
    labelled = get_datasets("digits", None, None, args)[3]["train_labelled"]
    return [labelled.raw.images[i] for i in labelled.uq_idxs], labelled.targets


def run_predict(*argv: str) -> list[dict]:
    out = Path(argv[argv.index("--out") + 1])
    predict.main([*argv, "--device", "cpu", "--num_workers", "0", "--batch_size", "64", "--no-progress"])
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(predict.COLUMNS)
    return rows


def best_matched_count(clusters: list[int], labels: list[int], num_clusters: int, num_old: int) -> int:
    """Brute force over every one-to-one map of the old classes into the clusters."""
    counts = np.zeros((num_clusters, num_old), dtype=int)
    for c, y in zip(clusters, labels):
        counts[c, y] += 1
    return max(sum(counts[c, y] for y, c in enumerate(perm))
               for perm in itertools.permutations(range(num_clusters), num_old))


def save_labelled_images(folder: Path) -> dict[str, int]:
    """The run's labelled training images as PNG (lossless) in nested folders, with a file
    that is not an image; {path relative to ``folder``: label}."""
    images, labels = labelled_images(parse_args(FLAGS))
    truth = {}
    for i, (image, label) in enumerate(zip(images, labels)):
        path = Path(f"class{label}") / ("deeper" if i % 2 else "") / f"{i:04d}.png"
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / path)
        truth[path.as_posix()] = int(label)
    (folder / "notes.txt").write_text("not an image")
    return truth


def check_names_against_brute_force(rows: list[dict], truth: dict[str, int], heads: tuple[str, ...]) -> None:
    """The rows are the labelled images themselves: each head's names must be those of a best
    one-to-one matching of its clusters to the images' classes."""
    assert {row["path"] for row in rows} == set(truth)
    for head in heads:
        clusters = [int(row[f"{head}_cluster"]) for row in rows]
        names = [row[f"{head}_name"] for row in rows]
        assert all(0 <= c < 10 for c in clusters)
        name_of = dict(zip(clusters, names))
        assert len(name_of) == len(set(zip(clusters, names)))  # one name per cluster
        old = {c: n for c, n in name_of.items() if not n.startswith("new_")}
        assert len(set(old.values())) == len(old) and set(old.values()) <= set(NAMES[:5])  # one-to-one
        assert all(n == f"new_{c}" for c, n in name_of.items() if c not in old)
        matched = sum(name == NAMES[truth[row["path"]]] for row, name in zip(rows, names))
        assert matched == best_matched_count(clusters, [truth[r["path"]] for r in rows], 10, 5)


def test_real_checkpoint_names_the_clusters_of_the_labelled_images(run_dir, tmp_path):
    truth = save_labelled_images(tmp_path / "images")
    rows = run_predict("--checkpoint", str(run_dir / "last.pt"), "--images", str(tmp_path / "images"),
                       "--out", str(tmp_path / "out" / "predictions.csv"))
    assert len(rows) == len(truth)
    check_names_against_brute_force(rows, truth, ("fused", "visual", "text"))
    for row in rows:
        assert 0.1 <= float(row["fused_prob"]) <= 1  # at least the uniform 1/K
        assert row["fused_kind"] == ("old" if row["fused_name"] in NAMES[:5] else "new")
        assert row["name_similarity"] == ""


def synthetic_checkpoint(path: Path, image_files: list[Path], candidate: str, seed: int = 3) -> torch.Tensor:
    """A stage-2 checkpoint of a tiny GET model built so that (1) every image's TES output is
    exactly CLIP's text embedding of "a photo of a <candidate>": the projector ignores the image
    and returns the prompt's token embeddings as the pseudo words; (2) image i of
    ``image_files`` falls into cluster i: the classifier's rows are the images' own features,
    and the text branch is silenced (text_map = 0 gives uniform text probabilities).
    Returns the cosine logits [N, N] of the images' visual branch."""
    tokens = get_tokenizer("GET-tiny")([f"a photo of a {candidate}"])[0]
    words = tokens[1:int(tokens.argmax())]  # between start and end of text (the largest id)
    args = parse_args(FLAGS + ["--seed", str(seed), "--n_words", str(len(words))])
    task = task_from_args(args)
    clip = build_clip(args, "cpu")  # the CLIP predict.py rebuilds from the same seed
    tes = TextEmbeddingSynthesizer(clip, n_words=len(words))
    model = GETModel(clip, tes, 10, grad_from_block=2, head=HeadConfig(True, 64, 32)).eval()
    _, test_tf = get_transforms(image_size=32)
    images = torch.stack([test_tf(load_image(p, "test")) for p in image_files])
    with torch.no_grad():
        tes.projector.weight.zero_()
        tes.projector.bias.copy_(clip.token_embedding(words).flatten())
        model.text_map.weight.zero_()
        model.text_map.bias.zero_()
        features = model(images)["v_feat"]
        model.head.weight_v.copy_(features)
        logits = F.normalize(features, dim=-1) @ F.normalize(features, dim=-1).T
    meta = {**task_meta(task, args.clip_model, args.n_words), **GETConfig.from_flags(args, task.num_classes).meta()}
    torch.save({"meta": meta, "stage": "get", "model": model.trainable_state_dict(),
                "tes_projector": tes.projector.state_dict(),
                "args": json.loads(json.dumps(vars(args), default=str))}, path)
    return logits


def test_new_clusters_are_named_by_the_closest_candidate(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for i in range(10):  # ten distinct images, one per cluster
        files.append(tmp_path / "images" / f"img{i}.png")
        files[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(files[-1])
    logits = synthetic_checkpoint(tmp_path / "last.pt", files, "red fox")
    assert (logits - 2 * torch.eye(10)).max() < 0.999  # each image is clearly closest to itself
    candidates = tmp_path / "names.txt"
    candidates.write_text("cat\n\nred fox\nzero\na dog\ncat\n")
    rows = run_predict("--checkpoint", str(tmp_path / "last.pt"), "--images", str(tmp_path / "images"),
                       "--out", str(tmp_path / "predictions.csv"), "--name_candidates", str(candidates))
    assert [row["path"] for row in rows] == [f.name for f in files]
    expected_prob = 0.5 * torch.softmax(logits, dim=1).diagonal() + 0.5 / 10  # text branch: uniform
    kinds = set()
    for i, row in enumerate(rows):
        assert int(row["fused_cluster"]) == i and int(row["visual_cluster"]) == i
        assert float(row["fused_prob"]) == pytest.approx(float(expected_prob[i]), abs=1e-4)
        kinds.add(row["fused_kind"])
        if row["fused_kind"] == "new":
            assert row["fused_name"] == "red fox"
            assert float(row["name_similarity"]) == pytest.approx(1.0, abs=2e-4)
            assert row["visual_name"] == f"new_{i}"  # candidates name the fused clusters only
        else:
            assert row["fused_name"] in NAMES[:5] and row["name_similarity"] == ""
    assert kinds == {"old", "new"}  # 5 old classes matched into 10 clusters: both kinds occur


def test_matching_with_images_spread_over_the_clusters(tmp_path):
    # The real run above has hardly trained: its labelled images fill few clusters. Here the
    # classifier's rows are the features of ten labelled images, so the labelled images spread
    # over the clusters by their nearest prototype and the matching has choices to make.
    truth = save_labelled_images(tmp_path / "images")
    paths = sorted(truth)
    synthetic_checkpoint(tmp_path / "last.pt", [tmp_path / "images" / p for p in paths[::len(paths) // 10][:10]],
                         "red fox")
    rows = run_predict("--checkpoint", str(tmp_path / "last.pt"), "--images", str(tmp_path / "images"),
                       "--out", str(tmp_path / "predictions.csv"))
    assert len({row["fused_cluster"] for row in rows}) >= 6
    check_names_against_brute_force(rows, truth, ("fused", "visual"))


def test_name_by_candidates_is_the_cosine_to_the_mean_normalised_embedding():
    gen = torch.Generator().manual_seed(0)
    tes_out = torch.randn(12, 8, generator=gen) * torch.rand(12, 1, generator=gen) * 5
    clusters = np.array([0, 1, 2] * 4)
    text = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    named = trained_run.name_by_candidates(tes_out.numpy(), clusters, [0, 2], text, list("abcdef"))
    assert set(named) == {0, 2}
    for cluster, (name, sim) in named.items():
        rows = tes_out.numpy()[clusters == cluster].astype(np.float64)
        mean = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).mean(axis=0)
        cos = text.numpy().astype(np.float64) @ (mean / np.linalg.norm(mean))
        assert name == "abcdef"[cos.argmax()] and sim == pytest.approx(cos.max(), abs=1e-5)


def test_a_class_without_images_in_its_cluster_stays_unmatched():
    # All labelled images of classes 0 and 1 fall into cluster 3: only one class gets it.
    matches = trained_run.match_old_classes(np.array([3, 3, 3, 5]), np.array([0, 0, 1, 2]))
    assert matches == {3: 0, 5: 2}


def test_unusable_input_is_refused_with_the_flag(run_dir, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
    Image.new("RGB", (8, 8)).save(tmp_path / "one.png")
    images = str(tmp_path)
    with pytest.raises(CheckpointError, match="--checkpoint .*tes.pt is not a stage-2 checkpoint"):
        predict.main(["--checkpoint", str(run_dir / "tes.pt"), "--images", images])
    with pytest.raises(FileNotFoundError, match="--images .*empty: no image file"):
        predict.main(["--checkpoint", str(run_dir / "last.pt"), "--images", str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="--images .*missing: no such folder"):
        predict.main(["--checkpoint", str(run_dir / "last.pt"), "--images", str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError, match="--name_candidates"):
        predict.main(["--checkpoint", str(run_dir / "last.pt"), "--images", images,
                      "--name_candidates", str(tmp_path / "nope.txt")])
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(predict.InputError, match="--name_candidates .*holds no name"):
        predict.main(["--checkpoint", str(run_dir / "last.pt"), "--images", images,
                      "--name_candidates", str(tmp_path / "blank.txt")])
    (tmp_path / "latin1.txt").write_bytes("tabby\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(predict.InputError, match="--name_candidates .*latin1.txt is not UTF-8 text .line 2"):
        predict.main(["--checkpoint", str(run_dir / "last.pt"), "--images", images,
                      "--name_candidates", str(tmp_path / "latin1.txt")])
