"""Screened-Poisson pseudo labels (mvsnb.spsr): normals, Poisson, rendering against known meshes, folders, errors."""
import json, math
from pathlib import Path
import numpy as np
import pytest
import torch

pytest.importorskip("open3d")
pytestmark = pytest.mark.open3d

from mvsnb.core import InputError, ShapeError
from mvsnb.camera import look_at, intrinsics, camera_centers, unproject
from mvsnb.spsr import (SPSRConfig, estimate_normals, orient_normals, poisson_mesh, render_pseudo_depth, spsr_labels,
                        spsr_mesh, run_spsr_labels, write_pseudo_labels)

torch.set_num_threads(1)
SMALL = SPSRConfig.preset("cpu_small", depth=6)


def _sphere(n=3000, seed=0, center=(0.1, -0.2, 0.3)):
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=1)
    return torch.tensor(center) + u, u


def _axis_cameras(dist=4.0, center=(0., 0., 0.)):
    c = torch.tensor(center)
    dirs = torch.cat([torch.eye(3), -torch.eye(3)])
    ups = torch.tensor([[0., 0, 1], [0, 0, 1], [0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 1, 0]])
    return torch.stack([look_at(c + dist * d, c, up) for d, up in zip(dirs, ups)])


def _ray_triangle(o, d, a, b, c):
    "Möller–Trumbore in float64: ray parameter t of the hit, or None."
    e1, e2 = b - a, c - a
    p = np.cross(d, e2); det = e1 @ p
    if abs(det) < 1e-12: return None
    inv = 1.0 / det; s = o - a
    u = (s @ p) * inv
    if u < -1e-9 or u > 1 + 1e-9: return None
    q = np.cross(s, e1); v = (d @ q) * inv
    if v < -1e-9 or u + v > 1 + 1e-9: return None
    return (e2 @ q) * inv


def _brute_depth(V, F, K, w2c, H, W, znear=0.0, zfar=None):
    "Per-pixel loop: nearest hit with camera-frame z in [znear, zfar] of a ray through each pixel centre."
    V, F, K, w2c = (np.asarray(x, dtype=np.float64) for x in (V, F, K, w2c))
    R, t = w2c[:3, :3], w2c[:3, 3]
    Vc = V @ R.T + t  # camera frame
    Ki = np.linalg.inv(K)
    out = np.zeros((H, W))
    for i in range(H):
        for j in range(W):
            d = Ki @ np.array([j, i, 1.0])  # z = 1: t is the z-depth
            best = None
            for f in F.astype(int):
                hit = _ray_triangle(np.zeros(3), d, *Vc[f])
                if hit is not None and hit >= znear and (best is None or hit < best): best = hit
            if best is not None and (zfar is None or best <= zfar): out[i, j] = best
    return torch.from_numpy(out).float()


def _box(lo, hi):
    lo, hi = torch.tensor(lo), torch.tensor(hi)
    v = torch.stack([torch.where(torch.tensor([(i >> k) & 1 for k in range(3)]).bool(), hi, lo) for i in range(8)])
    f = torch.tensor([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                      [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
    return v, f


# ---------------------------------------------------------------- rendering against known meshes
def test_feature_render_known_meshes_vs_brute_force():
    "A tilted plane behind an off-axis cube, seen from a rotated camera: the ray caster equals a per-pixel loop."
    H, W = 12, 16
    K = intrinsics(14., 14., 7.5, 5.5)
    bv, bf = _box([0.1, 0.05, 1.6], [0.6, 0.5, 2.1])
    pv = torch.tensor([[-4., -4, 3.0], [4, -4, 3.4], [4, 4, 3.6], [-4, 4, 3.2]])
    pv[:, 2] = 3.0 + 0.05 * pv[:, 0] + 0.08 * pv[:, 1]  # a tilted plane z = 3 + 0.05x + 0.08y
    V = torch.cat([bv, pv]); F = torch.cat([bf, torch.tensor([[8, 9, 10], [8, 10, 11]])])
    w2c = look_at(torch.tensor([-0.3, 0.2, -0.2]), torch.tensor([0.2, 0.1, 3.0]))
    for znear, zfar in ((0.0, None), (1.9, None), (0.0, 2.0), (1.7, 3.1)):
        got = render_pseudo_depth(V, F, K[None], w2c[None], H, W, znear=znear, zfar=zfar)[0, 0]
        ref = _brute_depth(V, F, K, w2c, H, W, znear, zfar)
        agree = (got > 0) == (ref > 0)
        assert agree.float().mean() >= 0.99, (znear, zfar)  # a pixel ray through a shared edge may go either way
        both = (got > 0) & (ref > 0)
        torch.testing.assert_close(got[both], ref[both], rtol=1e-4, atol=1e-5)


def test_feature_render_z_depth_not_ray_length_and_axes():
    "Fronto-parallel square at z=3: exactly 3 at every pixel (ray length grows to the corners); +x is right, +y down."
    K = intrinsics(20., 20., 9.5, 7.5)
    sq = torch.tensor([[-9., -9, 3], [9, -9, 3], [9, 9, 3], [-9, 9, 3]]); f2 = torch.tensor([[0, 1, 2], [0, 2, 3]])
    d = render_pseudo_depth(sq, f2, K[None], torch.eye(4)[None], 16, 20)
    torch.testing.assert_close(d, torch.full_like(d, 3.0), rtol=1e-6, atol=1e-6)
    v, f = _box([0.3, 0.3, 2.0], [0.6, 0.6, 2.2])  # right of and below the axis
    d = render_pseudo_depth(v, f, K[None], torch.eye(4)[None], 16, 20)[0, 0]
    r, c = (d > 0).nonzero(as_tuple=True)
    assert len(r) > 0 and c.min() > 9.5 and r.min() > 7.5
    v2 = v.clone(); v2[:, 0] *= -1; v2[:, 1] *= -1  # mirrored: left and above
    d2 = render_pseudo_depth(v2, f, K[None], torch.eye(4)[None], 16, 20)[0, 0]
    r2, c2 = (d2 > 0).nonzero(as_tuple=True)
    assert c2.max() < 9.5 and r2.max() < 7.5


def test_feature_render_per_view_zfar():
    K = intrinsics(20., 20., 9.5, 7.5).expand(2, 3, 3)
    sq = torch.tensor([[-9., -9, 3], [9, -9, 3], [9, 9, 3], [-9, 9, 3]]); f2 = torch.tensor([[0, 1, 2], [0, 2, 3]])
    d = render_pseudo_depth(sq, f2, K, torch.eye(4).expand(2, 4, 4), 16, 20, zfar=torch.tensor([2.5, 3.5]))
    assert (d[0] == 0).all() and (d[1] == 3).all()
    with pytest.raises(ShapeError, match="zfar"):
        render_pseudo_depth(sq, f2, K, torch.eye(4).expand(2, 4, 4), 16, 20, zfar=torch.tensor([1., 2, 3]))


# ---------------------------------------------------------------- normals and Poisson
def test_feature_orient_flips_inward_normals():
    pts, u = _sphere(500)
    w2c = _axis_cameras(center=(0.1, -0.2, 0.3))
    out = orient_normals(pts, -u, w2c)
    assert ((out * u).sum(1) > 0).all()
    assert torch.equal(orient_normals(pts, u, w2c), u)  # already outward: untouched


def test_feature_orient_nearest_camera_in_front_vs_loop():
    "Nearest camera among those with the point in front (else nearest overall), checked point by point."
    g = torch.Generator().manual_seed(3)
    pts = torch.randn(60, 3, generator=g) * 2
    nrm = torch.nn.functional.normalize(torch.randn(60, 3, generator=g), dim=1)
    w2c = torch.stack([look_at(torch.tensor([4., 0, 0]), torch.zeros(3)), look_at(torch.tensor([0., 5, 0]), torch.zeros(3)),
                       look_at(torch.tensor([0., 0, -3]), torch.tensor([0., 0, -10]), torch.tensor([0., 1, 0]))])  # the last one looks away
    C = camera_centers(w2c)
    out = orient_normals(pts, nrm, w2c)
    for k in range(60):
        z = [float(w2c[v, 2, :3] @ pts[k] + w2c[v, 2, 3]) for v in range(3)]
        dist = [float((C[v] - pts[k]).norm()) for v in range(3)]
        front = [v for v in range(3) if z[v] > 0]
        cam = min(front, key=lambda v: dist[v]) if front else min(range(3), key=lambda v: dist[v])
        expect = nrm[k] if float(nrm[k] @ (C[cam] - pts[k])) >= 0 else -nrm[k]
        assert torch.equal(out[k], expect), k
    ids = torch.randint(0, 3, (60,), generator=g)
    out2 = orient_normals(pts, nrm, w2c, view_ids=ids)
    assert (((C[ids] - pts) * out2).sum(1) >= 0).all()


def test_feature_estimated_normals_on_a_plane():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(400, 2, generator=g) * 2 - 1
    pts = torch.cat([xy, 0.3 * xy[:, :1] + 2.0], 1)
    n = estimate_normals(pts, radius=None, max_nn=12)
    true = torch.nn.functional.normalize(torch.tensor([-0.3, 0.0, 1.0]), dim=0)
    assert (n @ true).abs().min() > 0.999


def test_feature_poisson_sphere_renders_analytic_depth():
    center = (0.1, -0.2, 0.3)
    pts, u = _sphere(3000, center=center)
    v, f = poisson_mesh(pts, u, SPSRConfig.preset("cpu_small", depth=6, density_quantile=0.0))
    r = (v - torch.tensor(center)).norm(dim=1)
    assert (r - 1).abs().max() < 0.01
    K = intrinsics(30., 30., 15.5, 11.5)
    w2c = _axis_cameras(center=center)[:2]
    d = render_pseudo_depth(v, f, K.expand(2, 3, 3), w2c, 24, 32)
    for k in range(2):  # analytic sphere depth, pixel by pixel
        c = (w2c[k, :3, :3] @ torch.tensor(center) + w2c[k, :3, 3]).double()
        ref = torch.zeros(24, 32, dtype=torch.float64)
        Ki = torch.linalg.inv(K.double())
        for i in range(24):
            for j in range(32):
                ray = Ki @ torch.tensor([j, i, 1.0], dtype=torch.float64)
                a, b, cc = ray @ ray, -2 * (ray @ c), c @ c - 1.0
                disc = b * b - 4 * a * cc
                if disc > 0: ref[i, j] = (-b - disc.sqrt()) / (2 * a)
        both = (ref > 0) & (d[k, 0] > 0)
        assert both.sum() >= 0.95 * (ref > 0).sum()
        rel = (d[k, 0][both] - ref[both].float()).abs() / ref[both].float()
        assert (rel < 0.01).float().mean() > 0.97 and rel.median() < 0.002


def test_feature_density_trimming_and_crop_remove_vertices():
    pts, u = _sphere(2000)
    half = pts[:, 2] > 0.3  # an open hemisphere: Poisson closes it with low-density surface
    v0, _ = poisson_mesh(pts[half], u[half], SPSRConfig.preset("cpu_small", depth=6, density_quantile=0.0, crop_margin=None))
    v1, _ = poisson_mesh(pts[half], u[half], SPSRConfig.preset("cpu_small", depth=6, density_quantile=0.2, crop_margin=None))
    v2, _ = poisson_mesh(pts[half], u[half], SPSRConfig.preset("cpu_small", depth=6, density_quantile=0.0, crop_margin=0.0))
    assert len(v1) < len(v0) and len(v2) < len(v0)
    lo = pts[half].min(0).values
    assert (v2 >= lo - 1e-5).all() and (v0[:, 2] < lo[2] - 0.05).any()


def test_feature_gt_scene_labels_rerender_true_depth():
    "GT depth → fusion → SPSR labels: the labels re-render the true depth on most pixels."
    from mvsnb.synthetic import make_scene
    from mvsnb.crossview import cross_view_check
    from mvsnb.fusion import fused_points
    scene = make_scene(views=4, height=40, width=48, seed=3)
    res = cross_view_check(scene.depth, None, scene.K, scene.w2c, scene.pairs, "eval_fusion")
    pts, cols, _, view = fused_points(res, scene.images, scene.K, scene.w2c)
    depth, mask = spsr_labels(pts, cols, view, scene.K, scene.w2c, 40, 48, SMALL)
    assert depth.shape == (4, 1, 40, 48) and mask.dtype == torch.bool and torch.equal(mask, depth > 0)
    gt_ok = scene.valid & (scene.depth > 0)
    both = gt_ok & mask
    rel = (depth - scene.depth).abs()[both] / scene.depth[both]
    assert both.sum() > 0.8 * gt_ok.sum()
    assert (rel < 0.01).float().mean() > 0.85
    # without view ids (nearest camera) the labels are as good
    d2, m2 = spsr_labels(pts, None, None, scene.K, scene.w2c, 40, 48, SMALL)
    both2 = gt_ok & m2
    assert ((d2 - scene.depth).abs()[both2] / scene.depth[both2] < 0.01).float().mean() > 0.85


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("n", [0, 1, 10])
def test_exception_too_few_points(n):
    pts, u = _sphere(50)
    K = intrinsics(30., 30., 15.5, 11.5).expand(2, 3, 3)
    w2c = _axis_cameras()[:2]
    with pytest.raises(InputError, match=rf"at least 100 points \(min_points\), got {n}\b"):
        spsr_labels(pts[:n], None, None, K, w2c, 24, 32, SMALL)
    with pytest.raises(InputError, match=rf"got {n}\b"):
        poisson_mesh(pts[:n], u[:n], SMALL)


def test_exception_bad_inputs():
    pts, u = _sphere(300)
    w2c = _axis_cameras()
    with pytest.raises(ShapeError, match="normals"): poisson_mesh(pts, u[:10], SMALL)
    with pytest.raises(ShapeError, match="points"): poisson_mesh(pts[:, :2], u, SMALL)
    bad = pts.clone(); bad[5, 0] = float("inf")
    with pytest.raises(InputError, match="NaN/inf"): poisson_mesh(bad, u, SMALL)
    with pytest.raises(InputError, match="view ids"): orient_normals(pts, u, w2c, view_ids=torch.full((300,), 6))
    with pytest.raises(InputError, match="normals='given'"): spsr_mesh(pts, w2c, SPSRConfig.preset("cpu_small", normals="given"))
    with pytest.raises(InputError, match="depth"): SPSRConfig(depth=0)
    with pytest.raises(InputError, match="bbox"): SPSRConfig(bbox=[[0, 0, 0], [1, -1, 1]])
    with pytest.raises(InputError, match="no triangles"):  # a crop box away from the surface leaves nothing
        poisson_mesh(pts, u, SPSRConfig.preset("cpu_small", depth=5, bbox=[[10, 10, 10], [11, 11, 11]]))


# ---------------------------------------------------------------- folders
@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    from mvsnb.synthetic import make_scene, write_scene
    scene = make_scene(views=4, height=32, width=40, seed=4)
    return write_scene(scene, tmp_path_factory.mktemp("spsr") / "scene"), scene


def _check_folder(out, V, H, W):
    from mvsnb.io import read_pfm, read_image
    assert sorted(p.name for p in out.iterdir()) == ["depth", "manifest.json", "mask"]
    man = json.loads((out / "manifest.json").read_text())
    assert man["method"] == "spsr" and man["num_views"] == V and (man["height"], man["width"]) == (H, W)
    for v in range(V):
        d = read_pfm(out / "depth" / f"{v:08d}.pfm"); m = read_image(out / "mask" / f"{v:08d}.png", raw=True) > 0
        assert d.shape == (H, W) and np.array_equal(m, d > 0)
    return man


def test_smoke_run_spsr_labels_from_ply(scene_dir, tmp_path):
    from mvsnb.io import write_ply
    root, scene = scene_dir
    g = torch.Generator().manual_seed(0)
    pts = scene.points[torch.randperm(len(scene.points), generator=g)[:6000]]
    write_ply(tmp_path / "fused.ply", pts.numpy())
    man = run_spsr_labels(root, tmp_path / "fused.ply", tmp_path / "labels", SMALL, height=16, width=20)
    man = _check_folder(tmp_path / "labels", 4, 16, 20)
    assert man["source_kind"] == "ply" and man["coverage_mean"] > 0.7
    assert "fused.ply" in "".join(man["sources"]) and any(k.startswith("cams/") for k in man["sources"])
    assert man["config"]["depth"] == 6
    with pytest.raises(InputError, match="output folder exists"):
        run_spsr_labels(root, tmp_path / "fused.ply", tmp_path / "labels", SMALL)
    write_ply(tmp_path / "tiny.ply", pts[:10].numpy())
    with pytest.raises(InputError, match=r"at least 100 points \(min_points\), got 10"):
        run_spsr_labels(root, tmp_path / "tiny.ply", tmp_path / "l2", SMALL)
    assert not (tmp_path / "l2").exists()
    with pytest.raises(InputError, match="needs a PLY with normals"):
        run_spsr_labels(root, tmp_path / "fused.ply", tmp_path / "l3", SPSRConfig.preset("cpu_small", normals="given"))


def test_smoke_run_spsr_labels_from_checked_depth(scene_dir, tmp_path):
    "run_check output (checked_depth/ + mask/) → labels close to the true depth."
    from mvsnb.io import write_pfm, read_pfm
    from mvsnb.crossview import run_check, CrossViewConfig
    root, scene = scene_dir
    for v in range(4): write_pfm(tmp_path / "out" / "depth_est" / f"{v:08d}.pfm", scene.depth[v, 0].numpy())
    run_check(root, tmp_path / "out", tmp_path / "checked", CrossViewConfig(tau_conf=0.0, min_views=2))
    man = run_spsr_labels(root, tmp_path / "checked", tmp_path / "labels", SMALL)
    _check_folder(tmp_path / "labels", 4, 32, 40)
    assert man["source_kind"] == "checked_depth"
    lab = torch.stack([torch.from_numpy(read_pfm(tmp_path / "labels" / "depth" / f"{v:08d}.pfm")) for v in range(4)])[:, None]
    both = (lab > 0) & scene.valid
    assert both.sum() > 0.8 * scene.valid.sum()
    assert ((lab - scene.depth).abs()[both] / scene.depth[both] < 0.01).float().mean() > 0.85
    # raw outputs (depth_est/) go through the check and fusion themselves
    with pytest.warns(UserWarning, match="no confidence/ folder"):
        man2 = run_spsr_labels(root, tmp_path / "out", tmp_path / "labels2", SPSRConfig.preset("cpu_small", depth=6, check="eval_fusion"))
    assert man2["source_kind"] == "depth_est" and man2["coverage_mean"] > 0.7
    with pytest.raises(InputError, match="source must be"):
        run_spsr_labels(root, tmp_path, tmp_path / "labels3", SMALL)


def test_feature_depth_range_clipping(scene_dir, tmp_path):
    from mvsnb.io import write_ply, read_cam_txt, read_pfm
    root, scene = scene_dir
    write_ply(tmp_path / "fused.ply", scene.points[::4].numpy())
    run_spsr_labels(root, tmp_path / "fused.ply", tmp_path / "a", SMALL)
    cam = read_cam_txt(root / "cams" / "00000000_cam.txt")
    d = read_pfm(tmp_path / "a" / "depth" / "00000000.pfm")
    assert d[d > 0].min() >= cam.depth_min - 1e-4 and d.max() <= cam.depth_max + 1e-4


def test_exception_write_pseudo_labels_shapes(tmp_path):
    d = torch.rand(2, 1, 4, 5) + 1
    with pytest.raises(ShapeError, match="mask"): write_pseudo_labels(tmp_path / "x", d, torch.ones(2, 1, 4, 6, dtype=torch.bool))
    with pytest.raises(ShapeError, match="view_ids"): write_pseudo_labels(tmp_path / "x", d, d > 0, view_ids=[0])
    out = write_pseudo_labels(tmp_path / "y", d, d > 1.5, view_ids=[3, 7])
    assert sorted(p.name for p in (out / "depth").iterdir()) == ["00000003.pfm", "00000007.pfm"]
