"""The README and the docs pages: their Python snippets run as a user would paste them (each page's in order, in one
namespace of its own, from an empty folder), the README stays a short page, every relative link resolves, and each
generated section sits where its driver writes it."""

import json
import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARKER = "<!-- not tested"
README_MAX_LINES = 350
FENCED = re.compile(r"```.*?```", flags=re.DOTALL)  # code blocks: their `#` lines are comments, not headings
CODE = re.compile(r"```.*?```|`[^`\n]*`", flags=re.DOTALL)  # code blocks and spans: no links in them
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def python_snippets(page: Path) -> list[str]:
    """The page's ```python blocks, less those right after a `<!-- not tested ...-->` line."""
    text = page.read_text()
    snippets = []
    for match in re.finditer(r"```python\n(.*?)```", text, flags=re.DOTALL):
        preceding = text[: match.start()].rstrip().splitlines()[-1]
        if not preceding.startswith(SKIP_MARKER):
            snippets.append(match.group(1))
    return snippets


# what each page's snippets leave in their folder, checked after they ran
def hub_folder_with_card(folder: Path) -> None:
    assert (folder / "msvit-tiny-hub" / "README.md").is_file()


def onnx_file(folder: Path) -> None:
    assert (folder / "msvit-tiny-budget-0.25.onnx").is_file()


def segmentation_hub_folder(folder: Path) -> None:
    assert (folder / "msvit-tiny-seg-hub" / "preprocessor_config.json").is_file()


def training_results(folder: Path) -> None:
    assert json.loads((folder / "outputs" / "vit-tiny" / "results.json").read_text())["test"]["tokens"] == 17


OUTPUTS = {
    "README.md": hub_folder_with_card,
    "docs/usage.md": onnx_file,
    "docs/segmentation.md": segmentation_hub_folder,
    "docs/training.md": training_results,
}


def name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def test_pages_have_tested_snippets():
    # a snippet lost in a move, or a page whose snippets all became untested, fails here instead of passing unrun
    assert len(python_snippets(README)) >= 5
    assert all(python_snippets(ROOT / page) for page in OUTPUTS)
    assert sum(len(python_snippets(page)) for page in PAGES) >= 11


@pytest.mark.parametrize("page", [page for page in PAGES if python_snippets(page)], ids=name)
def test_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for snippet in python_snippets(page):
        try:
            exec(compile(snippet, str(page), "exec"), namespace)
        except Exception as error:  # name the failing snippet
            pytest.fail(f"{name(page)} snippet failed with {error!r}:\n{snippet}")
    if name(page) in OUTPUTS:
        OUTPUTS[name(page)](tmp_path)


def test_readme_is_a_short_page():
    assert len(README.read_text().splitlines()) <= README_MAX_LINES


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of the page's headings: lower case, punctuation (backticks too) dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCED.sub("", page.read_text()), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(CODE.sub("", page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked)):
            broken.append(target)
    assert not broken, f"{name(page)} links to missing files or headings: {broken}"


def test_generated_sections_sit_where_their_drivers_write():
    from benchmarks import report
    from msvit.experiments import evidence, pipeline, segmentation_pipeline

    makefile = (ROOT / "Makefile").read_text()
    sections = [
        (evidence.DOCS_START, evidence.DOCS_END, "docs/evidence.md"),
        (pipeline.DOCS_START, pipeline.DOCS_END, "docs/evidence.md"),
        (segmentation_pipeline.DOCS_START, segmentation_pipeline.DOCS_END, "docs/segmentation.md"),
        (report.DOCS_START, report.DOCS_END, "docs/performance.md"),
    ]
    for start, end, page in sections:
        text = (ROOT / page).read_text()
        assert text.count(start) == 1 and text.count(end) == 1 and text.index(start) < text.index(end), page
        # the marker names the command that rewrites the page, and `make` runs that command
        assert f"--docs {page}" in start and f"--docs {page}" in makefile
    # the main job rewrites the README's demo table
    readme = README.read_text()
    start, end = pipeline.README_START, pipeline.README_END
    assert readme.count(start) == 1 and readme.index(start) < readme.index(end)
    assert "--readme README.md" in start and "--readme README.md" in makefile


def test_evidence_section_links_its_figures_from_its_page(tmp_path, monkeypatch):
    from msvit.experiments.evidence import STUDIES, EvidenceArguments, docs_section

    monkeypatch.chdir(tmp_path)
    figures = tmp_path / "results" / "evidence"
    figures.mkdir(parents=True)
    for figure in (*STUDIES["shared"].figures("shared"), "learning_curves.png"):
        (figures / figure).touch()
    (tmp_path / "docs").mkdir()
    args = EvidenceArguments(output_dir="results/evidence", docs="docs/evidence.md")
    targets = LINK.findall(docs_section(args, tables=""))
    assert len(targets) == 3 and all((tmp_path / "docs" / target).is_file() for target in targets)
