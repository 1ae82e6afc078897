"""The task of a run, described once: the dataset, its GCD class split, K and the class names.

``task_from_args(args)`` builds it from the flags at the edge (train.py, predict.py,
estimate_k.py), before anything else reads data; everything below takes the ``Task`` and
never the flags' blackboard. It is frozen: the K estimate gives a new task (``with_k``).

    task = task_from_args(parse_args(["--dataset_name", "cub"]))
    task.num_labeled_classes, task.num_classes, task.class_names[:2]   # 100, 200, (...)
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from data.get_datasets import class_split, download as download_dataset, get_class_names
from errors import InputError

# Where K comes from: the dataset's split, --num_classes N, or (still) to be estimated.
K_FROM_SPLIT, K_FROM_FLAG, K_TO_ESTIMATE = "split", "--num_classes", "to estimate"


@dataclass(frozen=True)
class Task:
    """The attribute names are the GCD codebases' (``args.train_classes`` etc. in SimGCD), so
    ``get_datasets(name, train_tf, test_tf, task)`` reads a task as those read their flags."""
    dataset_name: str
    data_root: str | None              # --data_root (None: config's default)
    old_classes: str | None            # --old_classes (folder dataset, train/ layout)
    prop_train_labels: float           # share of the old classes' images that are labelled
    train_classes: tuple[int, ...]     # the old classes: original class ids, in split order
    unlabeled_classes: tuple[int, ...]  # the new classes (none where they are unknown)
    num_classes: int                   # K: old classes + new clusters
    ground_truth: bool                 # whether the classes of the unlabelled images are known
    class_names: tuple[str, ...]       # class_names[t]: the name of remapped target t
    k_source: str = K_FROM_SPLIT       # where K comes from (or 'estimate', 'checkpoint')

    @property
    def num_labeled_classes(self) -> int:
        return len(self.train_classes)

    @property
    def num_unlabeled_classes(self) -> int:
        """K - K_old: the clusters of new classes."""
        return self.num_classes - self.num_labeled_classes

    @property
    def k_pending(self) -> bool:
        """K is still to be estimated (--num_classes auto, or unknown new classes)."""
        return self.k_source == K_TO_ESTIMATE

    def record(self) -> dict:
        """The class split, as a run's config.json records it beside the flags."""
        return {"train_classes": list(self.train_classes), "unlabeled_classes": list(self.unlabeled_classes),
                "num_labeled_classes": self.num_labeled_classes,
                "num_unlabeled_classes": self.num_unlabeled_classes, "ground_truth": self.ground_truth}

    def with_k(self, k: int, source: str) -> Task:
        """The same task with K = ``k`` (an estimate, or a checkpoint's K)."""
        return replace(self, num_classes=check_k(k, self, source), k_source=source)


def build_task(dataset_name: str, data_root: str | None = None, old_classes: str | None = None,
               num_classes: int | str | None = None, prop_train_labels: float = 0.5,
               class_names: str = "reference", download: bool = False, max_classes: int | None = None) -> Task:
    """The task of ``dataset_name`` (arguments as train.py's flags of the same names): reads the
    class split and the class names, after downloading the dataset with ``download`` (CIFAR).
    A K below K_old, or a K to estimate with ``max_classes`` at most K_old, is refused here,
    before any run folder, CLIP or image."""
    if download:
        download_dataset(dataset_name, data_root)
    old, new = class_split(dataset_name, data_root, old_classes)
    names = get_class_names(dataset_name, data_root, old, new or [], class_names, old_classes)
    task = Task(dataset_name, data_root, old_classes, prop_train_labels, tuple(old), tuple(new or []),
                num_classes=len(old) + len(new or []), ground_truth=new is not None,
                class_names=tuple(names))
    if num_classes == "auto" or (num_classes is None and new is None):
        check_max_classes(max_classes, task)
        return replace(task, k_source=K_TO_ESTIMATE)
    if num_classes is not None:
        return task.with_k(int(num_classes), K_FROM_FLAG)
    return task


def task_from_args(args) -> Task:
    """``build_task`` from parsed flags (or any namespace with the same names; absent optional
    ones take their defaults)."""
    return build_task(args.dataset_name, getattr(args, "data_root", None), getattr(args, "old_classes", None),
                      getattr(args, "num_classes", None), getattr(args, "prop_train_labels", 0.5),
                      getattr(args, "class_names", "reference"), getattr(args, "download", False),
                      getattr(args, "max_classes", None))


def check_k(k: int, task: Task, source: str = K_FROM_FLAG) -> int:
    # GCD expects new classes (K > K_old), but K == K_old is allowed: no cluster is then kept
    # for new classes, yet the run is sound (still scored by the Hungarian matching), and the
    # K estimate's own search starts at K_old.
    old = task.num_labeled_classes
    if k < old:
        raise InputError(f"K = {k} ({source}) is fewer than the {old} old classes (K_old) of "
                         f"{task.dataset_name}; K counts the old and the new classes: give "
                         f"--num_classes {old} or more (K >= K_old), or auto to estimate it.")
    return k


def check_max_classes(max_classes: int | None, task: Task) -> None:
    """K is searched in [K_old, --max_classes]: the interval needs a K above K_old."""
    old = task.num_labeled_classes
    if max_classes is not None and max_classes <= old:
        raise InputError(f"--max_classes {max_classes} leaves no K to search above the {old} old classes "
                         f"(K_old) of {task.dataset_name}: K is estimated in [K_old, --max_classes], so "
                         f"give --max_classes {old + 1} or more.")
