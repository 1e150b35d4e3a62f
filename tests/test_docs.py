"""The documentation: the site builds strictly, every reference resolves inside the repository, and
every registered method and policy has its page.

* ``mkdocs build --strict`` (broken links, pages missing from the nav, missing API objects fail it);
  skipped only when MkDocs is not installed (``pip install -e ".[docs]"``; CI installs it);
* a scan of the package, tests, scripts, docs and README for references to files that are not in the
  repository: names of the project's internal notes, a path into the shared folder beside the
  checkout, numbered-section signs pointing into such notes, and repository-relative paths (a
  path under ``docs``, ``scripts``, ``tests``, ``tta`` or ``data_configs`` ending in a known
  extension) that do not exist. Files of other repositories are written with the repository in
  front (``azshue/TPT``'s ``tpt_classification.py``) or without a folder of ours in front. A self-check plants bad references and makes sure the scan reports each one;
* the method registry against ``docs/methods/<name>.md`` and the policy registry against the
  ``## `name` `` sections of ``docs/policies.md``.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tta

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# ------------------------------------------------------------------------------ the reference scan
#: what the scan reads: the package, tests, scripts, docs, data configs and the top-level text files
SCAN = ("tta", "tests", "scripts", "docs", "data_configs", "README.md", "mkdocs.yml", "setup.cfg",
        "pyproject.toml")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".txt", ".cfg", ".toml", ".json", ".ini"}
#: top-level folders whose files are referred to by repository-relative paths
PATH_PREFIXES = ("docs", "scripts", "tests", "tta", "data_configs")
PATH_SUFFIXES = ("md", "py", "yaml", "yml", "sh", "txt", "json", "cfg", "toml", "safetensors", "png", "jpg")

_NOTES = ("METHODS", "DESIGN")  # the internal notes' stems; their file names are built here, not written
#: references that can never resolve inside the repository
OUTSIDE = [
    (re.compile("|".join(rf"\b{stem}\.md\b" for stem in _NOTES)), "names a file outside the repository"),
    (re.compile(r"\.\./shared\b|/work/(?=shared\b)"), "points into the shared folder outside the repository"),
    (re.compile("\u00a7" r"\s?\d"), "cites a numbered section of a document outside the repository"),
]
#: a repository-relative path: a known top-level folder, path characters, a known extension
PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*?\.(?:%s))(?![\w-])"
                  % ("|".join(PATH_PREFIXES), "|".join(PATH_SUFFIXES)))


def scanned_files(root: Path) -> list[Path]:
    files = []
    for name in SCAN:
        path = root / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in sorted(path.rglob("*"))
                      if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    return files


def bad_references(root: Path, files: list[Path] | None = None) -> list[str]:
    """``file:line: reference (why)`` for every reference in ``files`` that does not resolve in ``root``."""
    problems = []
    for path in files if files is not None else scanned_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        where = path.relative_to(root) if path.is_relative_to(root) else path
        for number, line in enumerate(text.splitlines(), start=1):
            for pattern, why in OUTSIDE:
                for match in pattern.finditer(line):
                    problems.append(f"{where}:{number}: {match.group(0)!r} {why}")
            for match in PATH.finditer(line):
                if not (root / match.group(1)).exists():
                    problems.append(f"{where}:{number}: {match.group(1)!r} does not exist in the repository")
    return problems


def test_reference_scan_finds_planted_bad_references(tmp_path):
    """The scan is not trivially passing: each planted bad reference is reported at its line, and a
    good reference and lookalikes of other repositories' paths are not."""
    note = _NOTES[0] + ".md"
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "real.py").write_text("")
    good, missing = "scripts/" + "real.py", "scripts/" + "missing_one.py"
    planted = tmp_path / "planted.py"
    planted.write_text("\n".join([
        f'"""As {note} ' + "\u00a7" + '3 says."""',          # 1: an internal note and a section sign
        "# see ../" + "shared/" + _NOTES[1] + ".md",           # 2: the shared folder (and a note)
        'x = "docs/methods/' + 'no_such_method.md, Defaults"', # 3: a missing docs page
        f"# {good} runs, {missing} not",                       # 4: one good, one missing path
        "# Jhyun17/DeYO methods/deyo.py and ttas/zero.py",     # 5: other repositories' paths: fine
        "# tests/test_*.py and tta/conf/setting/<name>.yaml",  # 6: patterns, not paths: fine
        "# (" + "\u00a7" + " 10)",                             # 7: a section sign with a space
    ]) + "\n")
    found = bad_references(tmp_path, [planted])
    lines = sorted(int(p.split(":")[1]) for p in found)
    assert lines == [1, 1, 2, 2, 3, 4, 7], found
    assert any("no_such_method.md" in p for p in found)
    assert any("missing_one.py" in p for p in found)
    assert not any("real.py" in p or "zero.py" in p or "deyo.py" in p for p in found)


def test_no_reference_to_a_file_outside_the_repository():
    files = scanned_files(ROOT)
    assert len(files) > 50, "the scan found almost nothing to read"
    problems = bad_references(ROOT, files)
    assert not problems, "references that do not resolve inside the repository:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------ pages per registry
def test_every_registered_method_has_its_page():
    pages = {p.stem for p in (DOCS / "methods").glob("*.md")} - {"index"}
    registered = set(tta.methods.available())
    assert registered - pages == set(), f"methods without a page docs/methods/<name>.md: {sorted(registered - pages)}"
    assert pages - registered == set(), f"pages of methods that are not registered: {sorted(pages - registered)}"
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    index = (DOCS / "methods" / "index.md").read_text(encoding="utf-8")
    for name in sorted(registered):
        page = (DOCS / "methods" / f"{name}.md").read_text(encoding="utf-8")
        headings = re.findall(r"^## (.+)$", page, flags=re.M)
        assert page.startswith(f"# `{name}`"), f"docs/methods/{name}.md must start with '# `{name}`'"
        assert any(h.startswith("Defaults") for h in headings), f"docs/methods/{name}.md has no Defaults section"
        assert "Policies" in headings, f"docs/methods/{name}.md has no Policies section"
        assert f"methods/{name}.md" in nav, f"docs/methods/{name}.md is not in the nav of mkdocs.yml"
        assert f"({name}.md)" in index, f"docs/methods/index.md does not link {name}.md"


def test_every_registered_policy_has_its_section():
    text = (DOCS / "policies.md").read_text(encoding="utf-8")
    sections = re.findall(r"^## `([\w-]+)`\s*$", text, flags=re.M)
    assert len(sections) == len(set(sections)), f"a policy has two sections: {sorted(sections)}"
    registered = set(tta.policies.available())
    assert registered - set(sections) == set(), f"policies without a section: {sorted(registered - set(sections))}"
    assert set(sections) - registered == set(), f"sections of unregistered policies: {sorted(set(sections) - registered)}"
    for name in registered:  # and each is in the summary table, with its level
        level = tta.policies.POLICIES.get(name).level
        row = re.search(rf"^\| \[`{name}`\]\(#{name}\) \| (\w+) \|", text, flags=re.M)
        assert row, f"policy {name} is missing from the table of docs/policies.md"
        assert row.group(1) == level, f"docs/policies.md gives {name} level {row.group(1)}, the code {level}"


# ------------------------------------------------------------------------------ the strict build
@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip('MkDocs is not installed: pip install -e ".[docs]" (CI installs it and runs this test)')
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    for name in tta.methods.available():
        assert (site / "methods" / name / "index.html").is_file(), f"no page built for method {name}"
    api = (site / "api" / "methods" / "index.html").read_text(encoding="utf-8")
    assert 'id="tta.methods.build"' in api, "the API reference of tta.methods was not generated"
    assert 'id="tta.adapt"' in (site / "api" / "adapt" / "index.html").read_text(encoding="utf-8")
