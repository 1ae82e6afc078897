"""What a run prints and records of its results: one line per epoch (console, ``log.txt``,
``metrics.jsonl``, TensorBoard), the final accuracy table (log and a JSON file) and the final
confusion matrices (log and files).

Each leads with the reported accuracy (``vocabulary.reported_head``): the visual head's, which
GET's paper reports (its last epoch), the text and fused heads following as diagnostics."""
from __future__ import annotations

from data.data_utils import count_skipped_images
from data.task import Task
from engine import Position, Stage
from runs.run import CLUSTER_SIZES, CONFUSION_DIR, SKIPPED_IMAGES, Run
from util.io import save_json
from util.logging_utils import TENSORBOARD_DIR, get_logger
from views import confusion
from vocabulary import (EVAL_TAG, GROUPS, HEADS, REPORTED_TAG, SPLITS, STAGE2, heads_of, metric_key, reported_head,
                        reported_in)


def log_epoch(stage: Stage, position: Position, summary: dict, run: Run) -> None:
    """A finished epoch to the console, ``metrics.jsonl`` and TensorBoard: ``summary`` (lr,
    seconds, eval metrics) with the mean loss terms and the stage's schedule values."""
    epoch, metrics, schedule = position.epoch, summary.pop("eval", {}), stage.schedule(position.epoch)
    record = {"stage": stage.name, "epoch": epoch, **summary, **schedule,
              "loss": {k: v / max(position.step_in_epoch, 1) for k, v in position.sums.items()}}
    if metrics:
        record["eval"] = metrics
    skipped = count_skipped_images(run.dir / SKIPPED_IMAGES) if run.args.skip_bad_images else 0
    if skipped:
        record["skipped_images"] = skipped
        get_logger().warning("skipped %d unreadable images so far (listed in %s)", skipped,
                             run.dir / SKIPPED_IMAGES)
    reported = reported_in(metrics)
    run.logger.log_scalars({f"{stage.name}/lr": record["lr"],
                            **{f"{stage.name}/epoch_loss/{k}": v for k, v in record["loss"].items()},
                            **{f"{stage.name}/{k}": v for k, v in schedule.items()},
                            **{f"{EVAL_TAG}/{k}": v for k, v in metrics.items() if not k.endswith("n_samples")},
                            **reported_scalars(metrics, reported)},
                           epoch)
    run.logger.log_epoch(record)
    get_logger().info("%s epoch %d/%d  loss %.4f  lr %.4g  (%.1fs)%s", stage.name, epoch + 1,
                      stage.epochs, record["loss"].get("total", float("nan")), record["lr"],
                      record["seconds"], format_eval(metrics, reported))


def reported_scalars(metrics: dict, head: str) -> dict[str, float]:
    """{'accuracy/<split>/<group>': value} of the reported head, for TensorBoard."""
    return {f"{REPORTED_TAG}/{split}/{group}": metrics[metric_key(split, head, group)]
            for split in SPLITS for group in GROUPS if metric_key(split, head, group) in metrics}


def tensorboard_layout(run: Run, branches: str) -> None:
    """TensorBoard's Custom Scalars page of a model of ``branches``: the reported accuracy
    first, then the other heads (diagnostics), the agreement of the two heads and stage 2's loss."""
    heads, reported = heads_of(branches), reported_head(branches)

    def chart(tags: list[str]) -> list:
        return ["Multiline", tags]

    diagnostics = {f"{split} / {head}": chart([f"eval/{metric_key(split, head, g)}" for g in GROUPS])
                   for head in heads if head != reported for split in SPLITS}
    if len(heads) > 1:
        diagnostics.update({f"{split} / agreement": chart([f"eval/{split}/agreement/same", f"eval/{split}/agreement/matched"])
                            for split in SPLITS})
    layout = {f"1. reported accuracy: the {reported} head (as the paper), All/Old/New": {
                  split: chart([f"{REPORTED_TAG}/{split}/{g}" for g in GROUPS]) for split in SPLITS},
              "2. diagnostics: the other heads": diagnostics,
              "3. stage 2 loss": {"total": chart([f"{STAGE2}/epoch_loss/total"])}}
    run.logger.set_layout({category: charts for category, charts in layout.items() if charts})


def format_eval(metrics: dict, reported: str = "visual") -> str:
    """Rows of All/Old/New for each evaluated split, the reported head first, then the other
    heads (diagnostics) and how alike the two heads cluster it
    (``evaluation.clusters.agreement_metrics``); '' without metrics."""
    def accuracy(split: str, head: str) -> str:
        return f"{head} " + "/".join(f"{metrics[metric_key(split, head, group)]:.4f}" for group in GROUPS)

    def row(split: str) -> str:
        others = [accuracy(split, head) for head in HEADS
                  if head != reported and metric_key(split, head, GROUPS[0]) in metrics]
        if f"{split}/agreement/same" in metrics:
            others.append(f"agree {metrics[f'{split}/agreement/same']:.4f}/{metrics[f'{split}/agreement/matched']:.4f}")
        return f"\n    {split:<17}{accuracy(split, reported)}" + ("  |  " + "  ".join(others) if others else "")

    rows = [row(split) for split in SPLITS if metric_key(split, reported, GROUPS[0]) in metrics]
    header = f"  (All/Old/New; {reported}: the reported accuracy, as the paper"
    if any("|" in r for r in rows):
        header += "; after |, diagnostics" + ("; agree: visual and text in the same cluster, as numbered/after "
                                              "matching" if any("agree" in r for r in rows) else "")
    return header + ")" + "".join(rows) if rows else ""


def reported_summary(metrics: dict, head: str) -> dict:
    """The reported accuracy of the final metrics: what a paper's table would hold."""
    split = SPLITS[0]
    return {"head": head, "split": split, **{group: metrics[metric_key(split, head, group)] for group in GROUPS},
            "note": f"the {head} head on the unlabelled training images at the last epoch, as GET's paper "
                    "reports; the other heads are diagnostics"}


def record_results(metrics: dict, ground_truth: bool, run: Run, title: str, file_name: str) -> dict:
    """The final metrics to the log and to ``file_name`` in the run folder, with the reported
    accuracy as its "reported" entry; returns what was saved. Without ground truth (folder
    dataset, labelled/unlabelled layout) there is no accuracy, only what the clusters show."""
    log, head = get_logger(), reported_in(metrics)
    saved = dict(metrics)
    if ground_truth:
        log.info("%s (%s)%s", title, run.args.eval_func, format_eval(metrics, head))
        if metric_key(SPLITS[0], head, GROUPS[0]) in metrics:
            saved["reported"] = reported_summary(metrics, head)
            values = [metrics[metric_key(SPLITS[0], head, group)] for group in GROUPS]
            log.info("reported accuracy (the %s head on %s, as the paper): All %.4f  Old %.4f  New %.4f",
                     head, SPLITS[0], *values)
    else:  # describe_clusters has just logged the clusters
        log.info("%s: the unlabelled images have no ground truth, so there is no accuracy; their "
                 "clusters are above, their sizes in %s", title, run.dir / CLUSTER_SIZES)
    log.info("TensorBoard: tensorboard --logdir %s", run.dir / TENSORBOARD_DIR)
    if run.info.is_main:
        save_json(saved, run.dir / file_name)
    return saved


def record_confusion(predictions: dict, task: Task, run: Run) -> None:
    """The confusion matrices of the final evaluation's predictions ({split: ``predict_split``'s}),
    per split and head: the most confused classes to the log, the counts and the heat map to
    ``confusion/<split>_<head>.json`` and ``.png``. Without ground truth there are none."""
    log = get_logger()
    if not task.ground_truth:
        log.info("no confusion matrices: the unlabelled images have no ground truth")
        return
    if not run.info.is_main:
        return
    matrices = confusion.run_matrices(predictions, task.class_names, task.num_labeled_classes, task.num_classes)
    folder = run.dir / CONFUSION_DIR
    for (split, head), matrix in matrices.items():
        log.info("most confused classes, %s / %s (true class -> the class whose matched cluster took its "
                 "images)%s", split, head, confusion.format_confused(confusion.most_confused([matrix])))
        confusion.save(matrix, confusion.matrix_path(folder, split, head, ".json"))
    try:
        for (split, head), matrix in matrices.items():
            title = confusion.title_of(split, head, matrix, run.args.eval_func)
            confusion.draw(matrix, title, confusion.matrix_path(folder, split, head, ".png"))
    except ImportError:  # the counts are saved: report.py --plots draws them elsewhere
        log.warning("confusion matrices: no heat maps, matplotlib is missing (pip install matplotlib)")
    log.info("confusion matrices (true class x matched cluster, counts and heat maps): %s", folder)
