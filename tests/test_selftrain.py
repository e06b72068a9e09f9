"""Self-training stages chained through papermill (teacher → labels → student → evaluate) and the resumable driver."""
import json, math, time
from pathlib import Path
import pytest
import torch
from mvsnb.core import InputError
from mvsnb.runner import run_notebook, notebook_params, NotebookError
from mvsnb.selftrain import (SelfTrainConfig, selftrain_rounds, rounds_table, read_run, pipeline_notebook,
                             write_depth_outputs, label_quality)

ROOT = Path(__file__).resolve().parents[1]
PIPE = ROOT / "nbs" / "pipelines"
TEACHER, LABELS, STUDENT, EVALUATE = (PIPE / f"{n}.ipynb" for n in ("10_train_teacher", "20_pseudo_labels", "30_self_train", "50_evaluate"))
SIZE = dict(height=32, width=40)
# lenient checks: a teacher trained for a few steps must still leave some labels
LOOSE = dict(tau_conf=0.0, min_views=1, min_views_frac=None, tau_geo=0.05, tau_reproj=2.0)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from mvsnb.synthetic import make_scene, write_scene
    return write_scene(make_scene(views=4, seed=0, **SIZE), tmp_path_factory.mktemp("st") / "scene")


def _json(p): return json.loads(Path(p).read_text())


def _teacher(tmp, scene, steps=4):
    run = tmp / "teacher"
    run_notebook(TEACHER, run, dict(data_root=str(scene), model="cvp", steps=steps, num_views=3, **SIZE))
    return run


def test_smoke_pipeline_parameters_declared():
    "Every stage declares typed parameters, run_dir and its input run folder."
    for nb, inputs in ((LABELS, {"teacher_run", "scene_dir", "infer_levels", "labels"}),
                       (STUDENT, {"labels_run", "labels", "loss", "init", "steps", "resume", "unsup_weight", "unsup_loss", "unsup_pixels", "unsup_overrides"}),
                       (EVALUATE, {"checkpoint_run", "scene_dir", "heldout_scene_dir", "fusion_check"})):
        p = notebook_params(nb)
        assert inputs | {"run_dir", "seed", "device"} <= set(p), nb.name
        assert all(v["inferred_type_name"] not in ("None", None) for v in p.values()), nb.name  # every line typed
    assert notebook_params(LABELS)["infer_levels"]["inferred_type_name"] == "int"
    assert pipeline_notebook("50_evaluate") == EVALUATE


def test_smoke_labels_stage(tmp_path, scene):
    "20_pseudo_labels on a teacher checkpoint made in-process: label folders with manifests, sane numbers."
    from mvsnb.data import DTUTestDataset
    from mvsnb.train import train_config, train
    cfg = train_config("tiny_cpu", model="cvp", steps=3, run_dir=str(tmp_path / "t"), progress=False, val_every=0)
    train(cfg, DTUTestDataset(scene, num_views=3, **SIZE))
    (tmp_path / "t" / "params.json").write_text(json.dumps(dict(data_root=str(scene), **SIZE)))
    (tmp_path / "t" / "metrics.json").write_text(json.dumps(dict(checkpoint="checkpoints/last.pt")))
    run = tmp_path / "labels"
    run_notebook(LABELS, run, dict(teacher_run=str(tmp_path / "t"), labels="kd", kd_check="eval_fusion", check_overrides=LOOSE))
    m = _json(run / "metrics.json")
    assert m["teacher_checkpoint"] == str(tmp_path / "t" / "checkpoints" / "last.pt") and m["scene_dir"] == str(scene)
    assert "spsr" not in m and 0 < m["kd"]["coverage"] <= 1
    man = _json(run / "labels_kd" / "manifest.json")
    assert man["method"] == "kd" and man["num_views"] == 4 and man["has_sigma"] and man["coverage_mean"] == m["kd"]["coverage"]
    # the checked labels are the raw depth averaged over consistent views: never farther from GT than 2x the raw error
    kd = m["kd"]
    assert kd["checked"]["all"]["n"] == kd["raw_on_kept"]["all"]["n"] > 0
    assert kd["checked"]["all"]["abs_mean"] <= 2 * kd["raw_on_kept"]["all"]["abs_mean"] + 1e-6
    assert (run / "fig_labels.png").stat().st_size > 1000 and (run / "teacher_depth" / "depth_est" / "00000003.pfm").is_file()
    assert _json(run / "params.json")["labels"] == "kd" and "torch" in _json(run / "env.json")


@pytest.mark.slow
def test_feature_stage_chain(tmp_path, scene):
    "teacher → labels (spsr + kd) → students (pseudo_l1 fine-tune, kd_paper from scratch) → evaluate, each reading the previous folder."
    teacher = _teacher(tmp_path, scene)
    labels = tmp_path / "labels"
    run_notebook(LABELS, labels, dict(teacher_run=str(teacher), labels="both", infer_levels=3, infer_height=64, infer_width=80,
                                      spsr_check="eval_fusion", kd_check="eval_fusion", check_overrides=LOOSE,
                                      spsr_overrides={"depth": 6, "density_quantile": 0.05, "min_points": 20}))
    lm = _json(labels / "metrics.json")
    assert lm["teacher_run"] == str(teacher) and lm["infer"]["size"] == [64, 80] and lm["infer"]["levels"] == 3
    for kind in ("spsr", "kd"):
        man = _json(labels / f"labels_{kind}" / "manifest.json")
        assert man["method"] == kind and 0 < man["coverage_mean"] <= 1 and lm[kind]["folder"] == f"labels_{kind}"
    assert _json(labels / "labels_spsr" / "manifest.json")["height"] == 32  # rendered at the teacher's training size
    assert _json(labels / "labels_kd" / "manifest.json")["height"] == 64  # at the inference size
    assert lm["raw"]["all"]["coverage"] == 1.0 and lm["fused_points"] > 0

    students = {}
    for name, p in (("spsr", dict(labels="spsr", loss="pseudo_l1", init="teacher")),
                    ("kd", dict(labels="kd", loss="kd_paper", init="scratch")),
                    ("kd_hybrid", dict(labels="kd", loss="kd_paper", init="teacher", unsup_weight=0.5, unsup_pixels="unlabelled"))):
        run = tmp_path / f"student_{name}"
        run_notebook(STUDENT, run, dict(labels_run=str(labels), steps=3, **p))
        m, prm = _json(run / "metrics.json"), _json(run / "params.json")
        assert m["steps"] == 3 and math.isfinite(m["loss_last"]) and m["labels"] == p["labels"]
        assert prm["data_root"] == str(scene) and prm["height"] == 32 and prm["label_dir"] == str(labels / f"labels_{p['labels']}")
        assert 0 < m["val"]["mae"] and 0 < m["val_teacher"]["mae"]
        ck = torch.load(run / m["checkpoint"], weights_only=True)
        assert ck["step"] == 3 and m["unsup_weight"] == p.get("unsup_weight", 0.0)
        if p.get("unsup_weight"):  # the hybrid objective: the run's loss is "hybrid", wrapping the pseudo-label loss
            assert ck["config"]["loss"] == "hybrid" and prm["unsup_pixels"] == "unlabelled"
            assert ck["config"]["loss_overrides"] == dict(pseudo="kd_paper", pseudo_overrides={}, unsup="khot", unsup_overrides={},
                                                          weight=0.5, pixels="unlabelled")
        else: assert ck["config"]["loss"] == p["loss"]
        students[name] = run
    t_ck = torch.load(read_run(teacher).checkpoint, weights_only=True)["config"]
    assert _json(students["spsr"] / "metrics.json")["init"] == str(read_run(teacher).checkpoint)
    assert _json(students["kd"] / "metrics.json")["init"] == "scratch"
    assert torch.load(students["kd"] / "checkpoints" / "last.pt", weights_only=True)["config"]["model"] == t_ck["model"]

    ev = tmp_path / "eval"
    run_notebook(EVALUATE, ev, dict(checkpoint_run=str(students["kd"]), heldout_scene_dir=str(scene), fusion_check="eval_fusion", check_overrides=LOOSE))
    em = _json(ev / "metrics.json")
    assert em["checkpoint"] == str(students["kd"] / "checkpoints" / "last.pt")
    for part in ("train_scene", "heldout_scene"):
        d = em[part]["depth"]
        assert d["all"]["n"] == 4 * 32 * 40 and 0 < d["all"]["abs_mean"] < 10 and d["region"]["n"] < d["all"]["n"]
    assert em["train_scene"]["depth"]["all"]["abs_mean"] == pytest.approx(em["heldout_scene"]["depth"]["all"]["abs_mean"])  # same scene twice
    if em["train_scene"]["cloud"] is not None: assert em["train_scene"]["cloud"]["accuracy"] >= 0
    assert (ev / "fig_depth.png").is_file() and (ev / "depth_train_scene" / "confidence").is_dir()


def test_exception_student_missing_labels(tmp_path, scene):
    "30_self_train asked for KD labels from a run that made only SPSR ones: the failing cell is named, nothing trained."
    labels = tmp_path / "labels"; labels.mkdir()
    (labels / "metrics.json").write_text(json.dumps({"spsr": {"folder": "labels_spsr", "coverage": 0.5}, "scene_dir": str(scene), "teacher_run": "x"}))
    with pytest.raises(NotebookError, match="no 'kd' labels"):
        run_notebook(STUDENT, tmp_path / "s", dict(labels_run=str(labels), labels="kd", loss="kd_paper"))
    assert not (tmp_path / "s" / "checkpoints").exists()


def test_exception_selftrain_config():
    with pytest.raises(InputError, match="only KD labels"): SelfTrainConfig(labels="spsr", loss="kd_release")
    with pytest.raises(InputError, match="init"): SelfTrainConfig(init="warm")
    c = SelfTrainConfig.preset("selfsup_cvp")
    assert (c.labels, c.loss, c.check, c.init, c.infer_levels, c.infer_scale) == ("spsr", "pseudo_l1", "selfsup_cvp", "previous", 3, 2)
    c = SelfTrainConfig.preset("kdmvs_release")
    assert (c.labels, c.loss, c.init) == ("kd", "kd_release", "scratch")


def test_feature_rounds_skip_done_and_refuse_other_config(tmp_path, scene):
    "Rounds with a done marker are read back, not re-run; a folder started with another config is refused."
    cfg = SelfTrainConfig.preset("kdmvs", rounds=0, scene_dir=str(scene), teacher_run=str(tmp_path / "teacher"), evaluate=False)
    r0 = tmp_path / "run" / "round_0"; r0.mkdir(parents=True)
    rec0 = dict(round=0, kind="teacher", model_run="teacher-run", checkpoint="x.pt", seconds={})
    (r0 / "round.json").write_text(json.dumps(rec0)); (r0 / "done").write_text("")
    out = selftrain_rounds(cfg, tmp_path / "run", progress=False)  # nothing to run: the teacher round is done
    assert out["rounds"] == [rec0] and _json(tmp_path / "run" / "rounds.json")["rounds"] == [rec0]
    with pytest.raises(InputError, match="different config.*steps"):
        selftrain_rounds(SelfTrainConfig.preset("kdmvs", rounds=0, scene_dir=str(scene), teacher_run=str(tmp_path / "teacher"),
                                                evaluate=False, steps=7), tmp_path / "run", progress=False)


def test_feature_label_quality_against_loop():
    "label_quality on labels at half the GT size agrees with a per-pixel loop."
    torch.manual_seed(1)
    g = torch.rand(2, 1, 8, 10) * 2 + 3; g[1, 0, 2:4] = 0
    lab = g[..., 1::2, 1::2] + 0.1 * torch.randn(2, 1, 4, 5)
    lm = torch.rand(2, 1, 4, 5) > 0.4
    q = label_quality(lab, lm, g)
    errs, n_gt = [], 0
    for v in range(2):
        for i in range(4):
            for j in range(5):
                gv = float(g[v, 0, 2 * i + 1, 2 * j + 1])  # nearest-exact: the pixel centre (2i+0.5)·2 → row 2i+1
                if gv > 0:
                    n_gt += 1
                    if lm[v, 0, i, j]: errs.append(abs(float(lab[v, 0, i, j]) - gv))
    assert q["n"] == len(errs) and q["n_gt"] == n_gt
    assert q["abs_mean"] == pytest.approx(sum(errs) / len(errs), rel=1e-5)
    assert q["coverage"] == pytest.approx(len(errs) / n_gt)


def test_feature_write_depth_outputs_roundtrip(tmp_path, scene):
    from mvsnb.crossview import load_depth_outputs
    d = torch.rand(4, 1, 32, 40) + 2; c = torch.rand(4, 1, 32, 40)
    write_depth_outputs(tmp_path / "o", d, c)
    back = load_depth_outputs(scene, tmp_path / "o")
    assert torch.allclose(back["depths"], d) and torch.allclose(back["confs"], c)
    with pytest.raises(InputError, match="exists"): write_depth_outputs(tmp_path / "o", d, c)


@pytest.mark.slow
def test_feature_selftrain_rounds_resume(tmp_path, scene):
    "Two KD rounds on a tiny scene; a re-run skips everything; more rounds continue; an interrupted stage is redone alone."
    base = dict(scene_dir=str(scene), height=32, width=40, steps=2, evaluate=False, check="eval_fusion", check_overrides=LOOSE,
                teacher_params=dict(model="cvp", steps=2))
    run = tmp_path / "run"
    rec = selftrain_rounds(SelfTrainConfig.preset("kdmvs", rounds=1, **base), run, progress=False)
    assert [r["round"] for r in rec["rounds"]] == [0, 1]
    r1 = rec["rounds"][1]
    assert r1["teacher_checkpoint"] == "round_0/teacher/checkpoints/last.pt" and r1["checkpoint"] == "round_1/student/checkpoints/last.pt"
    assert r1["label_folder"] == "round_1/labels/labels_kd" and 0 < r1["label_coverage"] <= 1 and r1["label_error"]["all"]["abs_mean"] > 0
    assert (run / "round_1" / "labels" / "labels_kd" / "manifest.json").is_file() and (run / "round_1" / "done").is_file()
    stamp = {p: p.stat().st_mtime for p in run.rglob("metrics.json")}
    t0 = time.time(); again = selftrain_rounds(SelfTrainConfig.preset("kdmvs", rounds=1, **base), run, progress=False)
    assert time.time() - t0 < 10 and again["rounds"] == rec["rounds"]
    assert {p: p.stat().st_mtime for p in run.rglob("metrics.json")} == stamp  # nothing re-ran
    # round 2 was "interrupted" after its labels: only the student is trained, from the round-1 model's labels run
    cfg2 = SelfTrainConfig.preset("kdmvs", rounds=2, **base)
    selftrain_rounds(SelfTrainConfig.preset("kdmvs", rounds=2, **base), run, progress=False)
    (run / "round_2" / "done").unlink(); (run / "round_2" / "student" / "metrics.json").unlink()
    lab_stamp = (run / "round_2" / "labels" / "metrics.json").stat().st_mtime
    rec2 = selftrain_rounds(cfg2, run, progress=False)
    assert (run / "round_2" / "labels" / "metrics.json").stat().st_mtime == lab_stamp
    assert rec2["rounds"][2]["teacher_checkpoint"] == "round_1/student/checkpoints/last.pt"
    assert _json(run / "round_2" / "student" / "params.json")["resume"] is True  # continued from its last.pt
    assert [r["round"] for r in rounds_table(run)] == [0, 1, 2]


# ---------------------------------------------------------------- the hybrid objective (an mvsnb extension)
def _hybrid_batch(kd: bool=False):
    "A one-sample batch of the tiny scene with pseudo labels (GT + noise) on the left half of the reference view."
    from mvsnb.synthetic import make_scene
    from mvsnb.data import SceneDataset
    it = SceneDataset(make_scene(views=3, seed=0, **SIZE), num_views=3)[0]
    b = {k: (it[k][None] if isinstance(it[k], torch.Tensor) else torch.tensor([float(it[k])])) for k in ("images", "K", "w2c", "depth_min", "depth_max")}
    g = torch.Generator().manual_seed(1)
    lab = torch.zeros(1, 1, *SIZE.values(), dtype=torch.bool); lab[..., : SIZE["width"] // 2] = True
    gt = it["depth_gt"][None]
    b.update(pseudo_depth=torch.where(lab, gt + 0.02 * torch.randn(gt.shape, generator=g), torch.zeros_like(gt)), pseudo_mask=lab)
    if kd: b["pseudo_sigma"] = torch.where(lab, torch.full_like(gt, 0.05), torch.zeros_like(gt))
    return b, lab, gt


@pytest.mark.parametrize("pseudo", ["pseudo_l1", "kd_paper"])
def test_feature_hybrid_weight_zero_is_pseudo_loss(pseudo):
    "λ = 0: the hybrid loss is the pseudo-label loss — same value, same terms, same parameter gradients (bit for bit)."
    from mvsnb.train import build_loss, build_model
    batch, _, _ = _hybrid_batch(kd=pseudo == "kd_paper")
    torch.manual_seed(0); net = build_model("cascade", "tiny")
    res = []
    for loss in (build_loss(pseudo), build_loss("hybrid", dict(pseudo=pseudo, weight=0.0, pixels="unlabelled"))):
        net.zero_grad()
        out = net(batch["images"], batch["K"], batch["w2c"], batch["depth_min"], batch["depth_max"])
        total, terms = loss(out, batch)
        total.backward()
        res.append((total.detach(), {k: float(torch.as_tensor(v).detach()) for k, v in terms.items()}, [p.grad.clone() for p in net.parameters() if p.grad is not None]))
    (t0, terms0, g0), (t1, terms1, g1) = res
    assert torch.equal(t0, t1) and terms0 == terms1 and len(g0) == len(g1) > 0
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    # and λ > 0 does change it (the comparison above can fail)
    net.zero_grad(); out = net(batch["images"], batch["K"], batch["w2c"], batch["depth_min"], batch["depth_max"])
    t2, terms2 = build_loss("hybrid", dict(pseudo=pseudo, weight=0.5))(out, batch)
    assert float(t2.detach()) > float(t0) and {"pseudo", "unsup", "unsup.photo"} <= set(terms2)


def test_feature_hybrid_unlabelled_gradient_avoids_labelled_pixels():
    "pixels='unlabelled': the unsupervised term's gradient is zero at every labelled pixel (per-pixel loop), λ·its gradient elsewhere."
    from mvsnb.train import build_loss
    batch, lab, gt = _hybrid_batch()
    d0 = gt + 0.1 * torch.randn(gt.shape, generator=torch.Generator().manual_seed(2))

    def grad(loss):
        d = d0.clone().requires_grad_(True)
        total, _ = loss({"depth": d, "stages": [{"depth": d}]}, batch)
        total.backward()
        return d.grad[0, 0]

    lam = 0.7
    g_p, g_u = grad(build_loss("pseudo_l1")), grad(build_loss("khot"))
    g_h = grad(build_loss("hybrid", dict(pseudo="pseudo_l1", unsup="khot", weight=lam, pixels="unlabelled")))
    g_all = grad(build_loss("hybrid", dict(pseudo="pseudo_l1", unsup="khot", weight=lam, pixels="all")))
    n_lab_touched = 0
    for i in range(g_h.shape[0]):
        for j in range(g_h.shape[1]):
            if lab[0, 0, i, j]:
                assert float(g_h[i, j]) == float(g_p[i, j]), (i, j)  # the pseudo label alone
                n_lab_touched += float(g_all[i, j]) != float(g_p[i, j])
            else:
                assert float(g_p[i, j]) == 0.0
                assert abs(float(g_h[i, j]) - lam * float(g_u[i, j])) <= 1e-6 * (1 + abs(float(g_u[i, j]))), (i, j)
    assert n_lab_touched > 0.5 * int(lab.sum())  # with pixels='all' the unsupervised term does reach the labelled pixels
    assert float(g_h[~lab[0, 0]].abs().sum()) > 0


def test_feature_hybrid_unlabelled_cuts_every_stage_of_a_cascade():
    "On a real cascade, the unsupervised part of the hybrid sends no gradient into the finest stage's depth or probabilities at labelled pixels."
    from mvsnb.train import build_loss, build_model
    batch, lab, _ = _hybrid_batch()
    torch.manual_seed(0); net = build_model("cascade", "tiny")
    out = net(batch["images"], batch["K"], batch["w2c"], batch["depth_min"], batch["depth_max"])
    st = out["stages"][-1]
    hyb = build_loss("hybrid", dict(pseudo="pseudo_l1", unsup="khot", weight=1.0, pixels="unlabelled"))
    pure = build_loss("pseudo_l1")
    (t_h, _), (t_p, _) = hyb(out, batch), pure(out, batch)
    gd, gp = torch.autograd.grad(t_h - t_p, [st["depth"], st["prob_volume"]], allow_unused=True)
    assert tuple(st["depth"].shape[-2:]) == tuple(lab.shape[-2:])
    assert float(gd[lab].abs().max()) == 0 and float(gd[~lab].abs().max()) > 0
    assert float(gp[lab.expand_as(gp)].abs().max()) == 0


def test_exception_hybrid_bad_values_name_the_field(tmp_path, scene):
    from mvsnb.train import build_loss
    for over, fld in ((dict(pixels="labelled"), "pixels"), (dict(weight=-1.0), "weight"), (dict(weight=float("nan")), "weight"),
                      (dict(unsup="khott"), "unsup"), (dict(pseudo="khot"), "pseudo"), (dict(lam=1), "lam")):
        with pytest.raises(InputError) as e: build_loss("hybrid", over)
        assert e.value.field == fld and f"[{fld}]" in str(e.value)
    for over, fld in ((dict(unsup_pixels="some"), "unsup_pixels"), (dict(unsup_weight=-0.5), "unsup_weight"),
                      (dict(unsup_loss="l2"), "unsup_loss"), (dict(unsup_weight=1.0, loss="khot", labels="spsr"), "loss")):
        with pytest.raises(InputError) as e: SelfTrainConfig.preset("selfsup_cvp", **over)
        assert e.value.field == fld
    assert all(SelfTrainConfig.preset(n).unsup_weight == 0 for n in ("selfsup_cvp", "kdmvs", "kdmvs_release"))  # off in the paper presets
    # the pipeline refuses a bad value before it reads anything or trains
    with pytest.raises(NotebookError, match=r"\[unsup_pixels\]"):
        run_notebook(STUDENT, tmp_path / "s", dict(labels_run=str(tmp_path / "nowhere"), unsup_weight=0.5, unsup_pixels="labelled"))
    assert not (tmp_path / "s" / "checkpoints").exists()
