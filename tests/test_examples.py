"""Every script in examples/ runs to the end (each checks its own results); README.md points to each, and every
README code block that names an example on its first line is a verbatim excerpt of it."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
NEEDS_DIFFUSERS = ("mobius_motion_unet.py", "chopgrad_wan_vae.py")


def test_there_are_examples():
    assert {path.name for path in EXAMPLES} >= {"packed_attention.py", *NEEDS_DIFFUSERS}


# Examples with diffusers models take tens of seconds: slow (the quick tier runs the others).
@pytest.mark.parametrize("path", [pytest.param(path, marks=pytest.mark.slow) if path.name in NEEDS_DIFFUSERS else path
                                  for path in EXAMPLES], ids=[path.name for path in EXAMPLES])
def test_example_runs(path):
    if path.name in NEEDS_DIFFUSERS:
        pytest.importorskip("diffusers")
    result = subprocess.run([sys.executable, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


def readme_excerpts():
    """(example file, code) of every README python block whose first line is ``# examples/NAME.py``."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [(block.split("\n", 1)[0][2:].strip(), block.split("\n", 1)[1]) for block in blocks
            if block.startswith("# examples/")]


def test_readme_points_to_every_example_and_shows_what_runs():
    readme = (ROOT / "README.md").read_text()
    for path in EXAMPLES:
        assert f"examples/{path.name}" in readme, f"README.md does not mention examples/{path.name}"
    excerpts = readme_excerpts()
    assert excerpts, "README.md shows no example"
    for name, code in excerpts:
        assert code.strip() and code in (ROOT / name).read_text(), f"README.md's block of {name} is not in it as shown"
