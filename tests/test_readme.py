"""The README's "Python API" section runs: each of its python code blocks is executed as written, so the
snippet a reader copies cannot drift from the API. The diffusers block needs diffusers installed
(.ci/run installs it); without it that block is skipped. Every dotted cbdm_fast name the README gives
exists."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "Python API"


def section_code_blocks(text: str, title: str) -> list[str]:
    """The ```python blocks between the "## <title>" heading and the next "## " heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return re.findall(r"^```python\n(.*?)^```", match.group(1), re.M | re.S)


BLOCKS = section_code_blocks(README.read_text(encoding="utf-8"), SECTION)


def test_the_section_has_the_api_snippets():
    assert len(BLOCKS) >= 2
    assert "cbdm_loss" in BLOCKS[0] and "ddpm_sample" in BLOCKS[0] and "ops.ddpm_step" in BLOCKS[0]
    assert any("patch_model" in block for block in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_api_block_runs(index, one_thread):
    code = BLOCKS[index]
    if re.search(r"^from diffusers |^import diffusers", code, re.M):
        pytest.importorskip("diffusers")
    namespace = {"__name__": f"README_python_api_{index}"}
    exec(compile(code, f"README.md ({SECTION}, block {index + 1})", "exec"), namespace)
    if "images" in namespace:  # what the snippet's comments promise
        assert namespace["images"].shape == namespace["x_T"].shape
        assert namespace["images"].abs().max() <= 1


def _resolve(dotted: str):
    """The module or attribute ``dotted`` names (the longest importable module prefix, then attributes)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


NAMES = sorted(set(re.findall(r"cbdm_fast(?:\.[A-Za-z_]\w*)+", README.read_text(encoding="utf-8"))))


@pytest.mark.parametrize("dotted", NAMES)
def test_every_cbdm_fast_name_in_the_readme_exists(dotted):
    assert _resolve(dotted) is not None
