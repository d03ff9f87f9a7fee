"""Top frames of a py-spy profile (``py-spy record --format raw``: folded stacks, one per line).

    .venv/bin/python -m bench.profile_summary bench/results/profile/burst.folded

Own samples: the frame is the innermost one (where the CPU was); total: the frame is anywhere on the
stack. Frames are grouped by function and file (line numbers dropped), and by the operator's own
module that was running (the innermost frame under ``metering_operator``), and by library.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

LINE = re.compile(r":\d+\)$")
#: Innermost frames that are a thread waiting, which py-spy's idle detection does not always
#: recognise (a pool worker on its queue, a read of a server's answer, a selector, a condition).
WAITING = (
    "_worker (futures/thread.py)",
    "Condition.wait (",
    "SSLSocket.read (",
    "SocketIO.readinto (",
    "select (",
    "do_poll (",
)


def frame_name(frame: str) -> str:
    """``fn (path/to/file.py:12)`` -> ``fn (to/file.py)``: the last two path parts, no line."""
    frame = LINE.sub(")", frame.strip())
    if " (" not in frame:
        return frame
    fn, path = frame.split(" (", 1)
    parts = path.rstrip(")").split("/")
    return f"{fn} ({'/'.join(parts[-2:])})"


def library(frame: str) -> str:
    """The top-level package (or stdlib module) of a frame: py-spy prints paths from sys.path."""
    path = LINE.sub(")", frame.strip()).rsplit(" (", 1)[-1].rstrip(")")
    return path.split("/", 1)[0].removesuffix(".py")


def summarize(path: Path, top: int = 25) -> str:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    libs: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    busy_ours: Counter[str] = Counter()
    busy_own: Counter[str] = Counter()
    samples = waiting = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        raw = [f for f in stack.split(";") if f]
        frames = [frame_name(f) for f in raw]
        is_waiting = any(w in frame_name(raw[-1]) for w in WAITING)
        if is_waiting:
            waiting += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count
        libs[library(raw[-1])] += count
        mine = [frame_name(f) for f in raw if "metering_operator" in f]
        step = mine[-1] if mine else "(no operator frame: kopf, asyncio, threads)"
        ours[step] += count
        if not is_waiting:
            busy_ours[step] += count
            busy_own[frames[-1]] += count

    def table(counter: Counter[str], title: str) -> str:
        whole = sum(counter.values()) or 1
        rows = [f"{100 * n / whole:5.1f}%  {n:6d}  {name}" for name, n in counter.most_common(top)]
        return f"## {title}\n\n   %   samples  frame\n" + "\n".join(rows)

    return (
        "\n\n".join(
            [
                f"# py-spy profile {path.name}: {samples} samples (non-idle threads only)\n\n"
                f"Of these, {waiting} ({100 * waiting / max(1, samples):.0f}%) have a waiting frame "
                "innermost (pool queue, socket read, selector, condition): py-spy does not always see "
                "those threads as idle, so count them as waiting, not CPU.",
                table(busy_ours, "Not waiting: samples by the innermost operator frame (the CPU's step)"),
                table(busy_own, "Not waiting: top frames by own samples"),
                table(libs, "Own samples by library (innermost frame)"),
                table(ours, "Own samples by the innermost operator frame on the stack"),
                table(own, "Top frames by own samples"),
                table(total, "Top frames by total samples (anywhere on the stack)"),
            ]
        )
        + "\n"
    )


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(summarize(Path(name)))
