"""A cluster gallery: one self-contained web page of what each cluster holds.

    problem = folder_problem(Path("gallery"), "--gallery")     # before the long work
    page = write(Path("gallery"), Gallery(title, clusters, assigned, confidence, images))

``write`` puts into the folder ``index.html``, ``thumbs/`` (one small image per image shown,
resized once here, not by the browser) and the marker file ``.get-gallery``, by which a later
gallery recognises the folder as its own: a folder that holds anything else is never written
into. The page needs no network: the data is one JSON blob inside it, rendered by a little
plain JavaScript that builds the page with ``textContent`` (never ``innerHTML``), so a file or
class name is always shown as text. The blob escapes ``<``, ``>`` and ``&``, so a name holding
``</script>`` cannot end it, and a Content-Security-Policy admits only the page's own script.

One section per cluster that holds images: its name (the old class's, or ``new_<id>``), the
name proposed for it (``--name_candidates``) with its similarity, the number of images, the
mean confidence and a grid of at most ``per_cluster`` thumbnails: the most confident first,
then the least confident, marked. The state of the page lives in the URL's fragment, so a view
can be shared and tests need no clicks: ``index.html#sort=confidence&filter=seven&reverse=1``
(sort: size, confidence, name or cluster).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import numpy as np
from PIL import Image

from data.data_utils import IMAGE_ERRORS, to_rgb
from errors import ImageLoadError, InputError
from util.io import unwritable_parent
from util.logging_utils import get_logger, printable  # names as the log shows them

MARKER = ".get-gallery"
INDEX = "index.html"
THUMBS = "thumbs"
THUMB_PX = 96     # longest side of a thumbnail
LARGE_PX = 384    # longest side of the larger version linked when there is no image file
PER_CLUSTER = 24  # thumbnails per cluster, by default
LOW_SHARE = 4     # a quarter of a full cluster's thumbnails show its least confident images
THREADS = 4       # PIL decodes and resizes without the GIL: a few threads go faster
MARKER_TEXT = ("This folder holds a cluster gallery written by GET's predict.py --gallery or report.py "
               "--gallery.\nThey replace its index.html and thumbs/ when asked to write a gallery here; "
               "a folder without this file is never written into.\n")


@dataclass(frozen=True)
class Cluster:
    id: int
    name: str                        # the old class's name, or new_<id>
    kind: str                        # "old" (matched to an old class) or "new"
    proposed: str | None = None      # the candidate name closest to it (--name_candidates)
    similarity: float | None = None  # the cosine of that name


@dataclass
class Images:
    """The images that were clustered. ``read(i)`` opens image i (an error of IMAGE_ERRORS or
    ImageLoadError if it cannot); ``files[i]`` is its file, which its thumbnail links to; with
    no files (images held in memory) the thumbnail links to a larger version of itself."""
    labels: list[str]
    read: Callable[[int], Image.Image]
    files: list[Path] | None = None


@dataclass
class Gallery:
    title: str
    clusters: dict[int, Cluster]     # every cluster; those without images get no section
    assigned: np.ndarray             # int [N]: the cluster of each image
    confidence: np.ndarray           # float [N]: the probability of that cluster
    images: Images
    subtitle: str = ""
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (label, why) of images left out
    per_cluster: int = PER_CLUSTER


def folder_problem(folder: Path, flag: str) -> str | None:
    """What keeps ``folder`` from taking a gallery, naming ``flag``; None if nothing. A folder
    that exists must be empty or hold a previous gallery: a user's folder is never written into."""
    if folder.exists() and not folder.is_dir():
        return f"{flag} {folder} is a file; give a folder for the gallery (index.html and thumbs/ go into it)"
    if folder.is_dir():
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"{flag} {folder}: no permission to write in this folder; give another folder"
        if not (folder / MARKER).is_file() and any(folder.iterdir()):
            return (f"{flag} {folder} holds files and no gallery; give a new or empty folder (a gallery is only "
                    f"written over an earlier gallery, which {MARKER} marks)")
        return None
    problem = unwritable_parent(folder)
    return f"{flag} {folder}: {problem}; give a folder for the gallery where you can write" if problem else None


def inside_problem(folder: Path, images: Path, flag: str, images_flag: str) -> str | None:
    """A gallery inside the folder of images: its thumbnails would be read as images next time."""
    inner, outer = folder.resolve(), images.resolve()  # through links too
    if inner == outer or outer in inner.parents:
        return (f"{flag} {folder} lies inside {images_flag} {images}: its thumbnails would be read as images "
                "the next time; give a folder outside it")
    return None


def write(folder: Path, gallery: Gallery, flag: str = "--gallery") -> Path:
    """Write the gallery into ``folder``; returns its index.html. The folder is checked again
    (``folder_problem``: the callers check it before their long work, and it may have changed
    since). The new thumbnails and page are made beside the old ones and swapped in at the end,
    so an error half-way leaves the previous gallery working."""
    problem = folder_problem(folder, flag)
    if problem:
        raise InputError(problem)
    staging = folder / ".new"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).write_text(MARKER_TEXT, encoding="utf-8")  # first: a torn gallery is still ours
        shutil.rmtree(staging, ignore_errors=True)
        (staging / THUMBS).mkdir(parents=True)
    except OSError as err:
        raise InputError(f"{flag} {folder}: cannot write there ({err.strerror or err}); give another folder") \
            from err
    try:
        data = page_data(gallery, staging, folder, list(gallery.unreadable))
        (staging / INDEX).write_text(page_html(data), encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(folder / THUMBS, ignore_errors=True)
    os.replace(staging / THUMBS, folder / THUMBS)
    os.replace(staging / INDEX, folder / INDEX)
    staging.rmdir()
    return folder / INDEX


def members_by_cluster(assigned: np.ndarray, confidence: np.ndarray) -> dict[int, np.ndarray]:
    """{cluster: its images' indices, most confident first (ties: by index)}; one sort for all
    clusters, which stays fast with many clusters and images."""
    order = np.lexsort((np.arange(len(assigned)), -np.asarray(confidence, dtype=np.float64), assigned))
    ids, starts = np.unique(np.asarray(assigned)[order], return_index=True)
    return {int(c): part for c, part in zip(ids, np.split(order, starts[1:]))}


def pick_shown(members: np.ndarray, per_cluster: int) -> tuple[np.ndarray, np.ndarray]:
    """(the most confident, the least confident) of ``members`` (sorted most confident first)
    to show: all of a cluster that fits, else a quarter of the places for its least confident."""
    if len(members) <= per_cluster:
        return members, members[:0]
    low = per_cluster // LOW_SHARE
    return members[:per_cluster - low], members[len(members) - low:]


def page_data(gallery: Gallery, staging: Path, folder: Path, unreadable: list[tuple[str, str]]) -> dict:
    """The page's JSON: one entry per cluster with images; thumbnails written into ``staging``.
    An image whose thumbnail cannot be made is added to ``unreadable`` and left off the page."""
    members = members_by_cluster(gallery.assigned, gallery.confidence)
    shown = {c: pick_shown(m, gallery.per_cluster) for c, m in members.items()}
    wanted = sorted(int(i) for top, low in shown.values() for i in (*top, *low))
    with ThreadPoolExecutor(THREADS) as pool:
        made = dict(zip(wanted, pool.map(lambda i: thumbnail_entry(gallery, i, staging, folder), wanted)))
    for i, entry in made.items():
        if isinstance(entry, str):  # the reason it could not be read
            unreadable.append((gallery.images.labels[i], entry))
            get_logger().warning("left out of the gallery (cannot read it): %s (%s)", gallery.images.labels[i], entry)
    images = {i: entry for i, entry in made.items() if not isinstance(entry, str)}
    clusters = []
    for c, part in members.items():
        top, low = shown[c]
        info = gallery.clusters[c]
        clusters.append({"id": c, "name": printable(info.name), "kind": info.kind,
                         "proposed": None if info.proposed is None else printable(info.proposed),
                         "similarity": None if info.similarity is None else round(info.similarity, 4),
                         "count": len(part), "confidence": round(float(gallery.confidence[part].mean()), 4),
                         "top": [images[int(i)] for i in top if int(i) in images],
                         "low": [images[int(i)] for i in low if int(i) in images]})
    empty = len(gallery.clusters) - len(members)
    return {"title": printable(gallery.title), "subtitle": printable(gallery.subtitle),
            "images": len(gallery.assigned), "empty_clusters": empty, "per_cluster": gallery.per_cluster,
            "unreadable": [[printable(label), printable(why)] for label, why in unreadable], "clusters": clusters}


def thumbnail_entry(gallery: Gallery, index: int, staging: Path, folder: Path) -> list | str:
    """[thumbnail, link, label, confidence] of image ``index`` with its thumbnail written; or,
    if it cannot be read, why."""
    try:
        image = gallery.images.read(index)
    except (ImageLoadError, *IMAGE_ERRORS) as err:
        return str(err.__cause__ or err)
    thumb = save_resized(image, THUMB_PX, staging / THUMBS / str(index))
    files = gallery.images.files
    if files is None:
        link = save_resized(image, LARGE_PX, staging / THUMBS / f"{index}-large")
    else:
        link = file_link(files[index], folder)
    return [thumb, link, printable(gallery.images.labels[index]), round(float(gallery.confidence[index]), 4)]


def save_resized(image: Image.Image, size: int, stem: Path) -> str:
    """``image`` with its longest side ``size``, saved as ``stem`` + .png or .jpg; returns its
    path relative to the gallery. A small image is enlarged by whole pixels and kept as PNG, so
    that a tiny digit stays sharp instead of blurred; a larger one is reduced and kept as JPEG,
    a tenth of the PNG's size for photos."""
    longest = max(image.size)
    if longest < size:
        scale = max(1, size // longest)
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
        path = stem.with_suffix(".png")
        image.save(path, optimize=False)
    else:
        image = image.copy()
        image.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=2.0)
        path = stem.with_suffix(".jpg")
        image.save(path, quality=85)
    return f"{THUMBS}/{path.name}"


def open_image(path: Path) -> Image.Image:
    """An image file as RGB, decoded at a reduced size where the format allows it (JPEG reads a
    large photo at 1/2 to 1/8 scale): thumbnails need few pixels."""
    with Image.open(path) as image:
        image.draft("RGB", (2 * LARGE_PX, 2 * LARGE_PX))
        return to_rgb(image)


def file_link(file: Path, folder: Path) -> str:
    """The address of ``file`` from a page in ``folder``: relative, so the gallery still opens its
    images when both move together; a file:// address where no relative path exists (another
    drive). Every byte that means something in a URL is percent-encoded, so a name is never read
    as a scheme (``javascript:``), a query or a fragment; names that are not UTF-8 keep their bytes."""
    try:
        relative = os.path.relpath(os.path.abspath(file), os.path.abspath(folder))
    except ValueError:
        return Path(os.path.abspath(file)).as_uri()
    return quote(os.fsencode(Path(relative).as_posix()))


def inline_json(data: dict) -> str:
    """``data`` as JSON that can sit inside a <script> element: ``<``, ``>`` and ``&`` as \\u
    escapes, so no name can close the element (``</script>``) or open a comment."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def page_html(data: dict) -> str:
    """The page: static markup without any data, the JSON blob, the script that renders it."""
    script_hash = base64.b64encode(hashlib.sha256(SCRIPT.encode("utf-8")).digest()).decode("ascii")
    policy = (f"default-src 'none'; script-src 'sha256-{script_hash}'; style-src 'unsafe-inline'; "
              "img-src 'self' file: data:")
    page = PAGE.replace("@POLICY@", policy).replace("@SCRIPT@", SCRIPT)
    return page.replace("@DATA@", inline_json(data))  # last: a name that holds "@SCRIPT@" stays a name


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="@POLICY@">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Cluster gallery</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.5em 2em; color: #222; background: #fafafa; }
header { position: sticky; top: 0; background: #fafafa; padding: 0.6em 0; border-bottom: 1px solid #ddd;
         z-index: 1; }
h1 { font-size: 1.3em; margin: 0.2em 0; }
.subtitle, .meta, .summary { color: #555; }
.controls { display: flex; gap: 1em; align-items: center; flex-wrap: wrap; margin-top: 0.4em; }
.controls input[type=search] { width: 16em; }
.unreadable { margin: 0.8em 0; color: #8a1c00; }
.cluster { margin: 1.2em 0; content-visibility: auto; contain-intrinsic-size: auto 320px; }
.cluster h2 { font-size: 1.1em; margin: 0 0 0.1em; }
.kind { font-size: 0.75em; padding: 0.05em 0.5em; border-radius: 0.8em; background: #dfe8f5;
        vertical-align: middle; }
.kind.new { background: #f7e3c6; }
.proposed { font-weight: normal; color: #1d5e20; }
.grid { display: flex; flex-wrap: wrap; gap: 6px; margin-top: 0.4em; }
.low-label { width: 100%; color: #a35a00; font-size: 0.85em; margin-top: 0.3em; }
figure { margin: 0; width: 96px; }
figure a { display: flex; width: 96px; height: 96px; align-items: center; justify-content: center;
           background: #fff; border: 2px solid #ccc; box-sizing: border-box; }
figure.low a { border: 2px dashed #e08a00; }
figure img { max-width: 92px; max-height: 92px; image-rendering: pixelated; }
figcaption { font-size: 11px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
</style>
</head>
<body>
<header>
<h1 id="title"></h1>
<div class="subtitle" id="subtitle"></div>
<div class="controls">
<label>Sort by <select id="sort">
<option value="size">size</option>
<option value="confidence">mean confidence</option>
<option value="name">name</option>
<option value="cluster">cluster id</option>
</select></label>
<label><input type="checkbox" id="reverse"> reversed</label>
<label>Filter <input type="search" id="filter" placeholder="cluster or proposed name"></label>
<span class="summary" id="summary"></span>
</div>
</header>
<noscript>This page shows its clusters with JavaScript; allow it for this file.</noscript>
<div class="unreadable" id="unreadable"></div>
<main id="clusters"></main>
<script type="application/json" id="gallery-data">@DATA@</script>
<script>@SCRIPT@</script>
</body>
</html>
"""

# Every piece of data reaches the page through textContent, setAttribute or a property, never
# through innerHTML: a name is text, whatever it holds.
SCRIPT = """
"use strict";
(function () {
  var started = performance.now();
  var data = JSON.parse(document.getElementById("gallery-data").textContent);
  var list = document.getElementById("clusters");
  var sortBox = document.getElementById("sort");
  var filterBox = document.getElementById("filter");
  var reverseBox = document.getElementById("reverse");
  var EAGER = 30;
  var SORTS = {
    size: function (a, b) { return b.c.count - a.c.count; },
    confidence: function (a, b) { return b.c.confidence - a.c.confidence; },
    name: function (a, b) { return a.title.localeCompare(b.title, undefined, {numeric: true}); },
    cluster: function (a, b) { return a.c.id - b.c.id; }
  };

  function make(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function thumbnail(image, low) {
    var figure = make("figure", low ? "low" : "");
    var link = make("a");
    link.href = image[1];
    var img = make("img");
    img.src = image[0];
    img.alt = image[2];
    img.title = image[2] + " (confidence " + image[3].toFixed(3) + ")";
    img.loading = "lazy";
    link.appendChild(img);
    figure.appendChild(link);
    figure.appendChild(make("figcaption", "", image[2]));
    return figure;
  }

  function section(c) {
    var node = make("section", "cluster");
    node.dataset.cluster = c.id;
    var heading = make("h2");
    heading.appendChild(make("span", "name", c.name));
    heading.appendChild(document.createTextNode(" "));
    heading.appendChild(make("span", "kind " + c.kind, c.kind));
    if (c.proposed !== null) {
      heading.appendChild(document.createTextNode(" "));
      heading.appendChild(make("span", "proposed", "proposed: " + c.proposed + " (similarity " +
                               c.similarity.toFixed(3) + ")"));
    }
    node.appendChild(heading);
    var shown = c.top.length + c.low.length;
    node.appendChild(make("div", "meta", "cluster " + c.id + " \\u00b7 " + c.count + " image" +
                          (c.count === 1 ? "" : "s") + " \\u00b7 mean confidence " + c.confidence.toFixed(3) +
                          (shown < c.count ? " \\u00b7 showing the " + c.top.length + " most confident" : "")));
    return node;
  }

  // The thumbnails of a section are made when it comes near the screen: a page of a thousand
  // clusters holds tens of thousands of them, which as nodes from the start took the browser
  // half a minute to load (measured, docs/predictions.md).
  function fill(entry) {
    if (entry.filled) { return; }
    entry.filled = true;
    var c = entry.c;
    var grid = make("div", "grid");
    c.top.forEach(function (image) { grid.appendChild(thumbnail(image, false)); });
    if (c.low.length) {
      grid.appendChild(make("div", "low-label", "the " + c.low.length + " least confident (dashed):"));
      c.low.forEach(function (image) { grid.appendChild(thumbnail(image, true)); });
    }
    entry.node.appendChild(grid);
  }

  var observer = window.IntersectionObserver ? new IntersectionObserver(function (seen) {
    seen.forEach(function (change) {
      if (change.isIntersecting) { fill(change.target.entry); observer.unobserve(change.target); }
    });
  }, {rootMargin: "2000px 0px"}) : null;

  function unreadableList() {
    if (!data.unreadable.length) { return; }
    var box = document.getElementById("unreadable");
    box.appendChild(make("strong", "", data.unreadable.length + " image file(s) could not be read " +
                         "and are not shown:"));
    var items = make("ul");
    data.unreadable.forEach(function (entry) { items.appendChild(make("li", "", entry[0] + ": " + entry[1])); });
    box.appendChild(items);
  }

  function readState() {
    var params = new URLSearchParams(location.hash.slice(1));
    var sort = params.get("sort");
    return {sort: SORTS.hasOwnProperty(sort) ? sort : "size", filter: params.get("filter") || "",
            reverse: params.get("reverse") === "1"};
  }

  function show(state) {
    sortBox.value = state.sort;
    reverseBox.checked = state.reverse;
    if (filterBox.value !== state.filter) { filterBox.value = state.filter; }
    var order = entries.slice().sort(function (a, b) { return SORTS[state.sort](a, b) || a.c.id - b.c.id; });
    if (state.reverse) { order.reverse(); }
    var needle = state.filter.toLowerCase();
    var visible = 0;
    var fragment = document.createDocumentFragment();
    order.forEach(function (entry) {
      entry.node.hidden = entry.text.indexOf(needle) < 0;
      visible += entry.node.hidden ? 0 : 1;
      fragment.appendChild(entry.node);
    });
    list.appendChild(fragment);
    var eager = 0;  // the first sections at once (all of a small gallery), the others when seen
    order.forEach(function (entry) {
      if (entry.node.hidden || entry.filled) { return; }
      if (eager < EAGER || !observer) { fill(entry); eager += 1; } else { observer.observe(entry.node); }
    });
    document.getElementById("summary").textContent = "showing " + visible + " of " + entries.length +
      " clusters";
  }

  function writeState() {
    var params = new URLSearchParams();
    params.set("sort", sortBox.value);
    if (filterBox.value) { params.set("filter", filterBox.value); }
    if (reverseBox.checked) { params.set("reverse", "1"); }
    try {
      history.replaceState(null, "", "#" + params.toString());  // no new history entry per key typed
    } catch (refused) {
      location.hash = params.toString();  // a browser that refuses it for file:// pages
    }
    show(readState());
  }

  document.title = data.title;
  document.getElementById("title").textContent = data.title;
  document.getElementById("subtitle").textContent = (data.subtitle ? data.subtitle + " \\u00b7 " : "") +
    data.images + " images in " + data.clusters.length + " clusters" + (data.empty_clusters ? " (" +
    data.empty_clusters + " more hold no image)" : "") + " \\u00b7 at most " + data.per_cluster +
    " thumbnails each; click one for the image";
  unreadableList();
  var entries = data.clusters.map(function (c) {
    var title = c.proposed !== null ? c.proposed : c.name;
    var text = [c.name, c.proposed || "", "cluster " + c.id, c.kind].join("\\n").toLowerCase();
    var entry = {c: c, title: title, text: text, node: section(c), filled: false};
    entry.node.entry = entry;
    return entry;
  });
  show(readState());
  sortBox.addEventListener("change", writeState);
  reverseBox.addEventListener("change", writeState);
  filterBox.addEventListener("input", writeState);
  window.addEventListener("hashchange", function () { show(readState()); });
  document.body.dataset.renderMs = (performance.now() - started).toFixed(1);
})();
"""
