"""A small progress bar on stderr: redrawn in place on a terminal, a line per 10% otherwise."""
import sys
import time


class Progress:
    def __init__(self, total: int, label: str, stream=None, width: int = 24):
        self.total, self.label, self.width = max(total, 1), label, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._last_draw, self._last_decile = 0.0, -1

    def update(self, done: int, info: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        elapsed = now - self.t0
        eta = elapsed / done * (self.total - done) if done else 0.0
        frac = min(done / self.total, 1.0)
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
        self.stream.write(("\r" + end + "\x1b[K\n") if self.tty else end + "\n")
        self.stream.flush()
