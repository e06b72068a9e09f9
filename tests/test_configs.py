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


# ------------------------------------------------------------------------------------------------ sweep specs
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
STAGE_PARAMS = {"teacher_params": "10_train_teacher", "student_params": "30_self_train", "eval_params": "50_evaluate"}


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_feature_sweep_specs_load_and_name_their_paper_table(path):
    "Every sweep spec names real parameters of its notebook with the right types, and says which paper table it mirrors."
    from mvsnb.sweep import load_spec, expand
    spec = load_spec(path)
    runs = expand(spec)
    assert runs and len({r.run_id for r in runs}) == len(runs)
    assert re.search(r"Table \d", spec.description), f"{path.name}: the description must name the paper table"


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_feature_sweep_nested_parameters_are_valid(path):
    "Parameters handed on to other stages (teacher/student/eval params) and config overrides are checked too, per run."
    from mvsnb.sweep import load_spec, expand
    from mvsnb.runner import validate_params
    from mvsnb.losses.unsup import unsup_config
    from mvsnb.crossview import CrossViewConfig
    spec = load_spec(path)
    for run in expand(spec):
        p = run.params
        for key, nb in STAGE_PARAMS.items():
            if p.get(key): validate_params(ROOT / "nbs" / "pipelines" / f"{nb}.ipynb", dict(p[key]))
        if spec.notebook.name == "10_train_teacher.ipynb" and p.get("loss"):
            unsup_config(p["loss"], **p.get("loss_overrides", {}))
        if spec.notebook.name == "20_pseudo_labels.ipynb":
            for check in {p.get("spsr_check", "selfsup_cvp"), p.get("kd_check", "kdmvs_paper")}:
                CrossViewConfig.preset(check, **p.get("check_overrides", {}))


def test_feature_div_table3_has_all_eight_rows():
    "DIV Table 3, in the paper's order: smoothness variants, synthesis, occlusion without synthesis, both, + view sampling."
    from mvsnb.sweep import load_spec
    from mvsnb.losses.unsup import unsup_config
    div = load_spec(ROOT / "configs" / "sweeps" / "div_table3.yaml")
    assert list(div.variants) == ["1st_order", "clamped_1st_order", "2nd_order", "clamped_2nd_order", "clamped_2nd+synthesis",
                                  "clamped_2nd+occlusion", "clamped_2nd+synthesis+occlusion",
                                  "clamped_2nd+synthesis+occlusion+view_sampling"]
    cfgs = {n: unsup_config(div.base["loss"], **v["loss_overrides"]) for n, v in div.variants.items()}
    row = lambda c: (c.synthesis, c.smooth_order, c.smooth_clamp, c.warp_occlusion, c.synthesis == "div" and c.div.use_occlusion)
    assert [row(c) for c in cfgs.values()] == [
        ("warp", 1, None, False, False), ("warp", 1, 1.5, False, False), ("warp", 2, None, False, False),
        ("warp", 2, 1.5, False, False), ("div", 2, 1.5, False, False), ("warp", 2, 1.5, True, False),
        ("div", 2, 1.5, False, True), ("div", 2, 1.5, False, True)]
    sampling = [n for n, v in div.variants.items() if v.get("sample_sup_top", div.base.get("sample_sup_top", 0))]
    assert sampling == ["clamped_2nd+synthesis+occlusion+view_sampling"]
    assert div.base["scene_views"] - 1 >= div.variants[sampling[0]]["sample_sup_top"] >= div.base["num_views"] - 1
    assert all(c.clamp_in_intervals and c.div.occ_tol == 0 and c.div.occ_tol_rel == 0.004 for c in cfgs.values())


def test_feature_label_sweeps_map_the_paper_rows():
    "KD-MVS Supp. Table 2 thresholds and the Self-sup CVP Table 6/7 switches, row by row."
    from mvsnb.sweep import load_spec
    kd = load_spec(ROOT / "configs" / "sweeps" / "kdmvs_supp_table2.yaml")
    taus = [(v["check_overrides"]["tau_conf"], v["check_overrides"]["tau_reproj"], v["check_overrides"]["tau_geo"]) for v in kd.variants.values()]
    assert taus == [(0.30, 2.0, 0.020), (0.20, 1.5, 0.015), (0.15, 1.0, 0.010), (0.10, 0.5, 0.005)]
    assert kd.base["labels"] == "kd" and kd.base["student_params"]["loss"] == "kd_paper"
    t6 = load_spec(ROOT / "configs" / "sweeps" / "selfsup_cvp_table6.yaml")
    p = {n: {**t6.base, **v} for n, v in t6.variants.items()}
    hrr = lambda q: q.get("infer_height", 0) > q["teacher_params"]["height"] and q.get("infer_levels", 0) > 0
    assert [(hrr(q), q["labels"], bool(q["student_params"]), q.get("evaluate_teacher", False)) for q in p.values()] == [
        (False, "spsr", False, True), (False, "kd", True, False), (True, "kd", True, False), (False, "spsr", True, False), (True, "spsr", True, False)]
    assert all(q["student_params"].get("labels") == q["labels"] for q in p.values() if q["student_params"])
    assert [q.get("rounds", 1) for q in p.values()] == [1, 2, 2, 2, 2]  # Table 6 rows read as two rounds (= Table 7 iteration 2)
    t7 = load_spec(ROOT / "configs" / "sweeps" / "selfsup_cvp_table7.yaml")
    assert t7.base["rounds"] == 4 and t7.base["evaluate_teacher"] and hrr(t7.base) and t7.base["labels"] == "spsr"
    assert [m for m in t7.metrics if m.endswith(".overall")] == [f"by_round.round_{k}.overall" for k in range(5)]


def test_feature_selfsup_cvp_table7_supervised_row():
    "Table 7's supervised row: one round, no teacher evaluation, a from-scratch student on ground-truth labels."
    from mvsnb.sweep import load_spec, expand
    t7 = load_spec(ROOT / "configs" / "sweeps" / "selfsup_cvp_table7.yaml")
    assert list(t7.variants) == ["iterations", "supervised"]
    runs = {r.variant: r.params for r in expand(t7) if r.seed == 0}
    sup, it = runs["supervised"], runs["iterations"]
    assert it["rounds"] == 4 and it["student_params"]["labels"] == "spsr"
    assert sup["rounds"] == 1 and not sup["evaluate_teacher"]
    assert (sup["student_params"]["labels"], sup["student_params"]["init"]) == ("gt", "scratch")
