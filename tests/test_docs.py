"""The Python examples in the README and the method cards must run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


CASES = [(path, i, code) for path in DOCS for i, code in enumerate(_python_blocks(path))]


def test_the_readme_has_an_example():
    assert any(path.name == "README.md" for path, _, _ in CASES)


@pytest.mark.parametrize(
    ("path", "index", "code"), CASES, ids=[f"{p.name}-{i}" for p, i, _ in CASES]
)
def test_example_runs(path, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    exec(compile(code, f"{path.name}[python block {index}]", "exec"), {"__name__": "__doc_example__"})


def test_results_page_tables_are_their_compares_results():
    """docs/results.md shows each compare's table exactly as made from its results.json."""
    import json

    from greenprop.experiments.results_page import headline_table

    page = (ROOT / "docs" / "results.md").read_text()
    reports = re.findall(r"\]\(results/(results-[\w-]+)/report\.md\)", page)
    assert reports, "docs/results.md links no compare report"
    for name in reports:
        results = json.loads((ROOT / "docs" / "results" / name / "results.json").read_text())
        assert headline_table(results) in page, f"docs/results.md's table for {name} is not its results.json"
