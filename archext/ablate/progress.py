"""A small progress bar on stderr: redrawn in place on a terminal, a line per 10% otherwise.
Runs in worker processes send their progress to the parent (``sink``), which draws one status
line for all of them (`MultiProgress`)."""
import shutil
import sys
import time
from typing import Callable, Optional


class Progress:
    def __init__(self, total: int, label: str, stream=None, width: int = 24,
                 sink: Optional[Callable[[str, str, str], None]] = None):
        self.total, self.label, self.width = max(total, 1), label, width
        self.stream = stream or sys.stderr
        self.sink = sink  # sink(kind, label, text): "update" or "done"; replaces the stream
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._last_draw, self._last_decile = 0.0, -1

    def update(self, done: int, info: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        elapsed = now - self.t0
        eta = elapsed / done * (self.total - done) if done else 0.0
        frac = min(done / self.total, 1.0)
        if self.sink is not None:
            if force or now - self._last_draw >= 0.5 or done >= self.total:
                self._last_draw = now
                self.sink("update", self.label.strip(),
                          f"{self.label.strip()} {done}/{self.total} {info} {elapsed:.0f}s<{eta:.0f}s")
            return
        if self.tty:
            if not force and now - self._last_draw < 0.1 and done < self.total:
                return
            fill = int(frac * self.width)
            bar = "█" * fill + "·" * (self.width - fill)
            line = (f"\r{self.label} |{bar}| {done}/{self.total} {info} "
                    f"{elapsed:.0f}s<{eta:.0f}s\x1b[K")
            self.stream.write(line)
            self.stream.flush()
            self._last_draw = now
        else:
            decile = int(frac * 10)
            if decile > self._last_decile or force:
                self._last_decile = decile
                self.stream.write(f"{self.label} {done}/{self.total} {info} {elapsed:.0f}s\n")
                self.stream.flush()

    def close(self, summary: str = "") -> None:
        elapsed = time.perf_counter() - self.t0
        end = f"{self.label} {summary} ({elapsed:.1f}s)"
        if self.sink is not None:
            self.sink("done", self.label.strip(), end)
            return
        self.stream.write(("\r" + end + "\x1b[K\n") if self.tty else end + "\n")
        self.stream.flush()


class MultiProgress:
    """The parent's view of runs in several worker processes: on a terminal one status line with
    every active run, redrawn in place, and a line per finished run above it; otherwise the
    finished runs' lines and, every 30 s, the active runs' progress."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.active: dict = {}
        self._last_plain = time.perf_counter()

    def _status(self) -> str:
        width = shutil.get_terminal_size((120, 20)).columns - 1
        return "  |  ".join(self.active.values())[:width]

    def message(self, kind: str, label: str, text: str) -> None:
        if kind == "update":
            self.active[label] = text
        else:
            self.active.pop(label, None)
        if self.tty:
            if kind == "done":
                self.stream.write("\r" + text + "\x1b[K\n")
            self.stream.write("\r" + self._status() + "\x1b[K")
        elif kind == "done":
            self.stream.write(text + "\n")
        elif time.perf_counter() - self._last_plain >= 30:
            self._last_plain = time.perf_counter()
            self.stream.write("  ... " + " | ".join(self.active.values()) + "\n")
        self.stream.flush()

    def write(self, text: str) -> None:
        """A line of its own (a kept run, a note), above the status line."""
        if self.tty:
            self.stream.write("\r\x1b[K" + text + self._status())
        else:
            self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.active:
            self.stream.write("\r\x1b[K")
        self.active.clear()
        self.stream.flush()
