"""The documents a reader follows: every function and test METHOD.md names exists, every rule
M1..M10 names at least one of each, and no document links outside the repository."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = (ROOT / "METHOD.md").read_text()


def defined_names(path: Path) -> set[str]:
    """Top-level functions, classes and assignments, and methods as Class.name."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names |= {f"{node.name}.{n.name}" for n in node.body
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_every_named_function_and_test_exists() -> None:
    code = re.findall(r"`([\w/]+\.py): ([\w.]+)`", METHOD)
    tests = re.findall(r"`(tests/\w+\.py)::(\w+)`", METHOD)
    assert len(code) > 20 and len(tests) > 20  # the page does name them
    missing = [f"{f}: {n}" for f, n in code
               if not (ROOT / f).is_file() or n not in defined_names(ROOT / f)]
    missing += [f"{f}::{n}" for f, n in tests
                if not (ROOT / f).is_file() or f"def {n}(" not in (ROOT / f).read_text()]
    assert not missing, missing


def test_every_rule_names_code_and_a_test() -> None:
    sections = re.split(r"^## (?=M\d+\.)", METHOD, flags=re.M)[1:]
    rules = {s.split(".")[0]: s for s in sections}
    assert sorted(rules, key=lambda r: int(r[1:])) == [f"M{i}" for i in range(1, 11)]
    for rule, text in rules.items():
        assert re.search(r"`[\w/]+\.py: \w", text), f"{rule} names no function"
        assert re.search(r"`tests/\w+\.py::\w", text), f"{rule} names no test"


def test_no_document_links_outside_the_repository() -> None:
    for doc in [ROOT / "README.md", ROOT / "METHOD.md", *ROOT.glob("*.py"),
                *ROOT.glob("tools/*.py"), *ROOT.glob("studies/*.py")]:
        text = doc.read_text()
        assert not re.search(r"\]\(\.\./|\.\./shared|shared/METHOD", text), doc.name
        links = re.findall(r"\]\(([^)#]+)\)", text) if doc.suffix == ".md" else []
        for link in links:  # relative markdown links resolve inside the repository
            if not re.match(r"\w+://", link):
                assert (doc.parent / link).exists(), (doc.name, link)


def test_results_pages_link_inside_the_repository() -> None:
    """The study pages under results/ (one link from the README) resolve their relative links
    inside the repository, and carry no machine's paths."""
    for doc in ROOT.glob("results/**/*.md"):
        text = doc.read_text()
        assert "/root/" not in text and "/work/" not in text and "/home/" not in text, doc.name
        for link in re.findall(r"\]\(([^)#]+)\)", text):
            if not re.match(r"\w+://", link):
                target = (doc.parent / link).resolve()
                assert target.is_relative_to(ROOT) and target.exists(), (doc.name, link)


def test_readme_results_at_a_glance() -> None:
    """The README's table is the study runner's glance.md as written (never typed by hand), and
    every study page under results/ is one link from the README."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- glance: results/multi/glance.md[^>]*-->\n(.*?)<!-- /glance -->",
                      readme, re.S)
    assert block and block.group(1) == (ROOT / "results" / "multi" / "glance.md").read_text()
    for page in ROOT.glob("results/*/README.md"):
        assert f"]({page.relative_to(ROOT)})" in readme, page
