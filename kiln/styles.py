"""AUTOMATIC1111's prompt styles: a `styles.csv` (name, prompt, negative_prompt) whose entries a request names in
its `styles` field. A style's text holding `{prompt}` wraps the prompt (the placeholder is replaced by it); any
other is appended after a comma, as AUTOMATIC1111's modules/styles.py merges them, in the order the request lists.
"""

from __future__ import annotations

import csv
import threading
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import ConfigError, InputError

PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def merge(prompt: str, style: str) -> str:
    """One style's text applied to a prompt (AUTOMATIC1111's merge_prompts)."""
    if PLACEHOLDER in style:
        return style.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style.strip()) if part)


def read_styles(path: Path) -> dict[str, Style]:
    """A styles.csv as AUTOMATIC1111 writes it (a header with name, prompt, negative_prompt; more columns ignored)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, skipinitialspace=True)
            if reader.fieldnames is None or "name" not in reader.fieldnames:
                raise ConfigError(f"{path}: a styles file needs a header with name, prompt, negative_prompt")
            return {row["name"]: Style(row["name"], row.get("prompt") or "", row.get("negative_prompt") or "")
                    for row in reader if row.get("name")}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path}: cannot read the styles ({exc})") from None


class StyleLibrary:
    """The styles of one file, read again when the file changes (AUTOMATIC1111 reloads it from its UI)."""

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._styles: dict[str, Style] = {}

    def styles(self) -> dict[str, Style]:
        """The styles as the file holds them now; none where there is no file."""
        if self.path is None or not self.path.is_file():
            return {}
        stat = self.path.stat()
        with self._lock:
            if self._stamp != (stat.st_mtime_ns, stat.st_size):
                self._styles, self._stamp = read_styles(self.path), (stat.st_mtime_ns, stat.st_size)
            return dict(self._styles)

    def apply(self, prompt: str, negative_prompt: str, names: list[str]) -> tuple[str, str]:
        """The prompts with the named styles applied in order; an unknown name is refused, listing the known."""
        if not names:
            return prompt, negative_prompt
        known = self.styles()
        for name in names:
            style = known.get(name)
            if style is None:
                where = f"in {self.path}" if self.path is not None and self.path.is_file() else \
                    "(this server has no styles file: kiln serve --styles FILE)"
                raise InputError(f"styles: {name!r} is not a style {where}; known: {', '.join(known) or 'none'}")
            prompt, negative_prompt = merge(prompt, style.prompt), merge(negative_prompt, style.negative_prompt)
        return prompt, negative_prompt
