"""The documentation stays true to the tree: links resolve, the README stays
short, and every RPSERVER_* variable the code reads is documented.

No server and no database: these read files only.
"""

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
README_MAX_LINES = 260

# The pages people are sent to: the README, everything under docs/, the benchmark history.
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "RESULTS.md"]

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.MULTILINE)
# A repository path named in the text, e.g. `inference/engine.py` or deploy/rpserver@.service.
FILE_PATH = re.compile(r"(?<![\w/.-])((?:[\w.@-]+/)+[\w.@-]+\.(?:py|cpp|h|md|sh|conf|service|timer|js|html|css|txt|ini))\b")
VARIABLE = re.compile(r"\bRPSERVER_[A-Z0-9_]*[A-Z0-9]\b")
# Not the project's code: the virtual environment, caches, installed packages.
NOT_CODE = {".venv", ".git", "node_modules", "__pycache__", ".pytest_cache", "staticfiles", "media", "model"}


def prose(text):
    """The text with code blocks and inline code removed (a link inside them is not a link)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "").strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(page):
    """Every anchor a page's headings give, with GitHub's -1, -2 ... for repeated ones."""
    seen = {}
    found = set()
    for _, heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def links(page):
    """(target, anchor) of every relative link on the page."""
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        yield path, anchor


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert page.exists(), f"{page.relative_to(ROOT)} is missing"
    broken = []
    for path, anchor in links(page):
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{path}: no such file")
        elif ROOT not in target.parents and target != ROOT:
            broken.append(f"{path}: outside the repository")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{path}#{anchor}: no such heading in {target.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES[:-1], ids=lambda page: str(page.relative_to(ROOT)))
def test_every_file_the_page_names_exists(page):
    """Paths in the text, links or not (bench/RESULTS.md, a history, is left out)."""
    named = FILE_PATH.findall(page.read_text(encoding="utf-8"))
    missing = sorted({path for path in named if not (ROOT / path).exists() and not (page.parent / path).exists()})
    assert not missing, f"{page.relative_to(ROOT)} names files that do not exist: {missing}"


def test_the_readme_links_into_every_docs_page():
    linked = {(README.parent / path).resolve() for path, _ in links(README) if path}
    pages = set((ROOT / "docs").glob("*.md"))
    missing = sorted(str(page.relative_to(ROOT)) for page in pages if page.resolve() not in linked)
    assert not missing, f"README.md does not link to {missing}"


def test_the_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move details into docs/ and link them")


def code_variables():
    """{variable: first file} of every RPSERVER_* name in the project's Python code."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if NOT_CODE & set(relative.parts) or path == Path(__file__).resolve():
            continue
        for name in VARIABLE.findall(path.read_text(encoding="utf-8")):
            found.setdefault(name, str(relative))
    return found


def test_every_variable_in_the_code_is_documented():
    variables = code_variables()
    assert len(variables) > 20, f"the scan of the code found only {sorted(variables)}"
    documented = set(VARIABLE.findall(CONFIGURATION.read_text(encoding="utf-8")))
    missing = sorted(f"{name} ({where})" for name, where in variables.items() if name not in documented)
    assert not missing, f"docs/configuration.md does not document: {', '.join(missing)}"


def test_every_documented_variable_is_in_the_code():
    variables = code_variables()
    documented = set(VARIABLE.findall(CONFIGURATION.read_text(encoding="utf-8")))
    stale = sorted(documented - set(variables))
    assert not stale, f"docs/configuration.md documents variables no code reads: {', '.join(stale)}"
