"""Every ```python block of README.md and of docs/*.md runs as written (in a scratch folder, on the CPU, torch
backend), and the pages hang together: relative links and anchors resolve, the design keeps the section numbers
the code cites ("design §n"), and the README keeps the commands CI and newcomers rely on."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
BLOCKS = [(page, index, block) for page in PAGES
          for index, block in enumerate(BLOCK.findall(page.read_text(encoding="utf-8")))]
# The fewest Python blocks each page may have: the examples that used to be the README's now live in docs/api.md,
# and none may be lost on the way.
MIN_BLOCKS = {"README.md": 1, "docs/api.md": 9, "docs/backends.md": 1}


def _name(page: pathlib.Path) -> str:
    return page.relative_to(ROOT).as_posix()


def test_pages_have_python_blocks():
    counts = {name: sum(1 for page, _, _ in BLOCKS if _name(page) == name) for name in MIN_BLOCKS}
    assert all(counts[name] >= least for name, least in MIN_BLOCKS.items()), counts
    assert len(BLOCKS) >= 11


@pytest.mark.parametrize("page, index, block", BLOCKS, ids=[f"{_name(p)}-{i}" for p, i, _ in BLOCKS])
def test_python_block_runs(page, index, block, tmp_path, monkeypatch):
    for package in ("transformers", "lightning"):
        if re.search(rf"^import .*\b{package}\b", block, re.M):
            pytest.importorskip(package)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"{_name(page)} python block {index}", "exec"), {"__name__": "__readme__"})


def _anchors(page: pathlib.Path) -> set:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.*)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, f"{_name(page)}: links that lead nowhere: {broken}"


def test_design_keeps_its_section_numbers():
    """The code cites "design §1" … "design §7": the numbers must keep meaning what they meant."""
    headings = re.findall(r"^## (\d+)\. (.*)$", (ROOT / "docs" / "design.md").read_text(encoding="utf-8"), re.M)
    titles = {int(n): t for n, t in headings}
    expected = {1: "The math", 2: "Layout", 3: "Public API", 4: "Backends", 5: "Kernels and the cost model",
                6: "Performance goals", 7: "Testing"}
    for number, title in expected.items():
        assert titles.get(number, "").startswith(title), (number, titles.get(number))
    assert [int(n) for n, _ in headings] == list(range(1, len(headings) + 1))


def test_readme_is_a_landing_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) <= 15_000
    # .ci/run runs exactly the README's test command; the quick start's two commands stay as they are.
    assert '    python -m pip install -e ".[test]" && python -m pytest tests -n auto\n' in text
    assert '    python -m pip install -e ".[bench]" && colora-bench\n' in text
    assert "git clone" in text
