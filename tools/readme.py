"""Rewrite generated sections of the README and the docs pages between their start and end markers."""

from pathlib import Path


def replace_section(page: Path, start: str, end: str, body: str) -> None:
    """Replace the text between the lines `start` and `end` of the Markdown `page` with `body` (the markers stay)."""
    text = page.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{page} has no generated section: add the lines\n{start}\n{end}")
    head, rest = text.split(start, 1)
    page.write_text(f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}")
