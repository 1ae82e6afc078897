"""predict.py and the input a new user gives it: names that a spreadsheet would run as
formulas, names that are not UTF-8, a write that fails half-way, flags that cannot work,
unreadable images, and CLIP weights that only the checkpoint names.

One tiny run of train.py on a folder dataset (practitioner layout, one old class, K = 3) serves
every test. With a single old class, the matching always names one cluster after it, and that
cluster holds labelled images: the class's name is sure to reach the CSV when the labelled
images are predicted. Copies of the dataset under another --data_root rename that class (a
folder name in latin-1, or a class_names.txt line) without changing what the model saw.
"""
from __future__ import annotations

import csv
import errno
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import train
from backbone import build_clip, is_local_weights
from errors import ImageLoadError, InputError
from params import parse_args

CLASS = "old"   # the old class's folder
N_LABELLED = 12
FLAGS = ["--dataset_name", "folder", "--num_classes", "3", "--clip_model", "GET-tiny", "--pretrained", "none",
         "--device", "cpu", "--grad_from_block", "2", "--head_hidden_dim", "64", "--head_bottleneck_dim", "32",
         "--num_workers", "0", "--no-progress", "--seed", "1"]
# docs/predictions.md: a cell escaped by predict.py starts with quotes, then one of these.
ESCAPED = re.compile(r"'+[=+\-@\t\r]")
LATIN1 = os.fsdecode(b"caf\xe9")  # str with a surrogate escape, as Python gives such a name


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(the dataset root, the stage-2 checkpoint of a tiny run on it)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(N_LABELLED):
        save_png(root / "labelled" / CLASS / f"{i:02d}.png", rng)
        save_png(root / "unlabelled" / f"{i:02d}.png", rng)
    out = tmp_path_factory.mktemp("runs")
    train.main(FLAGS + ["--data_root", str(root), "--tes_epochs", "1", "--epochs", "1", "--batch_size", "8",
                        "--exp_root", str(out), "--exp_name", "p"])
    (run_dir,) = (out / "folder").glob("p-*")
    return root, run_dir / "last.pt"


def save_png(path: Path, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path, format="PNG")


def labelled_copies(root: Path, folder: Path, names: list[str]) -> None:
    """The labelled images of the run, saved under ``folder`` with these relative names."""
    sources = sorted((root / "labelled" / CLASS).iterdir())
    assert len(names) <= len(sources)
    for source, name in zip(sources, names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, folder / name)


def predict_csv(checkpoint: Path, images: Path, out: Path, *extra: str) -> list[dict]:
    predict.main(["--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out), "--device", "cpu",
                  "--num_workers", "0", "--batch_size", "8", "--no-progress", *extra])
    return read_rows(out)


def read_rows(out: Path) -> list[dict]:
    """The CSV as docs/predictions.md says to read it back exactly."""
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == list(predict.COLUMNS)
    return rows


def unescape(cell: str) -> str:
    """The rule of docs/predictions.md, written independently of predict.py."""
    return cell[1:] if ESCAPED.match(cell) else cell


def text_cells(row: dict) -> list[str]:
    return [row[key] for key in ("path", "fused_name", "visual_name", "text_name")]


def test_formula_cells_are_escaped_and_read_back_exactly(run, tmp_path):
    root, checkpoint = run
    formula_class = '=HYPERLINK("http://example.com/?a,b","click")'
    names = ["=cmd|' /C calc'!A0.jpg", "+1.jpg", "-x.jpg", "@a.jpg", "\tTAB.png", "\rCR.png", "'=quoted.png",
             "a,b.png", 'say "hi".png', "two\nlines.png", "plain.png", "sub/@deeper.png"]
    labelled_copies(root, tmp_path / "images", names)
    renamed = tmp_path / "data"  # the same dataset, its old class named by a formula
    shutil.copytree(root, renamed)
    (renamed / "class_names.txt").write_text(f"{CLASS}\t{formula_class}\n", encoding="utf-8")
    rows = predict_csv(checkpoint, tmp_path / "images", tmp_path / "predictions.csv", "--data_root", str(renamed))

    assert sorted(unescape(row["path"]) for row in rows) == sorted(names)
    for row in rows:
        path = unescape(row["path"])
        assert row["path"] == ("'" + path if path.lstrip("'")[:1] in ("=", "+", "-", "@", "\t", "\r") else path)
        for cell in text_cells(row):  # nothing a spreadsheet would run
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r"))
    fused_names = {unescape(row["fused_name"]) for row in rows}
    assert formula_class in fused_names  # the labelled images' cluster carries the class's name
    assert "'" + formula_class in {row["fused_name"] for row in rows}
    assert fused_names <= {formula_class, "new_0", "new_1", "new_2"}
    # A name that starts with quotes but no formula character is left as it is; the helper for
    # readers undoes exactly what was done.
    assert predict.formula_safe("'quoted") == "'quoted" and predict.formula_safe("''@x") == "'''@x"
    for name in names + ["'quoted", "''@x", "'", ""]:
        assert predict.unescape_formula(predict.formula_safe(name)) == name == unescape(predict.formula_safe(name))


def test_names_that_are_not_utf8_are_written_as_their_bytes(run, tmp_path, capsys):
    root, checkpoint = run
    images = tmp_path / "images"
    names = [f"{i:02d}.png" for i in range(N_LABELLED - 2)] + [os.fsdecode(b"caf\xe9.png"), f"{LATIN1}/x.png"]
    labelled_copies(root, images, names)
    assert os.fsencode(images) + b"/caf\xe9.png" in [os.fsencode(p) for p in images.iterdir()]
    renamed = tmp_path / "data"  # the same dataset, its old class a latin-1 folder
    shutil.copytree(root, renamed)
    (renamed / "labelled" / CLASS).rename(renamed / "labelled" / LATIN1)
    out = tmp_path / "predictions.csv"
    rows = predict_csv(checkpoint, images, out, "--data_root", str(renamed))

    assert len(rows) == len(names)  # every row, not a CSV cut at the first such name
    assert sorted(os.fsencode(row["path"]) for row in rows) == sorted(os.fsencode(n) for n in names)
    for row in rows:
        assert (images / row["path"]).is_file()  # the path read back opens the file
    assert LATIN1 in {row["fused_name"] for row in rows}
    raw = out.read_bytes()
    assert b"\ncaf\xe9.png," in raw and b",caf\xe9," in raw  # the file system's bytes, as they are
    assert "Logging error" not in capsys.readouterr().err  # the log showed them too


def test_a_failed_write_leaves_the_previous_csv_whole(run, tmp_path, monkeypatch):
    root, checkpoint = run
    labelled_copies(root, tmp_path / "images", [f"{i:02d}.png" for i in range(N_LABELLED)])
    out = tmp_path / "predictions.csv"
    out.write_text("the previous predictions\n")
    real_writer = csv.writer

    class DiskFillsUp:  # the disk fills up after five rows
        def __init__(self, f):
            self.writer, self.rows = real_writer(f), 0

        def writerow(self, row):
            self.rows += 1
            if self.rows > 5:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.writer.writerow(row)

    monkeypatch.setattr(csv, "writer", DiskFillsUp)
    with pytest.raises(OSError, match="No space left"):
        predict_csv(checkpoint, tmp_path / "images", out)
    assert out.read_text() == "the previous predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "predictions.csv"]  # no temporary left


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "--batch_size must be >= 1; got 0"),
    (["--num_workers", "-1"], "--num_workers must be >= 0; got -1"),
    (["--prompt_template", "{} and {}"], r"--prompt_template '\{\} and \{\}' must hold exactly one '\{\}'"),
    (["--prompt_template", "a photo of a {name}"], "--prompt_template .* must hold exactly one"),
    (["--prompt_template", "a photo"], "--prompt_template .* must hold exactly one"),
    (["--prompt_template", "a {:d}"], "--prompt_template .* must hold exactly one"),
    (["--out", "{tmp}"], "--out .* is a folder; give the path of the CSV file"),
    (["--out", "{tmp}/new/"], "--out .* is a folder"),
    (["--out", "{tmp}/file.txt/predictions.csv"], "--out .*: .*file.txt is a file, not a folder"),
    (["--out", "{tmp}/file.txt/deeper/predictions.csv"], "--out .*: .*file.txt is a file, not a folder"),
])
def test_flags_are_checked_before_anything_is_read(tmp_path, flags, message):
    # The checkpoint and the images do not exist: a flag's error must come first.
    (tmp_path / "file.txt").write_text("a file")
    flags = [flag.replace("{tmp}", str(tmp_path)) if flag.startswith("{tmp}") else flag for flag in flags]
    with pytest.raises(InputError, match=message):
        predict.main(["--checkpoint", str(tmp_path / "no.pt"), "--images", str(tmp_path / "none"), *flags])


def test_out_may_not_replace_an_input(run, tmp_path):
    root, checkpoint = run
    copy = tmp_path / "last.pt"
    shutil.copyfile(checkpoint, copy)
    before = copy.read_bytes()
    with pytest.raises(InputError, match="--out .*last.pt is --checkpoint"):
        predict.main(["--checkpoint", str(copy), "--images", str(root / "labelled"), "--out", str(copy)])
    image = root / "labelled" / CLASS / "00.png"
    with pytest.raises(InputError, match="--out .*00.png is an image of --images"):
        predict.main(["--checkpoint", str(copy), "--images", str(root / "labelled"), "--out", str(image)])
    assert copy.read_bytes() == before


def test_unreadable_images_stop_with_the_file_and_the_flag_or_are_skipped(run, tmp_path, capsys):
    root, checkpoint = run
    images = tmp_path / "images"
    labelled_copies(root, images, [f"{i:02d}.png" for i in range(6)])
    (images / "03b_garbage.png").write_bytes(b"not an image at all")
    (images / "04b_cut.png").write_bytes((images / "04.png").read_bytes()[:60])  # a truncated PNG
    out = tmp_path / "predictions.csv"
    with pytest.raises(ImageLoadError, match="--images: cannot read .*03b_garbage.png .*--skip_bad_images"):
        predict_csv(checkpoint, images, out)
    # Read by a worker process, the error is still one line, not the worker's traceback.
    with pytest.raises(ImageLoadError, match=r"^--images: cannot read \S*03b_garbage.png \(.*\)\. [^\n]*$"):
        predict_csv(checkpoint, images, out, "--num_workers", "1")
    assert not out.exists()
    rows = predict_csv(checkpoint, images, out, "--skip_bad_images")
    assert [row["path"] for row in rows] == [f"{i:02d}.png" for i in range(6)]
    log = capsys.readouterr().out
    assert "03b_garbage.png" in log and "04b_cut.png" in log and "--skip_bad_images" in log

    # A bad labelled image of the run's dataset: named with the flag, or replaced as train.py does.
    broken = tmp_path / "data"
    shutil.copytree(root, broken)
    (broken / "labelled" / CLASS / "05b_garbage.png").write_bytes(b"not an image either")
    with pytest.raises(ImageLoadError, match="05b_garbage.png.*--skip_bad_images"):
        predict_csv(checkpoint, images, out, "--data_root", str(broken))
    again = predict_csv(checkpoint, images, out, "--data_root", str(broken), "--skip_bad_images")
    assert [row["path"] for row in again] == [row["path"] for row in rows]
    assert "05b_garbage.png" in capsys.readouterr().out


def test_a_weights_file_named_only_by_the_checkpoint_is_not_loaded(run, tmp_path):
    root, checkpoint = run
    # The same run as if trained with --pretrained FILE: FILE holds the CLIP it started from
    # (the seeded random one), so that predicting with it gives the run's own predictions.
    weights = tmp_path / "my clip.pt"
    torch.save(build_clip(parse_args(FLAGS + ["--data_root", str(root)]), "cpu").state_dict(), weights)
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    ckpt["args"]["pretrained"] = str(weights)
    from_file = tmp_path / "from_file.pt"
    torch.save(ckpt, from_file)
    images = root / "labelled"
    with pytest.raises(InputError, match=re.escape(f"trained with --pretrained {weights}; pass --pretrained "
                                                   f"'{weights}'")):
        predict_csv(from_file, images, tmp_path / "refused.csv")
    assert not (tmp_path / "refused.csv").exists()
    named = predict_csv(from_file, images, tmp_path / "named.csv", "--pretrained", str(weights))
    assert named == predict_csv(checkpoint, images, tmp_path / "none.csv")
    # The rule predict.py applies: an open_clip tag is no file, a checkpoint recording one is followed.
    assert not is_local_weights("openai", "ViT-B-16") and not is_local_weights(None, "GET-tiny")
    assert is_local_weights("/models/ViT-B-16.pt", "ViT-B-16")
    assert is_local_weights("openai", "GET-tiny")  # GET-tiny has no tags: a file named openai
