"""What a run prints and records of its results: one line per epoch (console, ``log.txt``,
``metrics.jsonl``, TensorBoard), the final accuracy table (log and a JSON file) and the final
confusion matrices (log and files)."""
from __future__ import annotations

from data.data_utils import count_skipped_images
from data.task import Task
from engine import Position, Stage
from runs.run import CLUSTER_SIZES, CONFUSION_DIR, SKIPPED_IMAGES, Run
from util.io import save_json
from util.logging_utils import TENSORBOARD_DIR, get_logger
from views import confusion
from vocabulary import GROUPS, HEADS, SPLITS, metric_key


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
    run.logger.log_scalars({f"{stage.name}/lr": record["lr"],
                            **{f"{stage.name}/epoch_loss/{k}": v for k, v in record["loss"].items()},
                            **{f"{stage.name}/{k}": v for k, v in schedule.items()},
                            **{f"eval/{k}": v for k, v in metrics.items() if not k.endswith("n_samples")}},
                           epoch)
    run.logger.log_epoch(record)
    get_logger().info("%s epoch %d/%d  loss %.4f  lr %.4g  (%.1fs)%s", stage.name, epoch + 1,
                      stage.epochs, record["loss"].get("total", float("nan")), record["lr"],
                      record["seconds"], format_eval(metrics))


def format_eval(metrics: dict) -> str:
    """Rows of All/Old/New per head for each evaluated split, then how alike the two heads
    cluster it (``evaluation.clusters.agreement_metrics``); '' without metrics."""
    rows = [f"\n    {split:<17}" + "  ".join(
        f"{head} " + "/".join(f"{metrics[metric_key(split, head, group)]:.4f}" for group in GROUPS)
        for head in HEADS)
        + f"  agree {metrics[f'{split}/agreement/same']:.4f}/{metrics[f'{split}/agreement/matched']:.4f}"
        for split in SPLITS if metric_key(split, HEADS[0], GROUPS[0]) in metrics]
    header = "  (All/Old/New; agree: visual and text in the same cluster, as numbered/after matching)"
    return header + "".join(rows) if rows else ""


def record_results(metrics: dict, ground_truth: bool, run: Run, title: str, file_name: str) -> dict:
    """The final metrics to the log and to ``file_name`` in the run folder. Without ground truth
    (folder dataset, labelled/unlabelled layout) there is no accuracy, only what the clusters show."""
    if ground_truth:
        get_logger().info("%s (%s)%s", title, run.args.eval_func, format_eval(metrics))
    else:  # describe_clusters has just logged the clusters
        get_logger().info("%s: the unlabelled images have no ground truth, so there is no accuracy; their "
                          "clusters are above, their sizes in %s", title, run.dir / CLUSTER_SIZES)
    get_logger().info("TensorBoard: tensorboard --logdir %s", run.dir / TENSORBOARD_DIR)
    if run.info.is_main:
        save_json(metrics, run.dir / file_name)
    return metrics


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
