"""Job logs: progress bars a person can read in a log file."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from vlmflow.core.logs import log_to, progress_bar


def test_a_bar_in_a_log_file_is_lines_not_carriage_returns(tmp_path: Path) -> None:
    log_file = tmp_path / "job.log"
    with log_to(log_file):
        assert sum(progress_bar(range(5), desc="caption 000001", unit="batch")) == 10
    text = log_file.read_text(encoding="utf-8")
    assert "\r" not in text
    bars = [line for line in text.splitlines() if line.startswith("caption 000001:")]
    # The first draw and the last (a redraw every 30 s in between).
    assert bars[0].startswith("caption 000001:   0%") and "0/5" in bars[0]
    assert bars[-1].startswith("caption 000001: 100%") and "5/5" in bars[-1]


def test_a_bar_on_a_terminal_redraws_in_place() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    with contextlib.redirect_stderr(screen):
        bar = progress_bar(total=3, desc="train phase 1", unit="step")
        for _ in range(3):
            bar.update(1)
        bar.close()
    assert "\r" in screen.getvalue() and "3/3" in screen.getvalue()


def test_a_disabled_bar_writes_nothing() -> None:
    stream = io.StringIO()
    with contextlib.redirect_stderr(stream):
        assert list(progress_bar([1, 2], desc="rank 1", unit="batch", disable=True)) == [1, 2]
    assert stream.getvalue() == ""
