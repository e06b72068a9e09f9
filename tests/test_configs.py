"""Every `configs/*.yaml` parameter file names its pipeline notebook and sets only parameters that notebook declares.

Convention (documented here and in the reproduce tutorials, `nbs/tutorials/1?_reproduce_*.ipynb`): the **first line**
of a parameter file is a comment naming the pipeline notebook it is for, relative to the repository root,

    # notebook: nbs/pipelines/10_train_teacher.ipynb

and the rest is a flat mapping of that notebook's parameters, as `mvsnb run NOTEBOOK -f FILE` and
`papermill NOTEBOOK OUT -f FILE` read it. A comment rather than a key, because papermill and `mvsnb run` pass every
key of the file to the notebook (`mvsnb run` rejects unknown ones). Sweep specs live in `configs/sweeps/` (their
`notebook:` is a key there) and are checked by `tests/test_sweep.py`.

papermill only *warns* about a parameter the notebook does not declare, so a typo in a preset file would silently
run with the default; `papermill.inspect_notebook` on the template catches it here (style guide §15).
"""
import re
from pathlib import Path
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
NOTEBOOK_LINE = re.compile(r"^#\s*notebook:\s*(\S+)\s*$")


def target_notebook(path: Path) -> Path:
    "The notebook named on the first line of a parameter file (ValueError when the line is missing or wrong)."
    lines = path.read_text().splitlines()
    m = NOTEBOOK_LINE.match(lines[0]) if lines else None
    if m is None:
        raise ValueError(f"{path.name}: the first line must be '# notebook: nbs/pipelines/<name>.ipynb'")
    nb = ROOT / m.group(1)
    if not nb.is_file(): raise ValueError(f"{path.name}: names {m.group(1)}, which does not exist")
    return nb


def undeclared_keys(path: Path) -> list[str]:
    "Keys of a parameter file that its notebook's `parameters` cell does not declare."
    import papermill as pm
    declared = pm.inspect_notebook(str(target_notebook(path)))
    data = yaml.safe_load(path.read_text()) or {}
    assert isinstance(data, dict), f"{path.name}: expected a mapping of parameter names to values"
    return sorted(set(data) - set(declared))


def test_smoke_there_are_configs():
    assert CONFIGS, "no configs/*.yaml found"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_feature_config_keys_are_declared_parameters(path):
    assert undeclared_keys(path) == [], f"{path.name}: not parameters of {target_notebook(path).name}"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_feature_config_values_have_the_declared_types(path):
    "The same check `mvsnb run -f` makes before running: names and value types against the annotations."
    from mvsnb.runner import validate_params, load_params_file
    validate_params(target_notebook(path), load_params_file(path))


def test_exception_checker_catches_a_typo_and_a_missing_header(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text("# notebook: nbs/pipelines/10_train_teacher.ipynb\nsteps: 3\nlr: 0.01\n")
    assert undeclared_keys(ok) == []
    typo = tmp_path / "typo.yaml"
    typo.write_text("# notebook: nbs/pipelines/10_train_teacher.ipynb\nstpes: 3\nlr: 0.01\n")
    assert undeclared_keys(typo) == ["stpes"]
    for text in ("steps: 3\n", "# some comment\n# notebook: nbs/pipelines/10_train_teacher.ipynb\nsteps: 3\n"):
        bad = tmp_path / "bad.yaml"; bad.write_text(text)
        with pytest.raises(ValueError, match="first line"): target_notebook(bad)
    gone = tmp_path / "gone.yaml"
    gone.write_text("# notebook: nbs/pipelines/77_nothing.ipynb\nsteps: 3\n")
    with pytest.raises(ValueError, match="does not exist"): target_notebook(gone)
