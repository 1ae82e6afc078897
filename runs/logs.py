"""A resumed run logs each epoch and step once: ``metrics.jsonl`` and the TensorBoard events
are cut back to the resume point before it continues."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from util.logging_utils import METRICS_FILE, TENSORBOARD_DIR
from vocabulary import EVAL_TAG, REPORTED_TAG, STAGE2, STAGES


def keeps(stage: str, epoch: int, global_step: int) -> Callable[[str, int], bool]:
    """Whether a logged scalar (tag, step) lies before a resume point of ``stage`` at
    (``epoch`` completed epochs, ``global_step`` steps): per-step tags ``<stage>/loss/*``
    count steps, every other tag of the stage (and ``eval/*``, ``accuracy/*`` of stage 2) counts
    epochs."""
    later = STAGES[STAGES.index(stage) + 1:]

    def keep(tag: str, step: int) -> bool:
        owner = tag.split("/", 1)[0]
        owner = STAGE2 if owner in (EVAL_TAG, REPORTED_TAG) else owner
        if owner in later:
            return False
        if owner != stage:
            return True
        return step <= global_step if tag.startswith(f"{stage}/loss/") else step < epoch

    return keep


def truncate_logs(run_dir: Path, stage: str, epoch: int, global_step: int) -> None:
    """Cut ``metrics.jsonl`` and the TensorBoard events back to a resume point, so that a
    resumed run logs each epoch and step once."""
    keep = keeps(stage, epoch, global_step)
    jsonl = run_dir / METRICS_FILE
    if jsonl.is_file():
        lines = jsonl.read_text().splitlines()
        kept = [line for line, r in zip(lines, map(json.loads, lines)) if keep(f"{r['stage']}/", r["epoch"])]
        jsonl.write_text("".join(line + "\n" for line in kept))
    old_files = sorted((run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    if not old_files:
        return
    tmp_dir = run_dir / TENSORBOARD_DIR / "kept"
    writer = EventFileWriter(str(tmp_dir))
    for path in old_files:
        for record in RawEventFileLoader(str(path)).Load():
            event = Event.FromString(record)
            values = [v for v in event.summary.value if keep(v.tag, event.step)]
            if values:
                del event.summary.value[:]
                event.summary.value.extend(values)
                writer.add_event(event)
    writer.close()
    (kept,) = tmp_dir.iterdir()
    for path in old_files:
        path.unlink()
    # The name of the first old file: TensorBoard reads files in name order, and these
    # events come before those of the resumed run.
    kept.rename(old_files[0])
    tmp_dir.rmdir()
