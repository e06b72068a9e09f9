"""mvsnb.metrics: depth-map metrics worked by hand, KD-tree distances and cloud metrics against brute force,
the vectorised greedy thinning against the literal sequential loop, the voxel thinning against a per-point loop,
evaluation of a written scene (GT against itself, a shifted copy), JSON output and bad inputs."""
import json, math
from pathlib import Path
import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from mvsnb.core import InputError, ShapeError
from mvsnb.io import write_ply
from mvsnb.metrics import (depth_metrics, nn_distances, downsample_greedy, downsample_grid, cloud_metrics,
                           CloudEvalConfig, CLOUD_PRESETS, evaluate_points, evaluate_cloud, perturbed_cloud)


# ------------------------------------------------------------------------------------------ brute-force references
def brute_nn(A, B):
    "Nearest-neighbour distances by numpy broadcasting, in row chunks."
    return np.concatenate([np.sqrt(((A[i:i + 256, None] - B[None]) ** 2).sum(-1)).min(1) for i in range(0, len(A), 256)])


def greedy_loop(P, r, order):
    "The DTU thinning as the public evaluators write it: a sequential loop over the processing order."
    keep = np.ones(len(P), bool)
    for i in order:
        if keep[i]:
            keep[np.sqrt(((P - P[i]) ** 2).sum(1)) <= r] = False
            keep[i] = True
    return keep


def rel_close(a, b, rtol=1e-6):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=0)


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    from mvsnb.synthetic import make_scene, write_scene
    scene = make_scene(views=3, seed=1)
    return write_scene(scene, tmp_path_factory.mktemp("metrics") / "scene"), scene


# ------------------------------------------------------------------------------------------------ depth metrics
def test_feature_depth_metrics_by_hand():
    gt = np.array([[2., 4., 8.], [1., 0., np.nan]])[None, None]
    pred = np.array([[2.5, 3., 8.], [np.inf, 3., 1.]])[None, None]
    m = depth_metrics(pred, gt, thresholds=(0.5, 1.5), depth_interval=0.5, interval_thresholds=(1, 3))
    e = np.array([0.5, 1.0, 0.0])  # pixels with GT 2, 4, 8; GT 1 has an infinite prediction
    assert (m["n"], m["n_mask"], m["n_pred_invalid"], m["empty"]) == (3, 4, 1, False)
    rel_close([m["abs_mean"], m["abs_median"], m["rmse"], m["rel_mean"]],
              [e.mean(), 0.5, math.sqrt((e ** 2).mean()), (0.5 / 2 + 1 / 4 + 0) / 3])
    assert m["within_0.5"] == pytest.approx(25.0)  # |e| < 0.5 strictly: only the exact pixel; the inf one is a miss
    assert m["within_1.5"] == pytest.approx(75.0)
    assert m["within_1_int"] == pytest.approx(25.0) and m["within_3_int"] == pytest.approx(75.0)


def test_feature_depth_metrics_mask_batch_and_torch():
    g = torch.Generator().manual_seed(0)
    gt = 2 + 4 * torch.rand(2, 1, 6, 8, generator=g)
    pred = gt + 0.1 * torch.randn(2, 1, 6, 8, generator=g)
    mask = torch.rand(2, 1, 6, 8, generator=g) > 0.3
    m = depth_metrics(pred, gt, mask, thresholds=(0.05,))
    e = (pred - gt).abs()[mask].double().numpy()
    rel_close([m["abs_mean"], m["within_0.05"]], [e.mean(), 100 * (e < 0.05).mean()])
    assert m["n"] == int(mask.sum())
    # a NaN prediction inside the mask can only lower the score
    pred2 = pred.clone(); pred2[mask] = float("nan")
    m2 = depth_metrics(pred2, gt, mask, thresholds=(0.05,))
    assert m2["n"] == 0 and m2["within_0.05"] == 0 and math.isnan(m2["abs_mean"]) and not m2["empty"]


def test_exception_depth_metrics():
    gt = torch.ones(1, 1, 2, 3)
    m = depth_metrics(gt, gt, torch.zeros(1, 1, 2, 3, dtype=torch.bool), thresholds=(1,))
    assert m["empty"] and math.isnan(m["abs_mean"]) and math.isnan(m["within_1"])
    with pytest.raises(InputError, match=r"\[mask\]"): depth_metrics(gt, gt, torch.zeros(1, 1, 2, 3, dtype=torch.bool), on_empty="raise")
    with pytest.raises(InputError, match="bool"): depth_metrics(gt, gt, torch.ones(1, 1, 2, 3))
    with pytest.raises(ShapeError): depth_metrics(torch.ones(1, 2, 2, 3), torch.ones(1, 2, 2, 3))
    with pytest.raises(InputError, match="differ in shape"): depth_metrics(torch.ones(2, 1, 2, 3), gt)
    with pytest.raises(InputError, match="depth_interval"): depth_metrics(gt, gt, depth_interval=0)


# ------------------------------------------------------------------------------------------ distances and metrics
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_feature_nn_distances_vs_bruteforce(seed):
    rng = np.random.default_rng(seed)
    A, B = rng.random((700, 3)) * [2, 1, 1], rng.random((500, 3)) * [1, 1, 0.1]
    ref = brute_nn(A, B)
    rel_close(nn_distances(A, B), ref)
    rel_close(nn_distances(A, cKDTree(B)), ref)
    d = nn_distances(A, B, max_dist=0.3)
    rel_close(d[ref <= 0.3], ref[ref <= 0.3]); assert np.isinf(d[ref > 0.3]).all()
    # float32 input and torch input give the float64 answer of the same numbers
    rel_close(nn_distances(torch.from_numpy(A), B), ref)


def test_feature_nn_distances_sorted_path():
    "Above 50k queries the queries are issued in spatial order: the answer must come back in the caller's order."
    rng = np.random.default_rng(3)
    A, B = rng.random((60_000, 3)), rng.random((400, 3))
    d = nn_distances(A, B)
    idx = rng.choice(len(A), 500, replace=False)
    rel_close(d[idx], brute_nn(A[idx], B))


@pytest.mark.parametrize("cap", ["exclude", "clip"])
def test_feature_cloud_metrics_vs_bruteforce(cap):
    rng = np.random.default_rng(5)
    A, B = rng.random((600, 3)), rng.random((450, 3)) * [1, 1, 0.5] + [0.2, 0, 0]
    ev = rng.random(600) < 0.6
    da, dc = brute_nn(A[ev], B), brute_nn(B, A)
    tau, cmax = 0.04, 0.07
    m = cloud_metrics(A, B, tau, cmax, pred_eval=ev, cap=cap)
    if cap == "exclude": acc, comp = da[da < cmax].mean(), dc[dc < cmax].mean()
    else: acc, comp = np.minimum(da, cmax).mean(), np.minimum(dc, cmax).mean()
    P, R = (da < tau).mean(), (dc < tau).mean()
    rel_close([m["accuracy"], m["completeness"], m["overall"], m["precision"], m["recall"], m["fscore"]],
              [acc, comp, (acc + comp) / 2, P, R, 2 * P * R / (P + R)])
    rel_close([m["acc_inlier_frac"], m["comp_inlier_frac"]], [(da < cmax).mean(), (dc < cmax).mean()])
    assert (m["n_pred"], m["n_pred_eval"], m["n_gt"]) == (600, int(ev.sum()), 450)


def test_feature_fscore_crafted():
    # GT: a 4x4 grid of spacing 1 on z=0; prediction: 8 of those points exactly, 4 points 0.5 above, 4 far away
    gx, gy = np.meshgrid(np.arange(4.), np.arange(4.))
    G = np.c_[gx.ravel(), gy.ravel(), np.zeros(16)]
    P = np.r_[G[:8], G[8:12] + [0, 0, 0.5], G[12:] + [0, 0, 10]]
    m = cloud_metrics(P, G, threshold=0.25, max_dist=5)
    # precision: 8 of 16 prediction points within 0.25; recall: GT rows 0-1 matched exactly, row 2 at 0.5, row 3 at 1
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)
    assert m["fscore"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx((8 * 0 + 4 * 0.5) / 12)  # the 4 far points (10 > 5) are excluded
    # completeness: row 2 is 0.5 from the raised points, row 3 is sqrt(1 + 0.25) from them (the far points are 10 away)
    assert m["completeness"] == pytest.approx((8 * 0 + 4 * 0.5 + 4 * math.sqrt(1.25)) / 16)
    m2 = cloud_metrics(P, G, threshold=0.6, max_dist=5)
    assert m2["precision"] == pytest.approx(12 / 16) and m2["recall"] == pytest.approx(12 / 16)
    # nothing within τ: F = 0 (not NaN)
    assert cloud_metrics(G + [0, 0, 3], G, threshold=0.1)["fscore"] == 0.0


def test_exception_cloud_metrics():
    G = np.random.default_rng(0).random((10, 3))
    for bad, what in ((dict(pred=np.zeros((0, 3))), "empty"), (dict(gt=np.zeros((0, 3))), "empty"),
                      (dict(cap="mean"), "cap"), (dict(threshold=0), "threshold"), (dict(pred_eval=np.ones(3, bool)), "pred_eval")):
        kw = dict(pred=G, gt=G, threshold=0.1) | bad
        with pytest.raises(InputError, match=what): cloud_metrics(**kw)
    bad = G.copy(); bad[3, 1] = np.nan
    with pytest.raises(InputError, match="non-finite"): cloud_metrics(bad, G, 0.1)
    with pytest.raises(ShapeError): nn_distances(G[:, :2], G)


# ---------------------------------------------------------------------------------------------------- thinning
@pytest.mark.parametrize("n,r", [(50, 0.3), (400, 0.08), (2000, 0.03), (2000, 0.2)])
def test_feature_greedy_equals_literal_loop(n, r):
    rng = np.random.default_rng(n)
    P = rng.random((n, 3)) * [1, 1, 0.2]
    orders = {"random": rng.permutation(n), "input": np.arange(n), "sorted": np.argsort(P[:, 0] + 0.1 * P[:, 1])}
    for name, order in orders.items():
        got = downsample_greedy(P, r, order, first_block=max(n // 7, 1))
        np.testing.assert_array_equal(got, greedy_loop(P, r, order), err_msg=name)
    np.testing.assert_array_equal(downsample_greedy(P, r, "input"), greedy_loop(P, r, np.arange(n)))
    np.testing.assert_array_equal(downsample_greedy(P, r, seed=7), greedy_loop(P, r, np.random.default_rng(7).permutation(n)))


def test_feature_greedy_realistic_cloud_vs_loop():
    "A clustered surface cloud with many neighbours per point and several blocks."
    rng = np.random.default_rng(11)
    G = np.c_[rng.random((300, 2)), np.zeros(300)]
    Nrm = np.tile([0., 0, 1], (300, 1))
    P = perturbed_cloud(G, Nrm, 6000, noise=0.003, spread=0.02, holes=2, hole_radius=0.1, outliers=0.02, seed=2)
    order = rng.permutation(len(P))
    kept = downsample_greedy(P, 0.02, order, first_block=256)
    np.testing.assert_array_equal(kept, greedy_loop(P, 0.02, order))
    Q = P[kept]
    assert cKDTree(Q).query(Q, k=2)[0][:, 1].min() > 0.02  # kept points are more than r apart
    assert cKDTree(Q).query(P)[0].max() <= 0.02  # every point is within r of a kept one (maximal)


def test_feature_greedy_edge_cases():
    D = np.repeat(np.random.default_rng(0).random((6, 3)), 4, axis=0)  # exact duplicates
    np.testing.assert_array_equal(downsample_greedy(D, 0.0, "input"), greedy_loop(D, 0.0, np.arange(24)))
    assert downsample_greedy(D, 0.0).sum() == 6
    assert downsample_greedy(np.zeros((1, 3)), 1.0).tolist() == [True]
    assert downsample_greedy(np.zeros((0, 3)), 1.0).shape == (0,)
    assert downsample_greedy(np.random.default_rng(0).random((10, 3)) * 100, 1e-3).all()
    with pytest.raises(InputError, match="permutation"): downsample_greedy(D, 0.1, order=np.arange(23))
    with pytest.raises(InputError, match="order"): downsample_greedy(D, 0.1, order="shuffled")
    with pytest.raises(InputError, match="radius"): downsample_greedy(D, -0.1)


def test_feature_grid_one_point_per_voxel():
    rng = np.random.default_rng(4)
    P = rng.random((3000, 3)) * [1, 1, 0.1]
    v = 0.07
    k = downsample_grid(P, v, seed=1)
    cells = [tuple(c) for c in np.floor((P - P.min(0)) / v).astype(int)]
    kept_cells = [cells[i] for i in np.flatnonzero(k)]
    assert len(set(kept_cells)) == len(kept_cells) == len(set(cells))  # exactly one kept point per occupied voxel
    np.testing.assert_array_equal(k, downsample_grid(P, v, seed=1))  # deterministic for a seed
    assert not np.array_equal(k, downsample_grid(P, v, seed=2))
    assert downsample_grid(np.zeros((0, 3)), 1.0).shape == (0,)
    with pytest.raises(InputError, match="voxel"): downsample_grid(P, 0)


# ------------------------------------------------------------------------------------------- scene evaluation
def test_feature_gt_against_itself(scene_dir, tmp_path):
    sdir, scene = scene_dir
    write_ply(tmp_path / "gt.ply", scene.points.numpy())
    for ds in ("greedy", "grid", "none"):
        m = evaluate_cloud(tmp_path / "gt.ply", sdir, downsample=ds, out_json=tmp_path / f"{ds}.json")
        assert (m["accuracy"], m["completeness"], m["overall"], m["fscore"]) == (0.0, 0.0, 0.0, 1.0), ds
        assert m["obs_mask"] and m["n_pred_eval"] == m["n_pred_down"]
        saved = json.loads((tmp_path / f"{ds}.json").read_text())
        assert saved["fscore"] == 1.0 and saved["downsample"] == ds and saved["scene"] == str(sdir)


@pytest.mark.parametrize("direction", [(0, 0, 1), (1, 1, 0), (0.3, -0.5, 0.8)])
def test_feature_shifted_copy_gives_the_shift(scene_dir, direction):
    "δ < density/2: greedy thinning keeps the same points of both clouds, so every distance is exactly δ."
    _, scene = scene_dir
    G = scene.points.double().numpy()
    cfg = CloudEvalConfig(density=0.02, max_dist=0.2, threshold=0.05)
    delta = 0.4 * 0.02 * np.asarray(direction, float) / np.linalg.norm(direction)
    m = evaluate_points(G + delta, G, None, cfg)
    assert m["accuracy"] == pytest.approx(0.4 * 0.02, rel=1e-9) and m["completeness"] == pytest.approx(0.4 * 0.02, rel=1e-9)
    assert m["fscore"] == 1.0
    # a shift beyond τ: no distance exceeds it, and points off vertical surfaces fall outside τ
    far = evaluate_points(G + [0, 0, 0.1], G, None, cfg)
    assert far["accuracy"] <= 0.1 + 1e-9 and far["precision"] < 0.9 and far["fscore"] < 0.9


def test_feature_observation_mask_and_box(scene_dir):
    sdir, scene = scene_dir
    G = scene.points.double().numpy()
    obs = scene.obs_mask
    far = np.array([[50., 50, 50]])  # outside the box: dropped before anything else
    unobserved = obs["origin"] + (np.argwhere(~obs["mask"])[0] + 0.5) * obs["voxel_size"]  # in the box, not observed
    m = evaluate_points(np.r_[G, far, unobserved[None]], G, obs, CloudEvalConfig(downsample="none"))
    assert m["n_pred_in_box"] == len(G) + 1 and m["n_pred_eval"] == len(G)  # the corner point is not counted
    assert m["accuracy"] == 0.0 and m["precision"] == 1.0
    # without a mask the GT box padded by the cap is used, and every point in it counts
    m2 = evaluate_points(np.r_[G, far], G, None, CloudEvalConfig(downsample="none"))
    assert not m2["obs_mask"] and m2["n_pred_in_box"] == len(G)


def test_feature_realistic_prediction_and_presets(scene_dir, tmp_path):
    sdir, scene = scene_dir
    G, N = scene.points.double().numpy(), scene.point_normals.double().numpy()
    pred = perturbed_cloud(G, N, 40_000, noise=0.01, spread=0.02, holes=4, hole_radius=0.15, outliers=0.01,
                           bbox=scene.obs_mask["bbox"], seed=0)
    write_ply(tmp_path / "pred.ply", pred.astype(np.float32))
    m = evaluate_cloud(tmp_path / "pred.ply", sdir)
    assert 0.004 < m["accuracy"] < 0.03 and 0.002 < m["completeness"] < 0.03 and 0.5 < m["fscore"] < 1
    assert m["density"] == pytest.approx(0.002 * m["bbox_diag"]) and m["downsample"] == "greedy"
    # absolute values win over relative ones; a bigger τ raises the F-score
    m_abs = evaluate_cloud(tmp_path / "pred.ply", sdir, threshold=0.08, density=0.015, max_dist=0.3)
    assert (m_abs["threshold"], m_abs["density"], m_abs["max_dist"]) == (0.08, 0.015, 0.3) and m_abs["fscore"] > m["fscore"]
    # the DTU preset: 0.2 / 20 scene units, the reference used as released
    assert CLOUD_PRESETS["dtu"].density == 0.2 and CLOUD_PRESETS["dtu"].max_dist == 20.0
    m_dtu = evaluate_cloud(tmp_path / "pred.ply", sdir, preset="dtu")
    assert m_dtu["n_gt_down"] == m_dtu["n_gt_input"] and m_dtu["density"] == 0.2
    # greedy with another random order: a small change; the voxel approximation: a change, reported not hidden
    m1 = evaluate_cloud(tmp_path / "pred.ply", sdir, seed=1)
    assert abs(m1["accuracy"] / m["accuracy"] - 1) < 0.02 and abs(m1["completeness"] / m["completeness"] - 1) < 0.02
    mg = evaluate_cloud(tmp_path / "pred.ply", sdir, downsample="grid")
    assert abs(mg["accuracy"] / m["accuracy"] - 1) < 0.15


def test_exception_evaluate_cloud(scene_dir, tmp_path):
    sdir, scene = scene_dir
    G = scene.points.numpy()
    write_ply(tmp_path / "empty.ply", np.zeros((0, 3), np.float32))
    with pytest.raises(InputError) as e: evaluate_cloud(tmp_path / "empty.ply", sdir)
    assert Path(e.value.path).name == "empty.ply" and "no points" in str(e.value)
    with pytest.raises(InputError, match="PLY file not found"): evaluate_cloud(tmp_path / "missing.ply", sdir)
    # one point and ten points: valid numbers, tiny recall
    for k in (1, 10):
        write_ply(tmp_path / f"p{k}.ply", G[::997][:k])
        m = evaluate_cloud(tmp_path / f"p{k}.ply", sdir)
        assert m["n_pred_down"] == k and m["precision"] == 1.0 and m["accuracy"] < m["density"] and m["recall"] < 0.01
    # all points outside the box
    write_ply(tmp_path / "far.ply", G[:5] + 100)
    with pytest.raises(InputError) as e: evaluate_cloud(tmp_path / "far.ply", sdir)
    assert Path(e.value.path).name == "far.ply" and "box" in str(e.value)
    # missing ground truth: names the file
    bare = tmp_path / "bare"; (bare / "gt").mkdir(parents=True)
    with pytest.raises(InputError) as e: evaluate_cloud(tmp_path / "p10.ply", bare)
    assert e.value.path == bare / "gt" / "points.ply"
    with pytest.raises(InputError, match="scene folder"): evaluate_cloud(tmp_path / "p10.ply", tmp_path / "nope")
    with pytest.raises(InputError, match="downsample"): evaluate_cloud(tmp_path / "p10.ply", sdir, downsample="voxel")
    with pytest.raises(InputError, match="preset"): evaluate_cloud(tmp_path / "p10.ply", sdir, preset="tnt")
    with pytest.raises(InputError, match="unknown evaluation option"): evaluate_cloud(tmp_path / "p10.ply", sdir, densty=0.1)


def test_feature_missing_obs_mask_falls_back(scene_dir, tmp_path):
    import shutil
    sdir, scene = scene_dir
    copy = tmp_path / "scene"; shutil.copytree(sdir, copy); (copy / "gt" / "obs_mask.npz").unlink()
    write_ply(tmp_path / "gt.ply", scene.points.numpy())
    m = evaluate_cloud(tmp_path / "gt.ply", copy)
    assert not m["obs_mask"] and m["fscore"] == 1.0 and m["accuracy"] == 0.0
