"""The one rule for progress bars: shown on a terminal, never written into a redirected log.

`disabled(wanted)` is tqdm's `disable` argument: True when the bar is not wanted (another rank, a
`progress: false` config), None otherwise, which tqdm reads as "only when stderr is a terminal", so a
job whose output goes to a file gets no carriage-return noise (its JSONL log has the numbers).
"""

from __future__ import annotations


def disabled(wanted: bool | None) -> bool | None:
    return True if wanted is False else None
