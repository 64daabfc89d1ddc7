"""Keep third-party chatter out of the terminal: while a run executes, Python warnings and the
transformers / datasets / huggingface_hub / peft / flwr loggers write to the run's ``run.log``
instead of stderr, and their progress bars are off. The terminal shows only fedblend's own
output."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

THIRD_PARTY = ("py.warnings", "transformers", "datasets", "huggingface_hub", "peft", "flwr",
               "flwr_datasets", "torch", "accelerate", "bitsandbytes", "matplotlib", "PIL",
               "fedblend.backbone")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


class _RunFileHandler(logging.FileHandler):
    """Opens (appending) on the first record, creating the run directory if needed."""

    def __init__(self, path: Path) -> None:
        self._path = path
        super().__init__(path, mode="a", delay=True)

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        super().emit(record)


def _progress_bars_off() -> None:
    with contextlib.suppress(Exception):
        from transformers.utils import logging as tl

        tl.disable_progress_bar()
    with contextlib.suppress(Exception):
        from datasets.utils import logging as dl

        dl.disable_progress_bar()


@contextlib.contextmanager
def third_party_to(log_file: str | Path) -> Iterator[None]:
    """Route warnings and third-party logging to ``log_file`` for the duration."""
    handler = _RunFileHandler(Path(log_file))
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    saved = []
    for name in THIRD_PARTY:
        lg = logging.getLogger(name)
        saved.append((lg, lg.handlers[:], lg.propagate))
        lg.handlers = [handler]
        lg.propagate = False
    logging.getLogger("fedblend.backbone").setLevel(logging.INFO)
    _progress_bars_off()
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield
    finally:
        logging.captureWarnings(False)
        for lg, handlers, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate
        handler.close()
