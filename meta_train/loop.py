"""The run loop shared by the meta-trainer (``trainer.py``) and the few-shot trainer
(``fewshot/train.py``): outer steps until a budget, one JSON line per step in ``log.jsonl``,
progress on a bar (or a line every few steps without ``tqdm``), a checkpoint every so many steps
and at the end, and on resume the log cut back to the checkpoint's step.

A trainer gives the loop ``step`` (outer steps taken), ``outer_step()`` (one step; returns its
log record) and ``save()`` (an atomic checkpoint of everything needed to go on). The loop adds
``wall`` to each record: seconds since this loop (this process's part of the run) started.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol


class Steppable(Protocol):
    step: int

    def outer_step(self) -> Dict[str, Any]: ...

    def save(self) -> None: ...


def trim_log(log: Path, step: int) -> List[Dict[str, Any]]:
    """Drop the lines of ``log`` written after outer step ``step`` (those of a run that went on
    past its last checkpoint and stopped); return the records kept."""
    if not log.exists():
        return []
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    records = [r for r in records if r["step"] <= step]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def run_loop(trainer: Steppable, total: int, log: Optional[Path], checkpoint_every: int, *,
             desc: str, shown: Callable[[Dict[str, Any]], Dict[str, str]], progress: bool = True,
             print_every: int = 10, stop: Callable[[], bool] = lambda: False) -> None:
    """Take outer steps until ``trainer.step`` reaches ``total`` or ``stop()`` is true.

    ``log``: where records are appended (None: not written, as on the workers other than rank
    0). ``shown(record)``: the few values the progress bar shows with ``progress`` (and
    ``tqdm`` installed); otherwise a line on stdout every ``print_every`` steps (0: none). A
    checkpoint is saved every ``checkpoint_every`` steps, at ``total`` and when ``stop()`` turns
    true."""
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=trainer.step, desc=desc, dynamic_ncols=True)
        except ImportError:
            pass
    start = time.time()
    try:
        while trainer.step < total and not stop():
            record = {**trainer.outer_step(), "wall": time.time() - start}
            if log is not None:
                with open(log, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(**shown(record))
            elif print_every and (trainer.step % print_every == 0 or trainer.step == total):
                print(f"[{desc}] step {trainer.step}/{total} " + " ".join(f"{k} {v}" for k, v in shown(record).items()),
                      flush=True)
            if trainer.step % checkpoint_every == 0 or trainer.step == total or stop():
                trainer.save()
    finally:
        if bar is not None:
            bar.close()
