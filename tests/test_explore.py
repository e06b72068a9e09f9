"""Explorers (mvsnb.explore): query methods on a tiny synthetic scene, and the ipywidgets driven without a browser."""
import json, math, os
os.environ.setdefault("MPLBACKEND", "Agg")
import matplotlib
matplotlib.use("Agg")
import numpy as np
import pytest
import torch
from matplotlib.backend_bases import MouseEvent
from mvsnb.core import InputError, valid_depth
from mvsnb.crossview import CrossViewConfig, cross_view_check
from mvsnb.explore import (CrossViewExplorer, DepthExplorer, ExplorerWidget, mock_cascade_outputs, noisy_depths,
                           stage_pixel, to_grid, tradeoff_figure)
from mvsnb.synthetic import make_scene


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads(); torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine
    yield
    torch.set_num_threads(old)

@pytest.fixture(scope="module")
def scene():
    return make_scene(views=4, height=32, width=40, seed=1)

@pytest.fixture(scope="module")
def cvx(scene):
    depths, confs = noisy_depths(scene.depth, seed=0)
    return CrossViewExplorer(depths, confs, scene.K, scene.w2c, scene.pairs, gt=scene.depth, images=scene.images,
                             cfg=CrossViewConfig(tau_conf=0.3, tau_reproj=1.0, tau_geo=0.01, min_views=2))

@pytest.fixture(scope="module")
def dex(scene):
    return DepthExplorer(scene.images, scene.K, scene.w2c,
                         {"noisy": mock_cascade_outputs(scene.depth, scene.depth_min, scene.depth_max, noise=0.03, seed=1),
                          "clean": mock_cascade_outputs(scene.depth, scene.depth_min, scene.depth_max, noise=0.003, seed=2)},
                         gt=scene.depth)

def _non_increasing(xs): return all(a >= b - 1e-12 for a, b in zip(xs, xs[1:]))

# ---------------------------------------------------------------- CrossViewExplorer queries

@pytest.mark.parametrize("name,values,fixed", [
    ("tau_reproj", [4.0, 2.0, 1.0, 0.5, 0.25, 0.125], dict(tau_geo=0.2)),  # at 32x40 px τ_geo binds first: loosen it
    ("tau_geo", [0.05, 0.02, 0.01, 0.003, 0.001], {}),
    ("min_views", [1, 2, 3], {}),
    ("tau_conf", [0.0, 0.3, 0.6, 0.9], {})])
def test_feature_kept_fraction_monotone(cvx, name, values, fixed):
    kept = [r["kept_fraction"] for r in cvx.sweep(name, values, **fixed)]
    assert _non_increasing(kept), (name, kept)
    assert kept[0] > kept[-1] + 0.02, (name, kept)  # the threshold does something on this scene

def test_feature_label_error_below_input_error(cvx):
    base = cvx.input_error()
    assert base > 0.05  # outliers make the raw input bad
    for th in [dict(), dict(tau_geo=0.05), dict(tau_reproj=4.0, min_views=1), dict(tau_conf=0.0, tau_geo=0.003)]:
        assert cvx.label_error(**th) <= base, th
        for v in range(cvx.V):
            assert cvx.label_error(**th, view=v) <= cvx.input_error(view=v), (th, v)

def test_feature_queries_match_brute_force(cvx, scene):
    "kept_fraction / label_error / input_error against per-pixel Python loops over the check's raw result."
    th = dict(tau_geo=0.02, min_views=2)
    r = cross_view_check(cvx.depths, cvx.confs, scene.K, scene.w2c, scene.pairs, cvx.config(**th))
    fracs, err_sum, err_n, in_sum, in_n = [], 0.0, 0, 0.0, 0
    for v in range(cvx.V):
        kept = valid = 0
        for i in range(scene.depth.shape[2]):
            for j in range(scene.depth.shape[3]):
                d, g = float(cvx.depths[v, 0, i, j]), float(scene.depth[v, 0, i, j])
                valid += d > 0; kept += bool(r.mask[v, 0, i, j])
                if d > 0 and g > 0: in_sum += abs(d - g); in_n += 1
                if r.mask[v, 0, i, j] and g > 0: err_sum += abs(float(r.depth[v, 0, i, j]) - g); err_n += 1
        fracs.append(kept / valid)
    assert cvx.kept_fraction(**th) == pytest.approx(np.mean(fracs), abs=1e-6)
    assert cvx.kept_fraction(**th, view=2) == pytest.approx(fracs[2], abs=1e-6)
    assert cvx.label_error(**th) == pytest.approx(err_sum / err_n, rel=1e-5)
    assert cvx.input_error() == pytest.approx(in_sum / in_n, rel=1e-5)

def test_feature_check_cached_and_faithful(cvx, scene):
    a = cvx.check(tau_reproj=0.75)
    assert cvx.check(tau_reproj=0.75) is a
    ref = cross_view_check(cvx.depths, cvx.confs, scene.K, scene.w2c, scene.pairs,
                           CrossViewConfig(tau_conf=0.3, tau_reproj=0.75, tau_geo=0.01, min_views=2))
    assert torch.equal(a.mask, ref.mask) and torch.equal(a.count, ref.count)

def test_feature_cache_bounded(scene):
    d, c = noisy_depths(scene.depth)
    ex = CrossViewExplorer(d, c, scene.K, scene.w2c, scene.pairs, cache_size=2)
    for t in (0.5, 1.0, 2.0): ex.check(tau_reproj=t)
    assert len(ex._cache) == 2

def test_exception_cross_view(scene):
    d, c = noisy_depths(scene.depth)
    with pytest.raises(InputError, match="no ground truth"):
        CrossViewExplorer(d, c, scene.K, scene.w2c, scene.pairs).label_error()
    with pytest.raises(Exception, match=r"expected shape \(V,1,H,W\)"):
        CrossViewExplorer(d[:, 0], c, scene.K, scene.w2c, scene.pairs)
    ex = CrossViewExplorer(d, None, scene.K, scene.w2c, scene.pairs)
    with pytest.raises(InputError, match="min_views"):  # more than the listed sources
        ex.check(min_views=ex.num_src + 1)
    with pytest.raises(InputError, match="cannot sweep"):
        ex.sweep("tau_nope", [1])

# ---------------------------------------------------------------- DepthExplorer queries

def test_feature_profile_sums_to_one(dex):
    for ck in dex.checkpoints:
        for stage in range(dex.num_stages(ck)):
            for (u, v) in [(0, 0), (17, 11), (39, 31)]:
                hyps, p = dex.profile(2, stage, u, v, ck)
                assert p.shape == hyps.shape and p.ndim == 1
                assert float(p.sum()) == pytest.approx(1.0, abs=1e-5)
                assert (p >= 0).all() and np.all(np.diff(hyps) > 0)

def test_feature_profile_of_a_real_network(scene):
    "Outputs of the (untrained) tiny cascade: the probability volume is a distribution over its hypotheses."
    from mvsnb.train import build_model
    torch.manual_seed(0)
    net = build_model("cascade", "tiny").eval()
    with torch.no_grad():
        outs = [net(*(scene.mvs_batch(v, num_src=2)[k] for k in ("images", "K", "w2c", "depth_min", "depth_max")))
                for v in range(scene.num_views)]
    ex = DepthExplorer(scene.images, scene.K, scene.w2c, outs, gt=scene.depth)
    assert ex.num_stages() == len(outs[0]["stages"])
    for stage in range(ex.num_stages()):
        hyps, p = ex.profile(1, stage, 20, 14)
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-5)
        assert hyps.shape == (outs[1]["stages"][stage]["prob_volume"].shape[1],)
        i, j = stage_pixel(32, 40, *outs[1]["stages"][stage]["depth"].shape[-2:], 20, 14)
        assert ex.depth_at(1, 20, 14, stage) == pytest.approx(float(outs[1]["stages"][stage]["depth"][0, 0, i, j]))

def test_feature_frame_error_brute_force(dex, scene):
    "The frame's error map against a per-pixel loop: |depth − GT at the nearest full-res centre|, NaN without GT."
    for stage in range(dex.num_stages()):
        f = dex.frame(3, stage, "noisy")
        h, w = f["depth"].shape
        for i in range(h):
            for j in range(w):
                gi, gj = round((i + 0.5) * 32 / h - 0.5 + 1e-9), round((j + 0.5) * 40 / w - 0.5 + 1e-9)
                g = float(scene.depth[3, 0, gi, gj])
                if g > 0: assert f["error"][i, j] == pytest.approx(abs(f["depth"][i, j] - g), abs=1e-5)
                else: assert math.isnan(f["error"][i, j])
    assert dex.mean_error(checkpoint="clean") < dex.mean_error(checkpoint="noisy")

def test_feature_to_grid_and_stage_pixel():
    x = torch.arange(12 * 16.).reshape(1, 12, 16)
    assert torch.equal(to_grid(x, 12, 16), x)
    small = to_grid(x, 3, 4)
    for i in range(3):
        for j in range(4):  # block centres 1.5 + 4i → nearest full-res pixel (round half to even never ties here: +1e-9)
            assert small[0, i, j] == x[0, round(4 * i + 1.5 + 1e-9), round(4 * j + 1.5 + 1e-9)]
            assert stage_pixel(12, 16, 3, 4, 4 * j + 1.5, 4 * i + 1.5) == (i, j)

def test_exception_depth_explorer(dex, scene):
    with pytest.raises(InputError, match="view 9 out of range"): dex.frame(9)
    with pytest.raises(InputError, match="stage 3 out of range"): dex.frame(0, 3)
    with pytest.raises(InputError, match="unknown checkpoint"): dex.frame(0, 0, "nope")
    with pytest.raises(InputError, match="outside"): dex.profile(0, 0, 40.0, 3)
    plain = DepthExplorer(scene.images, scene.K, scene.w2c, scene.depth)
    with pytest.raises(InputError, match="no prob_volume"): plain.profile(0, 0, 3, 3)
    with pytest.raises(InputError, match="no ground truth"): plain.error_at(0, 3, 3)
    with pytest.raises(InputError, match="3 outputs given for 4 views"):
        DepthExplorer(scene.images, scene.K, scene.w2c, list(scene.depth[:3]))

# ---------------------------------------------------------------- run folders

def test_feature_from_run_depth_folders(tmp_path, scene):
    from mvsnb.io import write_pfm
    from mvsnb.synthetic import write_scene
    write_scene(scene, tmp_path / "scene")
    written = {}
    for name, noise in (("a", 0.02), ("b", 0.001)):
        d, c = noisy_depths(scene.depth, noise=noise, outlier_frac=0.0, seed=3)
        written[name] = d
        for v in range(scene.num_views):
            write_pfm(tmp_path / "run" / "out" / name / "depth_est" / f"{v:08d}.pfm", d[v, 0].numpy())
        if name == "a":
            for v in range(scene.num_views):
                write_pfm(tmp_path / "run" / "out" / name / "confidence" / f"{v:08d}.pfm", c[v, 0].numpy())
    ex = DepthExplorer.from_run(tmp_path / "run", scene=tmp_path / "scene")
    assert ex.checkpoints == ["out/a", "out/b"]
    np.testing.assert_allclose(ex.frame(2, checkpoint="out/b")["depth"], written["b"][2, 0].numpy())
    assert "conf" in ex.frame(0, checkpoint="out/a") and "conf" not in ex.frame(0, checkpoint="out/b")
    assert ex.mean_error(checkpoint="out/b") < ex.mean_error(checkpoint="out/a")
    (tmp_path / "run" / "out" / "b" / "depth_est" / "00000003.pfm").unlink()
    with pytest.raises(InputError, match="depth map of view 3 missing"):
        DepthExplorer.from_run(tmp_path / "run", scene=tmp_path / "scene")

def test_exception_from_run(tmp_path, scene):
    with pytest.raises(InputError, match="run folder not found"): DepthExplorer.from_run(tmp_path / "missing")
    (tmp_path / "r").mkdir()
    with pytest.raises(InputError, match="cannot tell which scene"): DepthExplorer.from_run(tmp_path / "r")
    with pytest.raises(InputError, match="no depth_est"): DepthExplorer.from_run(tmp_path / "r", scene=scene)
    (tmp_path / "r" / "params.json").write_text("{not json")
    with pytest.raises(InputError, match="invalid JSON"): DepthExplorer.from_run(tmp_path / "r", scene=scene)

@pytest.mark.slow
def test_feature_from_run_checkpoints(tmp_path):
    "A run folder written by mvsnb.train: checkpoints only, so `infer=True` runs each once on the run's scene."
    from mvsnb.data import SceneDataset
    from mvsnb.train import train, train_config
    scene = make_scene(views=3, height=24, width=32, seed=2)
    run = tmp_path / "run"
    train(train_config("tiny_cpu", model="cascade", loss="khot", steps=2, ckpt_every=1, keep_checkpoints=5,
                       run_dir=str(run), progress=False), SceneDataset(scene, num_views=3))
    (run / "params.json").write_text(json.dumps(dict(scene_views=3, height=24, width=32, scene_seed=2, num_views=3)))
    with pytest.raises(InputError, match="infer=True"): DepthExplorer.from_run(run)
    ex = DepthExplorer.from_run(run, infer=True)
    assert ex.checkpoints == ["step_00000001 (step 1)", "step_00000002 (step 2)", "last (step 2)"]
    np.testing.assert_allclose(ex.frame(1, checkpoint=1)["depth"], ex.frame(1, checkpoint=2)["depth"])  # last = step 2
    assert float(ex.profile(0, -1, 5, 5, checkpoint=0)[1].sum()) == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(ex.gt, scene.depth)  # the scene was rebuilt from params.json

# ---------------------------------------------------------------- widgets without a browser

def test_smoke_cross_view_widget(cvx):
    w = cvx.widget(view=1)
    assert isinstance(w, ExplorerWidget) and w.redraws == 1
    assert set(w.controls) == {"view", "tau_conf", "tau_reproj", "tau_geo", "min_views"}
    status, png = w.status.value, w.out.outputs[0]["data"]["image/png"]
    assert f"{cvx.kept_fraction():.1%}" in status
    w.controls["tau_geo"].value = 0.001
    assert w.redraws == 2
    assert w.status.value != status and f"{cvx.kept_fraction(tau_geo=0.001):.1%}" in w.status.value
    assert cvx.kept_fraction(tau_geo=0.001) < cvx.kept_fraction()
    assert w.out.outputs[0]["data"]["image/png"] != png
    assert "τ_geo=0.001" in w.figure._suptitle.get_text()
    w.controls["min_views"].value = 3
    assert f"{cvx.kept_fraction(tau_geo=0.001, min_views=3):.1%}" in w.status.value
    assert w.controls["min_views"].max == cvx.num_src

def test_smoke_depth_widget(dex):
    w = dex.widget(view=0, stage=0, u=16, v=16)
    assert w.values == dict(checkpoint="clean", view=0, stage=0, u=16, v=16)
    n, status = w.redraws, w.status.value
    w.controls["stage"].value = 2
    assert w.redraws == n + 1 and "stage 2" in w.status.value and w.status.value != status
    assert "32×40" in w.figure.axes[1].get_title()
    w.controls["checkpoint"].value = "noisy"
    assert "<b>noisy</b>" in w.status.value
    # a click on the depth map moves the pixel (the handler a click-capable backend would call), with one redraw
    fig = w.figure; ax = fig.axes[1]; fig.canvas.draw()
    x, y = ax.transData.transform((30, 8))
    n = w.redraws
    fig.canvas.callbacks.process("button_press_event", MouseEvent("button_press_event", fig.canvas, x, y, 1))
    assert (w.controls["u"].value, w.controls["v"].value) == (30, 8) and w.redraws == n + 1
    assert f"|error| {dex.error_at(0, 30, 8, 2, 'noisy'):.4g}" in w.status.value
    # a click outside the maps (on the profile axes) changes nothing
    x, y = w.figure.axes[-1].transAxes.transform((0.5, 0.5)); w.figure.canvas.draw()
    w.figure.canvas.callbacks.process("button_press_event", MouseEvent("button_press_event", w.figure.canvas, x, y, 1))
    assert (w.controls["u"].value, w.controls["v"].value) == (30, 8)

def test_smoke_depth_widget_checkpoints_differ_in_stages(scene):
    ex = DepthExplorer(scene.images, scene.K, scene.w2c,
                       {"cascade": mock_cascade_outputs(scene.depth, scene.depth_min, scene.depth_max),
                        "plain": scene.depth * 1.01}, gt=scene.depth)
    w = ex.widget(stage=2, checkpoint="cascade")
    assert w.controls["stage"].max == 2
    n = w.redraws
    w.controls["checkpoint"].value = "plain"
    assert w.redraws == n + 1  # one redraw although the stage slider's range and value changed too
    assert w.controls["stage"].max == 0 and w.controls["stage"].value == 0
    assert "stage 0" in w.status.value and "no confidence" in [a.get_title() for a in w.figure.axes]

def test_smoke_static_figures(cvx, dex):
    f = cvx.figure(view=2, tau_reproj=0.5)
    assert "τ_reproj=0.5 px" in f._suptitle.get_text()
    assert len(dex.figure(1, 1, 3, 4).axes) >= 5
    assert len(tradeoff_figure(cvx, dict(tau_geo=[0.003, 0.03])).axes[0].lines) == 2  # one sweep + the input line
