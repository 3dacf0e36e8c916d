"""Run the README's Python snippets, in order and in one namespace, as a user would paste them."""

import json
import re
from pathlib import Path

import pytest


README = Path(__file__).resolve().parent.parent / "README.md"
SKIP_MARKER = "<!-- not tested"


def readme_snippets() -> list[str]:
    text = README.read_text()
    snippets = []
    for match in re.finditer(r"```python\n(.*?)```", text, flags=re.DOTALL):
        preceding = text[: match.start()].rstrip().splitlines()[-1]
        if not preceding.startswith(SKIP_MARKER):
            snippets.append(match.group(1))
    return snippets


def test_readme_has_tested_snippets():
    assert len(readme_snippets()) >= 5


def test_readme_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for snippet in readme_snippets():
        try:
            exec(compile(snippet, str(README), "exec"), namespace)
        except Exception as error:  # name the failing snippet
            pytest.fail(f"README snippet failed with {error!r}:\n{snippet}")
    assert (tmp_path / "msvit-tiny-hub" / "README.md").is_file()
    assert json.loads((tmp_path / "outputs" / "vit-tiny" / "results.json").read_text())["test"]["tokens"] == 17
