"""Pipeline notebooks run through papermill (a real kernel) with tiny parameters, via mvsnb.runner."""
import json, math
from pathlib import Path
import pytest
import torch
from mvsnb.core import InputError
from mvsnb.runner import run_notebook, notebook_params, validate_params, NotebookError

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "nbs" / "pipelines"
TEACHER = PIPELINES / "10_train_teacher.ipynb"

TINY = {"height": 32, "width": 40, "scene_views": 4, "num_views": 3, "steps": 4, "train_overrides": {"log_every": 1, "ckpt_every": 2, "val_every": 2}}


def test_exception_unknown_parameter_rejected(tmp_path):
    with pytest.raises(InputError) as e: run_notebook(TEACHER, tmp_path / "run", {"stpes": 3})
    msg = str(e.value)
    assert "unknown parameter(s) ['stpes']" in msg and "'steps'" in msg and "'run_dir'" in msg
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(InputError, match=r"\[steps\]: expected int"): run_notebook(TEACHER, tmp_path / "run", {"steps": "3"})
    with pytest.raises(InputError, match=r"\[lr\]: expected float"): run_notebook(TEACHER, tmp_path / "run", {"lr": True})


def test_smoke_teacher_parameters_declared():
    p = notebook_params(TEACHER)
    assert {"run_dir", "steps", "model", "loss", "seed", "resume", "device"} <= set(p)
    assert p["steps"]["inferred_type_name"] == "int" and p["lr"]["inferred_type_name"] == "float"
    assert validate_params(TEACHER, {"steps": 3, "lr": 1}) == {"steps": 3, "lr": 1}  # an int is a valid float


def test_feature_train_teacher_pipeline(tmp_path):
    "The teacher stage end to end on the tiny synthetic scene; outputs exist and hold sane values."
    run = tmp_path / "teacher"
    nb = run_notebook(TEACHER, run, TINY)
    assert nb == run / "10_train_teacher.ipynb" and nb.exists()
    params = json.loads((run / "params.json").read_text())
    assert params["steps"] == 4 and params["run_dir"] == str(run.resolve())
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == str(torch.__version__)
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 4 and math.isfinite(m["loss_first"]) and math.isfinite(m["loss_last"]) and m["loss_last"] > 0
    for v in (m["val"], m["val_untrained"]):
        assert 0 <= v["holdout_photo"] < 1 and 0 < v["holdout_valid"] <= 1  # images in [0,1]
        assert 0 < v["mae_rel"] < 1 and v["mae"] > 0  # ground truth exists for the synthetic scene
    ck = torch.load(run / m["checkpoint"], weights_only=True)
    assert ck["step"] == 4 and ck["config"]["model"] == params["model"]
    assert (run / "fig_train_curve.png").stat().st_size > 1000
    assert len((run / "train_log.csv").read_text().splitlines()) == 1 + 4
    # the next stage can rebuild the teacher from the checkpoint alone
    from mvsnb.train import model_from_checkpoint
    model, _ = model_from_checkpoint(run / m["checkpoint"])
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.slow
def test_feature_train_teacher_rerun_and_resume(tmp_path):
    "Overwrite/resume semantics through papermill; a failing notebook names its cell and stays on disk."
    run = tmp_path / "teacher"
    run_notebook(TEACHER, run, TINY)
    # re-running into the same folder needs overwrite=True, and then resume=True to continue
    with pytest.raises(InputError, match="overwrite=True"): run_notebook(TEACHER, run, TINY)
    with pytest.raises(NotebookError) as e: run_notebook(TEACHER, run, TINY, overwrite=True)
    assert "resume=True" in str(e.value) and e.value.output.exists()  # failing cell named, notebook kept
    run_notebook(TEACHER, run, {**TINY, "steps": 6, "resume": True}, overwrite=True)
    m2 = json.loads((run / "metrics.json").read_text())
    assert m2["steps"] == 6
    rows = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
