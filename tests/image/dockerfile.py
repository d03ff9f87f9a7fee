"""A small Dockerfile reader, so tests can check the image recipe without building it.

Only the instructions this project's Dockerfile uses are understood (ARG, FROM, ENV, LABEL, WORKDIR,
COPY, RUN, USER, ENTRYPOINT, CMD); anything else is an error, so a new instruction is noticed by the tests
instead of silently skipped.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

KNOWN = {"ARG", "FROM", "ENV", "LABEL", "WORKDIR", "COPY", "RUN", "USER", "ENTRYPOINT", "CMD"}


@dataclass
class Instruction:
    keyword: str
    value: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: list[Stage]


def parse(path: Path) -> Dockerfile:
    """Split the file into global ARGs and stages, joining backslash-continued lines."""
    logical: list[tuple[int, str]] = []
    buffer = ""
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        logical.append((start, buffer + stripped))
        buffer = ""
    if buffer:
        raise ValueError(f"{path}: line {start}: continuation runs past the end of the file")

    args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, text in logical:
        keyword, _, value = text.partition(" ")
        keyword = keyword.upper()
        value = value.strip()
        if keyword not in KNOWN:
            raise ValueError(f"{path}: line {number}: instruction {keyword} is not understood by this reader")
        if keyword == "FROM":
            words = value.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif keyword == "ARG" and not stages:
            key, _, default = value.partition("=")
            args[key] = default
        elif not stages:
            raise ValueError(f"{path}: line {number}: {keyword} before the first FROM")
        else:
            stages[-1].instructions.append(Instruction(keyword, value, number))
    return Dockerfile(args=args, stages=stages)


def exec_form(value: str) -> list[str] | None:
    """The JSON array of an exec-form ENTRYPOINT/CMD, or None for shell form."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed):
        return parsed
    return None


@dataclass
class RunStep:
    command: str
    bind_mounts: dict[str, str]  # target -> "stage:source"


def parse_run(value: str) -> RunStep:
    """Separate RUN's --mount options from the shell command."""
    mounts: dict[str, str] = {}
    rest = value
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        rest = rest.lstrip()
        if not option.startswith("--mount="):
            raise ValueError(f"RUN option {option} is not understood")
        fields = dict(part.split("=", 1) for part in option.removeprefix("--mount=").split(","))
        if fields.get("type") != "bind":
            raise ValueError(f"RUN --mount type {fields.get('type')} is not understood")
        mounts[fields["target"]] = f"{fields.get('from', '')}:{fields.get('source', '/')}"
    return RunStep(command=rest, bind_mounts=mounts)


def copy_sources(value: str) -> tuple[list[str], str]:
    """COPY's sources and destination from the build context (not COPY --from=<stage>)."""
    words = value.split()
    if any(w.startswith("--") for w in words):
        raise ValueError(f"COPY {value!r}: options are not understood")
    return words[:-1], words[-1]


def dockerignore_allows(patterns: list[str], relative: str) -> bool:
    """Whether the build context includes `relative` (Docker's last-match-wins rule, with `!`)."""
    allowed = True
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.rstrip("/")
        regex = fnmatch.translate(body).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if body.startswith("**/"):
            matched = any(re.fullmatch(fnmatch.translate(body[3:]), p) for p in parts)
        else:
            matched = any(re.fullmatch(regex, prefix) for prefix in prefixes)
        if matched:
            allowed = negate
    return allowed


def read_dockerignore(path: Path) -> list[str]:
    return [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
