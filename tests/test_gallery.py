"""The cluster gallery (views/gallery.py) of ``predict.py --gallery`` and ``report.py --gallery``,
opened in a real browser: headless Chromium loads the page from the file system and gives the
document after its script ran (``--dump-dom``) or a screenshot. What is checked: one section per
cluster with the counts, names and mean confidences of the predictions (the CSV's, for
predict.py), its thumbnails most confident first and the least confident marked; sorting and
filtering through the URL fragment; a screenshot that shows something; file, class and candidate
names made of HTML shown as text and never run; unreadable images listed; and the folders a
gallery refuses to write into.

The page's own tests build galleries from arrays (no model). predict.py and report.py use one
tiny run of train.py on a folder dataset (one old class, K = 3); report.py's gallery of images
held in memory uses an untrained digits checkpoint built directly, since only the page is checked.

Without Chromium the browser tests skip, except under GET_REQUIRE_BROWSER=1 (.ci/run sets it),
where they fail: CI must run them.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import report
import train
from backbone import build_clip
from data.task import task_from_args
from errors import ImageLoadError, InputError
from model import GETConfig, GETModel, HeadConfig, TextEmbeddingSynthesizer
from params import parse_args
from runs.checkpoints import task_meta
from views import gallery

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRE_BROWSER = os.environ.get("GET_REQUIRE_BROWSER") == "1"
HOSTILE_FILE = "<script>.png"
HOSTILE_NAME = '"><img src=x onerror=alert(1)>'
HOSTILE_CANDIDATE = "</script><b>bold</b>"
PLACEHOLDERS = "@SCRIPT@ @DATA@ @POLICY@"  # the page template's: a name must not fill them
CLASS = "old"  # the folder dataset's old class (its folder)
FOLDER_FLAGS = ["--dataset_name", "folder", "--num_classes", "3", "--clip_model", "GET-tiny", "--pretrained", "none",
                "--device", "cpu", "--grad_from_block", "2", "--head_hidden_dim", "64", "--head_bottleneck_dim", "32",
                "--num_workers", "0", "--no-progress", "--seed", "1"]


# ---------------------------------------------------------------------------------------------
# The browser and the page it shows

def chromium() -> str:
    if CHROMIUM:
        return CHROMIUM
    if REQUIRE_BROWSER:
        pytest.fail("GET_REQUIRE_BROWSER=1 but there is no chromium on PATH (apt-get install chromium)")
    pytest.skip("no chromium on PATH: the gallery's browser tests need it (apt-get install chromium)")


def browse(page: Path, tmp_path: Path, fragment: str = "", screenshot: Path | None = None) -> str:
    """The document of ``page`` after its script ran (or the screenshot, written to ``screenshot``)."""
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    what = [f"--screenshot={screenshot}", "--window-size=1000,700", "--hide-scrollbars"] if screenshot else \
        ["--dump-dom"]
    done = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={profile}", *what, page.resolve().as_uri() + fragment],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Page(HTMLParser):
    """What a test reads from the rendered document: every element, and per cluster section its
    name, proposed name, line of figures and thumbnails."""
    VOID = {"img", "input", "meta", "br", "link", "hr"}

    def __init__(self, dom: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict]] = []
        self.sections: list[dict] = []
        self.open: list[tuple[str, str, str]] = []  # (tag, class, id) of the open elements
        self.texts: dict[str, str] = {}             # text of the elements with an id
        self.feed(dom)

    @property
    def visible(self) -> list[int]:
        return [s["id"] for s in self.sections if not s["hidden"]]

    def section(self, cluster: int) -> dict:
        return next(s for s in self.sections if s["id"] == cluster)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        classes = attrs.get("class") or ""
        if tag == "section":
            self.sections.append({"id": int(attrs["data-cluster"]), "hidden": "hidden" in attrs, "name": "",
                                  "proposed": "", "meta": "", "thumbs": []})
        elif tag == "figure":
            self.sections[-1]["thumbs"].append({"low": "low" in classes.split(), "caption": ""})
        elif tag == "img" and self.in_tag("figure"):
            self.sections[-1]["thumbs"][-1].update(src=attrs["src"], alt=attrs["alt"])
        elif tag == "a" and self.in_tag("figure"):
            self.sections[-1]["thumbs"][-1]["href"] = attrs["href"]
        if tag not in self.VOID:
            self.open.append((tag, classes, attrs.get("id") or ""))

    def handle_endtag(self, tag):
        while self.open and self.open.pop()[0] != tag:
            pass

    def in_tag(self, tag: str) -> bool:
        return any(t == tag for t, _, _ in self.open)

    def handle_data(self, data):
        for _, _, element_id in self.open:
            if element_id:
                self.texts[element_id] = self.texts.get(element_id, "") + data
        if not self.open or not self.sections or not self.in_tag("section"):
            return
        tag, classes, _ = self.open[-1]
        section = self.sections[-1]
        if tag == "figcaption":
            section["thumbs"][-1]["caption"] += data
        elif classes in ("name", "proposed", "meta"):
            section[classes] += data


def page_data(page: Path) -> dict:
    """The JSON the page carries (what its script renders)."""
    blob = re.search(r'<script type="application/json" id="gallery-data">(.*?)</script>',
                     page.read_text(encoding="utf-8"), re.S)
    return json.loads(blob.group(1))


def no_element_from_data(page: Page) -> None:
    """Nothing of a hostile name became an element or an attribute: no event handler anywhere,
    no image but thumbnails, only the page's two scripts, no <b>."""
    assert not [(tag, key) for tag, attrs in page.elements for key in attrs if key.startswith("on")]
    assert all(attrs["src"].startswith(gallery.THUMBS + "/") for tag, attrs in page.elements if tag == "img")
    assert [attrs.get("type") for tag, attrs in page.elements if tag == "script"] == ["application/json", None]
    assert "b" not in {tag for tag, _ in page.elements}


# ---------------------------------------------------------------------------------------------
# The page itself, from arrays

# Cluster: (size, name, kind, proposed, confidence range); cluster 4 holds no image.
CLUSTERS = {0: (30, "zero", "old", None, (0.5, 0.9)), 1: (5, HOSTILE_NAME, "old", None, (0.2, 0.3)),
            2: (12, "new_2", "new", HOSTILE_CANDIDATE, (0.6, 0.7)), 3: (1, "new_3", "new", "seven", (0.95, 0.95)),
            4: (0, "four", "old", None, (0, 0)), 5: (8, "new_5", "new", None, (0.3, 0.4))}
PER_CLUSTER = 8
BROKEN = 31  # the second image of cluster 1: it cannot be read


def array_gallery(seed: int = 0) -> tuple[gallery.Gallery, list[np.ndarray]]:
    """A gallery of CLUSTERS with 8x8 images held in memory, each cluster's confidence rising with
    the index; image BROKEN cannot be read, two are named like HTML, one like the placeholders of
    the page's template."""
    rng = np.random.default_rng(seed)
    assigned = np.concatenate([np.full(size, c) for c, (size, *_) in CLUSTERS.items()])
    confidence = np.concatenate([np.linspace(*span, size) for size, *_, span in CLUSTERS.values()])
    arrays = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in assigned]
    labels = [f"#{i}" for i in range(len(assigned))]
    labels[0], labels[1], labels[29] = HOSTILE_FILE, HOSTILE_NAME, PLACEHOLDERS  # all three shown

    def read(i: int) -> Image.Image:
        if i == BROKEN:
            raise ImageLoadError("cannot identify image file")
        return Image.fromarray(arrays[i])

    clusters = {c: gallery.Cluster(c, name, kind, proposed, None if proposed is None else 0.5 + c / 10)
                for c, (_, name, kind, proposed, _) in CLUSTERS.items()}
    return gallery.Gallery("Test <b>gallery</b>", clusters, assigned, confidence, gallery.Images(labels, read),
                           per_cluster=PER_CLUSTER), arrays


@pytest.fixture(scope="module")
def arrays_page(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gallery")
    return gallery.write(folder, array_gallery()[0])


def test_one_section_per_cluster_with_its_numbers_and_thumbnails(arrays_page, tmp_path):
    page = Page(browse(arrays_page, tmp_path))
    made = array_gallery()[0]
    index_of = {label: i for i, label in enumerate(made.images.labels)}
    assert sorted(page.visible) == [0, 1, 2, 3, 5]  # the empty cluster 4 has no section
    assert page.visible == [0, 2, 5, 1, 3]          # by size, largest first: the default
    assert page.texts["title"] == "Test <b>gallery</b>"
    assert "1 more hold no image" in page.texts["subtitle"]
    for c in page.visible:
        size, name, kind, proposed, _ = CLUSTERS[c]
        section = page.section(c)
        members = np.flatnonzero(made.assigned == c)
        assert section["name"] == name
        assert section["proposed"] == ("" if proposed is None else f"proposed: {proposed} (similarity "
                                                                   f"{0.5 + c / 10:.3f})")
        assert f"{size} image" in section["meta"]
        assert f"mean confidence {made.confidence[members].mean():.3f}" in section["meta"]
        # At most PER_CLUSTER: the most confident first, then the least confident, marked.
        shown = [index_of[t["caption"]] for t in section["thumbs"]]
        by_confidence = sorted(set(members) - {BROKEN}, key=lambda i: -made.confidence[i])
        if size > PER_CLUSTER:
            low = PER_CLUSTER // gallery.LOW_SHARE
            assert shown == by_confidence[:PER_CLUSTER - low] + by_confidence[-low:]
            assert [t["low"] for t in section["thumbs"]] == [False] * (PER_CLUSTER - low) + [True] * low
        else:
            assert shown == by_confidence and not any(t["low"] for t in section["thumbs"])
        for thumb in section["thumbs"]:  # in memory: the link opens a larger version
            assert (arrays_page.parent / thumb["src"]).is_file() and thumb["href"].endswith("-large.png")
            small, large = (Image.open(arrays_page.parent / thumb[key]) for key in ("src", "href"))
            assert max(small.size) <= gallery.THUMB_PX < max(large.size) <= gallery.LARGE_PX
    assert len(page.section(1)["thumbs"]) == CLUSTERS[1][0] - 1  # the unreadable one is listed instead
    assert f"#{BROKEN}: cannot identify image file" in page.texts["unreadable"]


@pytest.mark.parametrize("fragment, visible", [
    ("#sort=confidence", [3, 0, 2, 5, 1]),  # means 0.95, 0.7, 0.65, 0.35, 0.25
    ("#sort=cluster", [0, 1, 2, 3, 5]),
    ("#sort=cluster&reverse=1", [5, 3, 2, 1, 0]),
    ("#sort=size&filter=new", [2, 5, 3]),  # "new" clusters, by size
    ("#filter=SEVEN", [3]),                # the proposed name, any case
    ("#sort=cluster&filter=" + quote("<img"), [1]),
    ("#filter=nothing%20like%20it", []),
    ("#sort=bogus", [0, 2, 5, 1, 3]),      # an unknown sort: by size
])
def test_sorting_and_filtering_follow_the_fragment(arrays_page, tmp_path, fragment, visible):
    page = Page(browse(arrays_page, tmp_path, fragment))
    assert page.visible == visible
    assert sorted(s["id"] for s in page.sections) == [0, 1, 2, 3, 5]  # hidden ones stay in the page
    assert page.texts["summary"] == f"showing {len(visible)} of 5 clusters"


def test_sorting_by_name_and_its_reverse(arrays_page, tmp_path):
    forward = Page(browse(arrays_page, tmp_path, "#sort=name")).visible
    assert Page(browse(arrays_page, tmp_path, "#sort=name&reverse=1")).visible == forward[::-1]
    # By the proposed name where there is one: new_5, seven (cluster 3), zero; the two names that
    # start with punctuation go where the browser's collation puts them.
    assert [c for c in forward if c in (5, 3, 0)] == [5, 3, 0]


def test_names_made_of_html_are_shown_as_text(arrays_page, tmp_path):
    dom = browse(arrays_page, tmp_path)
    page = Page(dom)
    no_element_from_data(page)
    captions = [t["caption"] for s in page.sections for t in s["thumbs"]]
    assert HOSTILE_FILE in captions and HOSTILE_NAME in captions and PLACEHOLDERS in captions
    assert "&lt;script&gt;.png" in dom  # escaped text in the document, not an element
    assert page.section(1)["name"] == HOSTILE_NAME
    assert HOSTILE_CANDIDATE in page.section(2)["proposed"]
    raw = arrays_page.read_text(encoding="utf-8")
    assert HOSTILE_CANDIDATE not in raw and "</script><b>" not in raw  # the JSON cannot close its element
    assert page_data(arrays_page)["clusters"][2]["proposed"] == HOSTILE_CANDIDATE


def test_a_screenshot_shows_the_page(arrays_page, tmp_path):
    png = tmp_path / "shot.png"
    browse(arrays_page, tmp_path, screenshot=png)
    with Image.open(png) as shot:
        assert shot.size == (1000, 700)
        grey = shot.convert("L")
        assert grey.getextrema()[0] < 100  # text and thumbnails, not a blank page
        assert len(shot.convert("RGB").getcolors(1 << 20)) > 50


def test_a_gallery_replaces_an_earlier_one_but_no_other_folder(tmp_path):
    made, _ = array_gallery()
    folder = tmp_path / "g"
    gallery.write(folder, made)
    first = sorted(p.name for p in (folder / gallery.THUMBS).iterdir())
    smaller = gallery.Gallery("again", made.clusters, made.assigned[:10], made.confidence[:10], made.images,
                              per_cluster=2)
    assert gallery.folder_problem(folder, "--gallery") is None
    gallery.write(folder, smaller)
    # The two most confident of the first ten images of cluster 0 (confidence rises with the index).
    assert sorted(p.name for p in (folder / gallery.THUMBS).iterdir()) == ["8-large.png", "8.png", "9-large.png",
                                                                         "9.png"] != first
    assert sorted(p.name for p in folder.iterdir()) == [gallery.MARKER, gallery.INDEX, gallery.THUMBS]
    assert page_data(folder / gallery.INDEX)["title"] == "again"

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert "holds files and no gallery" in gallery.folder_problem(mine, "--gallery")
    (tmp_path / "empty").mkdir()
    assert gallery.folder_problem(tmp_path / "empty", "--gallery") is None
    assert gallery.folder_problem(tmp_path / "new" / "deeper", "--gallery") is None
    assert "is a file" in gallery.folder_problem(mine / "notes.txt", "--gallery")
    assert "notes.txt is a file, not a folder" in gallery.folder_problem(mine / "notes.txt" / "g", "--gallery")


def test_links_to_files_are_relative_and_encoded(tmp_path):
    folder = tmp_path / "site" / "gallery"
    for name in ("a b#c?.png", "javascript:alert(1).png", os.fsdecode(b"caf\xe9.png")):
        link = gallery.file_link(tmp_path / "images" / name, folder)
        assert link.startswith("../../images/") and ":" not in link and "#" not in link and "?" not in link
        assert os.fsencode(unquote(link, errors="surrogateescape")) == os.fsencode("../../images/" + name)
    assert gallery.printable(os.fsdecode(b"caf\xe9")) == "caf\\xe9"
    assert "<" not in gallery.inline_json({"name": "</script><!--"})


# ---------------------------------------------------------------------------------------------
# predict.py --gallery and report.py --gallery on a run

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(the dataset root, the run folder of a tiny run on it): 12 labelled images of one old
    class and 12 unlabelled ones, K = 3."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(12):
        for path in (root / "labelled" / CLASS / f"{i:02d}.png", root / "unlabelled" / f"{i:02d}.png"):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    out = tmp_path_factory.mktemp("runs")
    train.main(FOLDER_FLAGS + ["--data_root", str(root), "--tes_epochs", "1", "--epochs", "1", "--batch_size", "8",
                               "--exp_root", str(out), "--exp_name", "g"])
    (run_dir,) = (out / "folder").glob("g-*")
    return root, run_dir


def predict_with_gallery(root: Path, run_dir: Path, tmp_path: Path, *extra: str) -> tuple[list[dict], Path]:
    """predict.py --gallery on copies of the run's images (two named like HTML, one unreadable),
    the old class named like HTML, a candidate name too; (the CSV's rows, index.html)."""
    images = tmp_path / "images"
    labelled = sorted((root / "labelled" / CLASS).iterdir())
    names = [HOSTILE_FILE, HOSTILE_NAME + ".png"] + [p.name for p in labelled[2:]]
    for source, name in zip(labelled, names):
        (images / "labelled").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, images / "labelled" / name)
    shutil.copytree(root / "unlabelled", images / "unlabelled")
    (images / "broken.png").write_bytes(b"not an image")
    renamed = tmp_path / "data"
    shutil.copytree(root, renamed)
    (renamed / "class_names.txt").write_text(f"{CLASS}\t{HOSTILE_NAME}\n", encoding="utf-8")
    candidates = tmp_path / "names.txt"
    candidates.write_text(f"{HOSTILE_CANDIDATE}\ncat\n", encoding="utf-8")
    out = tmp_path / "predictions.csv"
    predict.main(["--checkpoint", str(run_dir / "last.pt"), "--images", str(images), "--out", str(out),
                  "--data_root", str(renamed), "--name_candidates", str(candidates), "--skip_bad_images",
                  "--gallery", str(tmp_path / "gallery"), "--device", "cpu", "--num_workers", "0",
                  "--batch_size", "8", "--no-progress", *extra])
    with open(out, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f)), tmp_path / "gallery" / gallery.INDEX


def test_predict_gallery_shows_the_clusters_of_the_csv(run, tmp_path, capsys):
    rows, index = predict_with_gallery(*run, tmp_path)
    log = capsys.readouterr().out
    assert "wrote the gallery of 24 images in" in log and str(index.resolve()) in log
    assert "broken.png" in log
    dom = browse(index, tmp_path)
    page = Page(dom)
    clusters = sorted({int(row["fused_cluster"]) for row in rows})
    assert sorted(page.visible) == clusters and len(rows) == 24
    old_seen = False
    for c in clusters:
        own = [row for row in rows if int(row["fused_cluster"]) == c]
        section = page.section(c)
        assert f"{len(own)} image" in section["meta"]
        mean = np.mean([float(row["fused_prob"]) for row in own])
        shown_mean = float(re.search(r"mean confidence ([0-9.]+)", section["meta"]).group(1))
        assert shown_mean == pytest.approx(mean, abs=2e-3)
        if own[0]["fused_kind"] == "old":  # the old class's name, HTML and all, as text
            assert section["name"] == own[0]["fused_name"] == HOSTILE_NAME and section["proposed"] == ""
            old_seen = True
        else:  # new_<id>, and the CSV's name is the proposed one
            assert section["name"] == f"new_{c}" and own[0]["fused_name"] in (HOSTILE_CANDIDATE, "cat")
            assert section["proposed"].startswith(f"proposed: {own[0]['fused_name']} (similarity ")
        # Every image fits (24 per cluster): the CSV's paths, most confident first, each linking to its file.
        captions = [t["caption"] for t in section["thumbs"]]
        assert sorted(captions) == sorted(row["path"] for row in own)
        probs = {row["path"]: float(row["fused_prob"]) for row in own}
        assert [probs[name] for name in captions] == sorted(probs.values(), reverse=True)
        for thumb in section["thumbs"]:
            linked = (index.parent / unquote(thumb["href"])).resolve()
            assert linked == (tmp_path / "images" / thumb["caption"]).resolve()
            assert (index.parent / thumb["src"]).is_file()
    assert old_seen
    assert "broken.png" in page.texts["unreadable"]
    assert "&lt;script&gt;.png" in dom
    no_element_from_data(page)


def test_report_gallery_of_a_runs_unlabelled_files(run, tmp_path, capsys):
    root, run_dir = run
    report.main(["--gallery", str(run_dir), "--device", "cpu"])
    index = run_dir / "gallery" / gallery.INDEX
    assert str(index.resolve()) in capsys.readouterr().out
    data = page_data(index)
    assert sum(c["count"] for c in data["clusters"]) == 12 and not data["unreadable"]
    links = {image[2]: unquote(image[1]) for c in data["clusters"] for image in c["top"] + c["low"]}
    assert sorted(links) == [f"unlabelled/{i:02d}.png" for i in range(12)]  # below the dataset's root
    assert all((index.parent / link).resolve() == (root / label).resolve() for label, link in links.items())
    report.main(["--gallery", str(run_dir / "last.pt"), "--device", "cpu"])  # again, over its own gallery
    (run_dir / "notes").mkdir()
    (run_dir / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="--gallery_out .*notes holds files and no gallery"):
        report.main(["--gallery", str(run_dir), "--gallery_out", str(run_dir / "notes"), "--device", "cpu"])
    with pytest.raises(FileNotFoundError, match="--gallery .*: no last.pt or best.pt"):
        report.main(["--gallery", str(root), "--device", "cpu"])
    with pytest.raises(InputError, match="give the run folders to report on"):
        report.main([])

    # An unlabelled image that cannot be read: listed on the page and in the log, the others shown.
    broken = tmp_path / "data"
    shutil.copytree(root, broken)
    (broken / "unlabelled" / "03.png").write_bytes(b"not an image")
    capsys.readouterr()
    report.main(["--gallery", str(run_dir), "--gallery_out", str(tmp_path / "g"), "--data_root", str(broken),
                 "--device", "cpu"])
    data = page_data(tmp_path / "g" / gallery.INDEX)
    assert sum(c["count"] for c in data["clusters"]) == 11
    assert [label for label, _ in data["unreadable"]] == ["unlabelled/03.png"]
    assert "left out of the gallery: unlabelled/03.png" in capsys.readouterr().out


def digits_checkpoint(path: Path) -> None:
    """An untrained stage-2 checkpoint of the digits (in memory): the page, not the clusters, is
    under test."""
    args = parse_args(["--dataset_name", "digits", "--clip_model", "GET-tiny", "--pretrained", "none", "--device",
                       "cpu", "--grad_from_block", "2", "--head_hidden_dim", "64", "--head_bottleneck_dim", "32",
                       "--seed", "0"])
    task = task_from_args(args)
    clip = build_clip(args, "cpu")
    tes = TextEmbeddingSynthesizer(clip, n_words=args.n_words)
    model = GETModel(clip, tes, task.num_classes, grad_from_block=2, head=HeadConfig(True, 64, 32))
    meta = {**task_meta(task, args.clip_model, args.n_words), **GETConfig.from_flags(args, task.num_classes).meta()}
    torch.save({"meta": meta, "stage": "get", "model": model.trainable_state_dict(),
                "tes_projector": tes.projector.state_dict(),
                "args": json.loads(json.dumps(vars(args), default=str))}, path)


def test_report_gallery_of_images_held_in_memory(tmp_path):
    digits_checkpoint(tmp_path / "last.pt")
    names = tmp_path / "names.txt"
    names.write_text("zero\none\nseven\n")
    report.main(["--gallery", str(tmp_path), "--gallery_per_cluster", "4", "--name_candidates", str(names),
                 "--device", "cpu"])
    data = page_data(tmp_path / "gallery" / gallery.INDEX)
    assert sum(c["count"] for c in data["clusters"]) == 1078  # the digits' unlabelled training images
    class_names = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    for cluster in data["clusters"]:
        shown = cluster["top"] + cluster["low"]
        assert len(shown) == min(4, cluster["count"]) and len(cluster["low"]) == (cluster["count"] > 4)
        assert cluster["proposed"] in ({None} if cluster["kind"] == "old" else {"zero", "one", "seven"})
        for thumb, link, label, _ in shown:  # no file: the link opens the larger version
            assert link == thumb.replace(".png", "-large.png") and (tmp_path / "gallery" / link).is_file()
            position, name = label.split(" ")
            assert position.startswith("#") and name in class_names


# ---------------------------------------------------------------------------------------------
# Folders a gallery refuses, before anything is read

@pytest.mark.parametrize("gallery_dir, message", [
    ("{tmp}/file.txt/gallery", "--gallery .*file.txt is a file, not a folder"),
    ("{tmp}/file.txt", "--gallery .*file.txt is a file; give a folder"),
    ("{tmp}/mine", "--gallery .*mine holds files and no gallery; give a new or empty folder"),
    ("{tmp}/images/gallery", "--gallery .*gallery lies inside --images"),
    ("{tmp}/images", "--gallery .*images holds files and no gallery"),
])
def test_unusable_gallery_folders_are_refused_first(tmp_path, gallery_dir, message):
    (tmp_path / "file.txt").write_text("a file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "a.png")
    with pytest.raises(InputError, match=message):  # the checkpoint does not exist: the folder's error comes first
        predict.main(["--checkpoint", str(tmp_path / "no.pt"), "--images", str(tmp_path / "images"),
                      "--out", str(tmp_path / "p.csv"), "--gallery", gallery_dir.replace("{tmp}", str(tmp_path))])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "images" / "gallery").exists()
    with pytest.raises(InputError, match="--gallery_per_cluster must be >= 1; got 0"):
        predict.main(["--checkpoint", str(tmp_path / "no.pt"), "--images", str(tmp_path / "images"),
                      "--gallery", str(tmp_path / "g"), "--gallery_per_cluster", "0"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_a_folder_without_write_permission_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert "no permission to write" in gallery.folder_problem(locked / "gallery", "--gallery")
        assert "no permission to write" in gallery.folder_problem(locked, "--gallery")
    finally:
        locked.chmod(0o700)
