"""Every script in examples/ runs to the end (each checks its own results); README.md or the user guide points to
each, every code block in README.md or docs/*.md that names an example on its first line is a verbatim excerpt of
it, and the README's quickstart is the whole of examples/quickstart.py, imports included."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
NEEDS_DIFFUSERS = ("mobius_motion_unet.py", "chopgrad_wan_vae.py")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_there_are_examples():
    assert {path.name for path in EXAMPLES} >= {"quickstart.py", "packed_attention.py", "choose_a_window.py",
                                                *NEEDS_DIFFUSERS}


# Examples with diffusers models, and choose_a_window.py's training loops, take tens of seconds: slow (the quick
# tier runs the others).
SLOW_EXAMPLES = {*NEEDS_DIFFUSERS, "choose_a_window.py"}


@pytest.mark.parametrize("path", [pytest.param(path, marks=pytest.mark.slow) if path.name in SLOW_EXAMPLES else path
                                  for path in EXAMPLES], ids=[path.name for path in EXAMPLES])
def test_example_runs(path):
    if path.name in NEEDS_DIFFUSERS:
        pytest.importorskip("diffusers")
    result = subprocess.run([sys.executable, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


def excerpts(doc: pathlib.Path):
    """(example file, code) of every python block of ``doc`` whose first line is ``# examples/NAME.py``."""
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    return [(block.split("\n", 1)[0][2:].strip(), block.split("\n", 1)[1]) for block in blocks
            if block.startswith("# examples/")]


def test_docs_point_to_every_example_and_show_what_runs():
    text = "\n".join(doc.read_text() for doc in DOCS)
    for path in EXAMPLES:
        assert f"examples/{path.name}" in text, f"no document mentions examples/{path.name}"
    found = [(doc, name, code) for doc in DOCS for name, code in excerpts(doc)]
    assert {name for _, name, _ in found} >= {"examples/quickstart.py", "examples/mobius_motion_unet.py",
                                               "examples/chopgrad_wan_vae.py", "examples/choose_a_window.py"}
    for doc, name, code in found:
        assert code.strip() and code in (ROOT / name).read_text(), f"{doc.name}'s block of {name} is not in it as shown"


def test_readme_quickstart_is_the_whole_example():
    """Copied from the README, the quickstart runs as it is: the block is the complete file."""
    (code,) = [code for name, code in excerpts(ROOT / "README.md") if name == "examples/quickstart.py"]
    assert f"# examples/quickstart.py\n{code}" == (ROOT / "examples" / "quickstart.py").read_text()
    assert len(code.strip().splitlines()) <= 20
