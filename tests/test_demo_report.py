"""`make demo`'s report (tools/demo_report.py) and the GT-free metrics of 50_evaluate, with and without ground truth."""
import importlib.util, json, shutil
from pathlib import Path
import pytest
from mvsnb.runner import run_notebook

ROOT = Path(__file__).resolve().parents[1]
EVALUATE = ROOT / "nbs" / "pipelines" / "50_evaluate.ipynb"
_spec = importlib.util.spec_from_file_location("demo_report", ROOT / "tools" / "demo_report.py")
demo_report = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(demo_report)
NAME = {d: n for n, d in demo_report.EVALS}  # stage folder → report row name

GT_WORDS = ("GT: depth MAE", "GT: cloud overall", "against ground truth", "label MAE", "ground-truth depth (reference)")


def _gt_free(photo, frac, views=1.5, srcs=3.0):
    return {"photometric": {"photo": photo, "covered": 0.8, "per_view": [photo], "heldout_source_rank": 3},
            "agreement": {"fraction": frac, "mean_views": views, "mean_sources": srcs, "min_views": [3], "check": "eval_fusion"}}


def _write(run, stage, obj, name="metrics.json"):
    (run / stage).mkdir(parents=True, exist_ok=True)
    (run / stage / name).write_text(json.dumps(obj))


def _table(report, header_start):
    "The rows of the markdown table whose header starts with `header_start`, as lists of cells."
    lines = report.splitlines()
    i = next(k for k, l in enumerate(lines) if l.startswith(header_start))
    rows = []
    for l in lines[i:]:
        if not l.startswith("|"): break
        rows.append([c.strip() for c in l.strip("|").split("|")])
    return rows[0], rows[2:]


def test_feature_report_gt_free_next_to_gt(tmp_path):
    "Synthetic run: each stage's GT-free numbers sit in the same row as its GT errors; a GT-depth reference row."
    run = tmp_path / "run"
    for stage, photo, frac, mae in (("50_eval_teacher", 0.1234, 0.25, 0.0934), ("50_eval_student_kd", 0.0987, 0.5, 0.0874)):
        ts = {"has_gt": True, "depth": {"all": {"abs_mean": 2 * mae, "within_1pct": 10.0}, "region": {"abs_mean": mae}},
              "fusion": {"num_points": 1000}, "cloud": {"accuracy": 0.1, "completeness": 0.2, "overall": 0.15, "fscore": 0.5},
              "gt_free": {**_gt_free(photo, frac), "gt_depth": _gt_free(0.0421, 0.875, 2.7)}}
        _write(run, stage, {"train_scene": ts, "heldout_scene": {"has_gt": True, "depth": {"region": {"abs_mean": 0.17}}, "gt_free": _gt_free(0.2, 0.125)}})
    _write(run, "20_labels", {"raw": {"all": {"abs_mean": 0.3}}, "kd": {"kept_fraction": 0.5, "coverage": 0.49, "labels": {"all": {"abs_mean": 0.0456}}}})
    demo_report.main(run, 99)
    rep = (run / "report.md").read_text()
    head, rows = _table(rep, "| stage | held-out-view photometric error")
    assert "cross-view agreement (≥ 3 views) ↑" in head and "GT: depth MAE region" in head and "held-out scene: photometric ↓" in head
    col = {h: i for i, h in enumerate(head)}
    by = {r[0]: r for r in rows}
    t = by["teacher (unsupervised, khot)"]; s = by[NAME["50_eval_student_kd"]]
    assert (t[col["held-out-view photometric error ↓"]], t[col["GT: depth MAE region"]], t[col["cross-view agreement (≥ 3 views) ↑"]]) == ("0.1234", "0.0934", "25.0 %")
    assert (s[col["held-out-view photometric error ↓"]], s[col["GT: depth MAE region"]], s[col["GT: cloud overall"]]) == ("0.0987", "0.0874", "0.15")
    assert t[col["held-out scene: agreement ↑"]] == "12.5 %" and t[col["fused points"]] == "1000"
    ref = by["*ground-truth depth (reference)*"]
    assert ref[col["held-out-view photometric error ↓"]] == "0.0421" and ref[col["cross-view agreement (≥ 3 views) ↑"]] == "87.5 %"
    assert NAME["50_eval_student_spsr"] not in by  # a stage that did not run has no row
    assert "## Depth and point cloud against ground truth" in rep and "0.0456" in rep and "wall time 99 s" in rep
    # the verdict line: lower MAE than the teacher on all pixels and in the region, same on the held-out region (not lower)
    assert f"- {NAME['50_eval_student_kd']}: vs teacher all ✓ (-6.4%), region ✓ (-6.4%), held-out region ✗ (+0.0%)" in rep


def test_feature_report_without_gt_omits_gt_columns(tmp_path):
    "Real scene (no gt/): the GT-free table alone; no GT column, section or label-error column; a missing metric is '–'."
    run = tmp_path / "run"
    _write(run, "10_teacher", {"data_root": "/data/fountain", "height": 64, "width": 96}, "params.json")
    _write(run, "50_eval_teacher", {"train_scene": {"has_gt": False, "fusion": {"num_points": 321}, "gt_free": _gt_free(0.0765, 0.3125)}})
    no_holdout = _gt_free(0.05, 0.5); no_holdout["photometric"] = None  # e.g. a 2-view scene: no source left to hold out
    _write(run, "50_eval_student_spsr", {"train_scene": {"has_gt": False, "fusion": {"num_points": 0}, "gt_free": no_holdout}})
    _write(run, "20_labels", {"raw": None, "kd": {"kept_fraction": 0.4, "coverage": 0.375, "labels": None}, "fused_points": 77})
    demo_report.main(run)
    rep = (run / "report.md").read_text()
    for w in GT_WORDS: assert w not in rep, w
    head, rows = _table(rep, "| stage | held-out-view photometric error")
    assert not any(h.startswith("GT") or "held-out scene" in h for h in head)
    by = {r[0]: r for r in rows}
    assert by["teacher (unsupervised, khot)"][1:4] == ["0.0765", "80.0 %", "31.2 %"] and by["teacher (unsupervised, khot)"][5] == "321"
    assert by[NAME["50_eval_student_spsr"]][1:4] == ["–", "–", "50.0 %"]
    assert "| kd | 40.0 % | 37.5 % |" in rep and "77 points" in rep and "/data/fountain` at 64x96" in rep


@pytest.mark.slow
def test_feature_evaluate_scene_without_gt(tmp_path):
    "50_evaluate on a scene with gt/ and on the same scene without it: identical GT-free metrics, GT keys only where GT exists."
    from mvsnb.synthetic import make_scene, write_scene
    scene = write_scene(make_scene(views=4, seed=0, height=32, width=40), tmp_path / "scene")
    nogt = shutil.copytree(scene, tmp_path / "nogt", ignore=shutil.ignore_patterns("gt", "scene.json"))
    ev = tmp_path / "run" / "50_eval_teacher"
    run_notebook(EVALUATE, ev, dict(scene_dir=str(scene), heldout_scene_dir=str(nogt), teacher_steps=4))
    m = json.loads((ev / "metrics.json").read_text())
    tr, ho = m["train_scene"], m["heldout_scene"]
    assert tr["has_gt"] and "depth" in tr and tr["cloud"] is not None
    assert not ho["has_gt"] and "depth" not in ho and "cloud" not in ho and ho["fusion"]["num_points"] == tr["fusion"]["num_points"]
    g, h = tr["gt_free"], ho["gt_free"]
    assert "gt_depth" in g and "gt_depth" not in h
    for k in ("photo", "covered"): assert g["photometric"][k] == pytest.approx(h["photometric"][k])  # same images, same depth
    for k in ("fraction", "mean_views"): assert g["agreement"][k] == pytest.approx(h["agreement"][k])
    assert g["photometric"]["heldout_source_rank"] == 3 and len(g["photometric"]["per_view"]) == 4
    assert 0 < g["photometric"]["covered"] <= 1 and 0 <= g["agreement"]["fraction"] <= 1 and g["agreement"]["mean_sources"] == 3
    # the true depth explains the held-out view better and agrees across views more than a 4-step teacher's
    ref = g["gt_depth"]
    assert ref["photometric"]["photo"] < 0.7 * g["photometric"]["photo"]
    assert ref["agreement"]["fraction"] > g["agreement"]["fraction"] + 0.2 and ref["agreement"]["mean_views"] > g["agreement"]["mean_views"]
    assert (ev / "fig_depth.png").stat().st_size > 1000 and (ev / "fig_cloud.png").is_file()
    # the report of a run on the GT-less scene alone (what 50_evaluate writes for a GT-less train scene)
    solo = tmp_path / "solo"
    (solo / "50_eval_teacher").mkdir(parents=True)
    (solo / "50_eval_teacher" / "metrics.json").write_text(json.dumps({**m, "train_scene": ho, "heldout_scene": None}))
    demo_report.main(solo)
    rep = (solo / "report.md").read_text()
    for w in GT_WORDS: assert w not in rep, w
    _, rows = _table(rep, "| stage | held-out-view photometric error")
    assert rows[0][1] == demo_report.fmt(h["photometric"]["photo"])
