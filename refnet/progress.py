"""Progress of long loops on stderr, and the partial result a Ctrl-C leaves behind.

A library call is silent: ``verify``, ``train``, ``run_study`` and ``diagnose`` take a
``progress`` reporter and default to :data:`SILENT`. The command line hands them a
:class:`Reporter` on stderr (stdout stays the report, byte for byte). The loop calls
``start(total, unit)`` once, ``update(done, note)`` after every item and ``close()`` at the end.

When a reporter shows anything (the named choices):

- nothing until the run has lasted ``after`` seconds (:data:`SHOW_AFTER_S` = 2 s: a run that
  finishes in a blink prints nothing; the command line reads :data:`ENV_AFTER`, so
  ``REFNET_PROGRESS_AFTER=0`` shows everything and ``=inf`` nothing);
- on a terminal, one bar redrawn in place, at most every :data:`REDRAW_S` (and at the last item);
- otherwise (a pipe or a log file) plain lines: one per item, or, for loops started with
  ``lines=n``, one per n-th of the run (and one at the last item), so a log of a 10 000-step
  training run has about n lines, not 10 000.

Ctrl-C. A loop that can keep what it has done catches ``KeyboardInterrupt`` and raises
:class:`Interrupted` (a ``KeyboardInterrupt``, so callers that catch that still do) carrying
the partial result; the command line writes it, marked partial, and exits 130.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Mapping, Optional

SHOW_AFTER_S = 2.0        # "takes more than a few seconds": show progress only past this
REDRAW_S = 0.25           # a terminal bar is redrawn at most 4 times a second
BAR_WIDTH = 30
NOTE_WIDTH = 40           # a terminal line stays one line: the note is cut to this
ENV_AFTER = "REFNET_PROGRESS_AFTER"


class Silent:
    """The reporter a library call gets by default: it shows nothing."""

    def start(self, total: Optional[int], unit: str, lines: Optional[int] = None) -> None:
        pass

    def update(self, done: int, note: str = "") -> None:
        pass

    def close(self) -> None:
        pass


SILENT = Silent()


class Reporter(Silent):
    """Progress on ``stream`` (default: sys.stderr at construction) under the rules of the module
    docstring. ``name`` starts every line (the command line uses ``refnet verify`` etc.);
    ``clock`` is injectable so that tests see fixed times; ``tty`` overrides
    ``stream.isatty()``."""

    def __init__(self, stream=None, *, name: str = "refnet", after: float = SHOW_AFTER_S,
                 clock: Callable[[], float] = time.monotonic, tty: Optional[bool] = None):
        if not (isinstance(after, (int, float)) and after >= 0):
            raise ValueError(f"progress: after must be a number of seconds >= 0, got {after!r}")
        self.stream = stream if stream is not None else sys.stderr
        self.name, self.after, self.clock = name, float(after), clock
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.total, self.unit, self.every, self.began = None, "items", 1, None
        self.last_draw, self.drawn, self.shown = -math.inf, 0, False

    def start(self, total: Optional[int], unit: str, lines: Optional[int] = None) -> None:
        """A new loop of ``total`` items (None: not known in advance) counted in ``unit``;
        ``lines``: at most about this many plain lines (None: one per item)."""
        self.total, self.unit = total, unit
        self.every = 1 if lines is None or not total else max(1, math.ceil(total / lines))
        self.began = self.clock()
        self.last_draw = -math.inf
        self.drawn = 0                   # length of the bar on screen (terminal only)
        self.shown = False

    def update(self, done: int, note: str = "") -> None:
        """``done`` items finished (0: still on the first); ``note`` says what is going on."""
        now = self.clock()
        if self.began is None:           # never started: count from the first update
            self.began = now
        elapsed = now - self.began
        if elapsed < self.after:
            return
        last = self.total is not None and done >= self.total
        if self.tty:
            if now - self.last_draw < REDRAW_S and not last:
                return
            text = f"{self.name} [{self._bar(done)}] {self._count(done, elapsed)}"
            if note:
                text += f"  {note[:NOTE_WIDTH]}"
            self.stream.write("\r" + text.ljust(self.drawn))
            self.drawn = len(text)
        else:
            if done % self.every and not last:
                return
            text = f"{self.name}: {self._count(done, elapsed)}" + (f": {note}" if note else "")
            self.stream.write(text + "\n")
        self.stream.flush()
        self.last_draw, self.shown = now, True

    def close(self) -> None:
        """End the loop: a terminal bar keeps its last state on a line of its own."""
        if self.shown and self.tty:
            self.stream.write("\n")
            self.stream.flush()
        self.shown = False

    def _bar(self, done: int) -> str:
        if not self.total:
            return "?" * BAR_WIDTH
        filled = min(BAR_WIDTH, BAR_WIDTH * done // self.total)
        return "#" * filled + "." * (BAR_WIDTH - filled)

    def _count(self, done: int, elapsed: float) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        text = f"{done}{of} {self.unit}, {elapsed:.0f} s"
        if self.total and 0 < done < self.total:
            text += f", ~{elapsed / done * (self.total - done):.0f} s left"
        return text


def after_from_env(environ: Mapping[str, str]) -> float:
    """The seconds before progress shows, from ``environ[ENV_AFTER]`` (default SHOW_AFTER_S);
    a value that is not a number >= 0 is a ValueError naming the variable."""
    text = environ.get(ENV_AFTER)
    if text is None:
        return SHOW_AFTER_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:
        raise ValueError(f"environment variable {ENV_AFTER}: expected seconds >= 0 (inf: never "
                         f"show progress), got {text!r}")
    return value


class Interrupted(KeyboardInterrupt):
    """Ctrl-C inside a loop that keeps what it did: ``partial`` is the result so far (a verify
    Report marked incomplete, a TrainResult, the study's finished rows), or None where nothing
    was finished; ``done`` and ``total`` count the items; str() says where it stopped."""

    def __init__(self, message: str, partial: Any = None, done: int = 0,
                 total: Optional[int] = None):
        super().__init__(message)
        self.partial, self.done, self.total = partial, done, total
