"""A strict reader for the small YAML subset ``gpu-node/docker-compose.yml`` uses.

PyYAML is not a gpuctl dependency and Docker Compose is not available where the tests
run, so the compose file is checked with this instead: block mappings and sequences,
``[a, b]`` flow sequences, quoted and plain scalars, ``#`` comments. Anything outside that
subset (tabs, anchors, block scalars, flow mappings) is an error rather than a guess, so
the file stays simple enough for this check to be trustworthy. Scalars stay strings.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["YamlSubsetError", "parse"]

_KEY = re.compile(r"^([A-Za-z0-9_.-]+):(?:\s+(.*))?$")


class YamlSubsetError(ValueError):
    """The text is not in the supported subset (or not valid YAML at all)."""


def _strip_comment(text: str) -> str:
    quote = ""
    for i, char in enumerate(text):
        if quote:
            if char == quote:
                quote = ""
        elif char in "\"'" and (i == 0 or text[i - 1] in " [,"):
            quote = char  # a quote opens a quoted scalar only at a token's start
        elif char == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip()
    if quote:
        raise YamlSubsetError(f"unterminated quote in {text!r}")
    return text.rstrip()


def _scalar(text: str) -> Any:
    if text.startswith(("&", "*", "|", ">", "{", "!")):
        raise YamlSubsetError(f"unsupported YAML construct: {text!r}")
    if text.startswith("["):
        if not text.endswith("]"):
            raise YamlSubsetError(f"unterminated flow sequence: {text!r}")
        inner = text[1:-1].strip()
        return [_scalar(item.strip()) for item in inner.split(",")] if inner else []
    if text.startswith('"'):
        if not text.endswith('"') or len(text) < 2:
            raise YamlSubsetError(f"bad double-quoted scalar: {text!r}")
        value: str = json.loads(text)
        return value
    if text.startswith("'"):
        if not text.endswith("'") or len(text) < 2:
            raise YamlSubsetError(f"bad single-quoted scalar: {text!r}")
        return text[1:-1].replace("''", "'")
    return text


class _Parser:
    def __init__(self, text: str) -> None:
        self.lines: list[tuple[int, str, int]] = []
        for number, raw in enumerate(text.splitlines(), 1):
            if "\t" in raw[: len(raw) - len(raw.lstrip())]:
                raise YamlSubsetError(f"line {number}: tab in indentation")
            content = _strip_comment(raw.strip())
            if content and content != "---":
                self.lines.append((len(raw) - len(raw.lstrip(" ")), content, number))
        self.pos = 0

    def block(self, indent: int) -> Any:
        _, content, _ = self.lines[self.pos]
        if content == "-" or content.startswith("- "):
            return self.sequence(indent)
        return self.mapping(indent)

    def mapping(self, indent: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while self.pos < len(self.lines):
            line_indent, content, number = self.lines[self.pos]
            if line_indent < indent:
                break
            if line_indent > indent:
                raise YamlSubsetError(f"line {number}: unexpected indentation")
            match = _KEY.match(content)
            if match is None:
                raise YamlSubsetError(f"line {number}: expected 'key: value', got {content!r}")
            key, value = match.group(1), match.group(2)
            if key in result:
                raise YamlSubsetError(f"line {number}: duplicate key {key!r}")
            self.pos += 1
            result[key] = _scalar(value) if value else self.nested(indent)
        return result

    def nested(self, parent_indent: int) -> Any:
        if self.pos >= len(self.lines):
            return None
        line_indent, content, _ = self.lines[self.pos]
        if line_indent > parent_indent:
            return self.block(line_indent)
        if line_indent == parent_indent and content.startswith("- "):
            return self.sequence(line_indent)  # compose style: "key:\n- item"
        return None

    def sequence(self, indent: int) -> list[Any]:
        result: list[Any] = []
        while self.pos < len(self.lines):
            line_indent, content, number = self.lines[self.pos]
            if line_indent != indent or not content.startswith("- "):
                if line_indent > indent:
                    raise YamlSubsetError(f"line {number}: unexpected indentation")
                break
            item = content[2:].strip()
            if _KEY.match(item) and not item.startswith(("'", '"')):
                # "- key: value" opens a mapping whose other keys sit under "key".
                self.lines[self.pos] = (indent + 2, item, number)
                result.append(self.mapping(indent + 2))
            else:
                self.pos += 1
                result.append(_scalar(item))
        return result


def parse(text: str) -> Any:
    """The document as dicts, lists and strings; ``YamlSubsetError`` outside the subset."""
    parser = _Parser(text)
    if not parser.lines:
        return None
    value = parser.block(parser.lines[0][0])
    if parser.pos != len(parser.lines):
        _, content, number = parser.lines[parser.pos]
        raise YamlSubsetError(f"line {number}: unexpected {content!r}")
    return value
