"""
Reading the documentation as data: its fenced blocks, tables, code spans, links and the
JSON documents in its examples, for the tests that hold docs and code to each other.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

_FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_SPAN = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Block:
    """
    A fenced block: its info string (C{sql}, C{json}, ...) and its text.
    """

    doc: str
    line: int
    info: str
    text: str


@dataclass(frozen=True)
class Table:
    """
    A table, under the headings that enclose it (outermost first).
    """

    doc: str
    line: int
    headings: tuple[str, ...]
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    @property
    def heading(self) -> str:
        return self.headings[-1] if self.headings else ""

    def column(self, name: str) -> int:
        return [h.lower() for h in self.header].index(name)


@dataclass(frozen=True)
class Document:
    name: str
    text: str

    def lines(self) -> Iterator[tuple[int, str, str | None, tuple[str, ...]]]:
        """
        Each line as (number, text, info of the enclosing fenced block or None,
        headings in force).
        """
        fence: str | None = None
        info: str | None = None
        headings: list[tuple[int, str]] = []
        for number, line in enumerate(self.text.splitlines(), 1):
            opening = _FENCE.match(line)
            if fence is None and opening:
                fence, info = opening.group(1), opening.group(2)
                continue
            if fence is not None and line.strip().startswith(fence):
                fence = info = None
                continue
            if fence is None:
                heading = _HEADING.match(line)
                if heading:
                    level = len(heading.group(1))
                    headings = [h for h in headings if h[0] < level] + [(level, heading.group(2))]
                    continue
            yield number, line, (info if fence is not None else None), tuple(
                h for _, h in headings
            )

    def blocks(self) -> list[Block]:
        found: list[Block] = []
        current: list[str] = []
        start, info = 0, None
        for number, line, blockInfo, _ in self.lines():
            if blockInfo is None:
                if current or info is not None:
                    found.append(Block(self.name, start, info or "", "\n".join(current)))
                current, info = [], None
                continue
            if info is None:
                start, info = number, blockInfo
            current.append(line)
        if info is not None:
            found.append(Block(self.name, start, info, "\n".join(current)))
        return found

    def prose(self) -> Iterator[tuple[int, str]]:
        """
        The lines outside fenced blocks, headings and tables included.
        """
        fence: str | None = None
        for number, line in enumerate(self.text.splitlines(), 1):
            opening = _FENCE.match(line)
            if fence is None and opening:
                fence = opening.group(1)
                continue
            if fence is not None:
                if line.strip().startswith(fence):
                    fence = None
                continue
            yield number, line

    def spans(self) -> list[str]:
        """
        Every inline code span outside fenced blocks, headings and tables included.
        """
        return [m.group(2).strip() for _, line in self.prose() for m in _SPAN.finditer(line)]

    def headings(self) -> list[str]:
        return [
            m.group(2)
            for _, line in self.prose()
            if (m := _HEADING.match(line)) is not None
        ]

    def links(self) -> list[str]:
        return [m.group(1) for _, line in self.prose() for m in _LINK.finditer(line)]

    def tables(self) -> list[Table]:
        found: list[Table] = []
        pending: list[tuple[int, str, tuple[str, ...]]] = []

        def close() -> None:
            if len(pending) >= 2 and set(pending[1][1].replace("|", "").strip()) <= set("-: "):
                rows = tuple(splitRow(line) for _, line, _ in pending[2:])
                found.append(
                    Table(self.name, pending[0][0], pending[0][2], splitRow(pending[0][1]), rows)
                )
            pending.clear()

        for number, line, info, headings in self.lines():
            if info is None and line.lstrip().startswith("|"):
                pending.append((number, line, headings))
            else:
                close()
        close()
        return found


def splitRow(line: str) -> tuple[str, ...]:
    """
    The cells of one table row; a C{|} inside a code span does not split.
    """
    cells, cell, inSpan = [], "", False
    for char in line.strip().strip("|"):
        if char == "`":
            inSpan = not inSpan
        if char == "|" and not inSpan:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += char
    cells.append(cell.strip())
    return tuple(cells)


def codeSpans(cell: str) -> list[str]:
    return [m.group(2).strip() for m in _SPAN.finditer(cell)]


def documents() -> list[Document]:
    """
    README.md and every page under docs/.
    """
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [Document(str(p.relative_to(ROOT)), p.read_text(encoding="utf-8")) for p in paths]


def document(name: str) -> Document:
    [doc] = [d for d in documents() if d.name == name]
    return doc


def jsonDocuments(text: str) -> list[Any]:
    """
    The JSON objects and arrays that start a line of C{text} (an example block may mix
    them with shell prompts and comments); lines that do not parse are skipped.
    """
    decoder = json.JSONDecoder()
    found: list[Any] = []
    position = 0
    while position < len(text):
        end = text.find("\n", position)
        end = len(text) if end < 0 else end
        start = position + len(text[position:end]) - len(text[position:end].lstrip())
        if start < end and text[start] in "{[":
            try:
                value, after = decoder.raw_decode(text, start)
            except ValueError:
                pass
            else:
                found.append(value)
                position = after
                continue
        position = end + 1
    return found


def jsonValues(value: Any) -> Iterator[tuple[str | None, Any]]:
    """
    Every (key, value) pair nested in a JSON value; array items have the key None.
    """
    pending: list[tuple[str | None, Any]] = [(None, value)]
    while pending:
        key, item = pending.pop()
        yield key, item
        if isinstance(item, dict):
            pending.extend(item.items())
        elif isinstance(item, list):
            pending.extend((None, v) for v in item)
