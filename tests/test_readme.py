"""The README guides: short, every link resolves, and its demo block is the one the script writes."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    # GitHub's rule: lower case, drop punctuation other than '-' and '_', spaces become '-'.
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_at_most_150_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_link_resolves_to_a_file_and_heading(doc):
    for target in LINK.findall(doc.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.exists(), f"{doc.name} links to {target}, which does not exist"
        if anchor and file.suffix == ".md":
            headings = {_anchor(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
            assert anchor in headings, f"{doc.name} links to {target}: no such heading in {file.name}"


def test_anchor_rule_on_a_hand_made_heading():
    assert _anchor("The demo run: time and phases") == "the-demo-run-time-and-phases"
    assert _anchor("SmolLM2-135M-Instruct on two CPU cores") == "smollm2-135m-instruct-on-two-cpu-cores"


def test_demo_block_is_rendered_from_metrics():
    spec = importlib.util.spec_from_file_location("readme_demo", ROOT / "benchmarks" / "readme_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    START, END, render_block, replace_block = module.START, module.END, module.render_block, module.replace_block
    metrics = {
        "method": "taid",
        "summary_columns": ["exact_match"],
        "eval": {
            "teacher": {"exact_match": 72.0},
            "sft_student": {"exact_match": 43.0},
            "student": {"exact_match": 31.0},
        },
    }
    block = render_block(metrics, "abc1234", "2026-12-07", "2")
    readme = f"intro\n{START}\nold table\n{END}\noutro\n"
    new = replace_block(readme, block)
    assert new.startswith("intro\n") and new.endswith("\noutro\n") and "old table" not in new
    # The name column is as wide as its longest cell, "taid student" (12), and columns are joined by two spaces:
    # "teacher" is padded with 5 spaces, then 2 more before the value.
    assert "teacher" + " " * 7 + "72.00" in new and "taid student  31.00" in new and "git abc1234" in new
    assert START in (ROOT / "README.md").read_text() and END in (ROOT / "README.md").read_text()
