"""Every ```python block of README.md runs as written (in a scratch folder, on the CPU, torch backend)."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    block = BLOCKS[index]
    for package in ("transformers", "lightning"):
        if re.search(rf"^import .*\b{package}\b", block, re.M):
            pytest.importorskip(package)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
