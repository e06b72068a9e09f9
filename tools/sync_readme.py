"""Write README.md from nbs/index.ipynb (nbdev_readme needs Quarto, which cannot be installed offline).

Markdown cells are copied as they are; code cells become ```python blocks. `--check` exits 1 if README.md
is out of step (used by tests/test_readme.py)."""
import sys
from pathlib import Path
import nbformat

ROOT = Path(__file__).resolve().parents[1]

def render() -> str:
    nb = nbformat.read(ROOT / "nbs" / "index.ipynb", as_version=4)
    parts = []
    for c in nb.cells:
        src = c.source.strip()
        if not src or src.startswith("#| hide"): continue
        parts.append(src if c.cell_type == "markdown" else f"```python\n{src}\n```")
    return "<!-- generated from nbs/index.ipynb by tools/sync_readme.py: edit the notebook -->\n\n" + "\n\n".join(parts) + "\n"

if __name__ == "__main__":
    text = render(); readme = ROOT / "README.md"
    if "--check" in sys.argv:
        ok = readme.exists() and readme.read_text() == text
        print("README.md is in step with nbs/index.ipynb" if ok else "README.md is out of step: run python tools/sync_readme.py")
        sys.exit(0 if ok else 1)
    readme.write_text(text); print(f"wrote {readme}")
