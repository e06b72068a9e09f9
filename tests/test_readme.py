"""README.md is generated from nbs/index.ipynb; the two must stay in step, and the README's commands must exist."""
import re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def test_feature_readme_in_step_with_index():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "sync_readme.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

def test_feature_readme_commands_exist():
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    make = (ROOT / "Makefile").read_text()
    for target in ("demo", "test", "bench"): assert re.search(rf"^{target}:", make, re.M)
    for img in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text): assert (ROOT / img).exists(), img
