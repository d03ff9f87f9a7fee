"""The watch's line reader (kube/watch.py): one event per chunk, events split across chunks or
sharing one, and a cut-short last line, as the API server's chunked watch stream can send them."""

from __future__ import annotations

import json
from collections.abc import Iterator

from metering_operator.kube.watch import _lines


class _Response:
    def __init__(self, *segments: bytes) -> None:
        self.segments = segments

    def stream(self, amt: int | None = None, decode_content: bool | None = None) -> Iterator[bytes]:
        assert amt is None
        assert decode_content is False
        yield from self.segments


def _events(*segments: bytes) -> list[dict[str, object]]:
    return [json.loads(line) for line in _lines(_Response(*segments))]


def test_one_event_per_chunk() -> None:
    assert _events(b'{"type":"ADDED"}\n', b'{"type":"MODIFIED"}\n') == [
        {"type": "ADDED"},
        {"type": "MODIFIED"},
    ]


def test_an_event_split_over_chunks_and_two_in_one() -> None:
    assert _events(b'{"type":', b'"ADDED", "o": "\xc3\xa9"}\n{"type":"DEL', b'ETED"}\n{"type":"X"}\n') == [
        {"type": "ADDED", "o": "é"},
        {"type": "DELETED"},
        {"type": "X"},
    ]


def test_empty_lines_skipped_and_a_cut_short_last_line_dropped() -> None:
    assert _events(b"\n", b'{"type":"ADDED"}\n\n', b'{"type":"MOD') == [{"type": "ADDED"}]
