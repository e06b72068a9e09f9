"""mvsnb.fusion: fused points lie on the true surfaces, match a per-pixel loop, voxel merging and normals
against brute force, the PLY round trip through the MVSNet output layout, and bad input."""
import math
import numpy as np
import pytest
import torch

o3d = pytest.importorskip("open3d")
from scipy.spatial import cKDTree
from mvsnb.synthetic import make_scene, write_scene, scene_objects, raycaster, in_observation_mask
from mvsnb.crossview import CrossViewConfig, cross_view_check
from mvsnb.fusion import FusionConfig, fuse, fused_points, voxel_downsample, depth_normals, run_fuse
from mvsnb.core import InputError
from mvsnb.io import write_pfm, read_ply, read_image

pytestmark = pytest.mark.open3d
SEED = 1


@pytest.fixture(scope="module")
def scene():
    return make_scene(views=5, height=48, width=64, seed=SEED)


def surface_distance(points):
    "Exact distance from points to the scene's triangle meshes."
    rc = raycaster(scene_objects(seed=SEED))
    return rc.compute_distance(o3d.core.Tensor(points.numpy().astype(np.float32))).numpy()


def test_feature_gt_fusion_on_true_surface(scene):
    pts, cols, nrm = fuse(scene.depth, None, scene.images, scene.K, scene.w2c, scene.pairs)
    assert nrm is None and pts.dtype == torch.float32 and len(pts) > 0.5 * scene.depth[:, 0].numel()
    assert cols.min() >= 0 and cols.max() <= 1
    d_mesh = surface_distance(pts)
    # on the meshes (depths 2.6..7.2): d̂ averages bilinear reads of z-depth, which is not linear in the image
    # (~1e-3 relative on the steep ground of a 48x64 view), and reads mixing surfaces within tau_geo = 1 %
    assert np.median(d_mesh) < 3e-4 and np.quantile(d_mesh, 0.9) < 3e-3 and d_mesh.max() < 0.01 * scene.depth_max
    inside = in_observation_mask(pts, scene.obs_mask)
    assert inside.float().mean() > 0.5
    d_gt, _ = cKDTree(scene.points.numpy()).query(pts[inside].numpy())
    spacing = scene.meta["options"]["gt_spacing"]
    assert np.median(d_gt) < 0.75 * spacing and np.quantile(d_gt, 0.95) < 1.5 * spacing


def test_feature_averaging_reduces_noise(scene):
    g = torch.Generator().manual_seed(0)
    noisy = scene.depth * (1 + 0.003 * torch.randn(scene.depth.shape, generator=g))
    res = cross_view_check(noisy, None, scene.K, scene.w2c, scene.pairs)
    fused, _, _, _ = fused_points(res, scene.images, scene.K, scene.w2c)
    raw = cross_view_check(noisy, None, scene.K, scene.w2c, scene.pairs)
    raw.depth = torch.where(raw.mask, noisy, torch.zeros_like(noisy))  # same pixels at their input depth
    unaveraged, _, _, _ = fused_points(raw, scene.images, scene.K, scene.w2c)
    assert np.median(surface_distance(fused)) < 0.8 * np.median(surface_distance(unaveraged))


def test_feature_matches_per_pixel_loop(scene):
    sc = make_scene(views=3, height=10, width=12, seed=4)
    g = torch.Generator().manual_seed(2)
    d = sc.depth * (1 + 0.002 * torch.randn(sc.depth.shape, generator=g))
    res = cross_view_check(d, None, sc.K, sc.w2c, sc.pairs, CrossViewConfig(min_views=1))
    pts, cols, nrm, view = fused_points(res, sc.images, sc.K, sc.w2c, depths=d)
    K, w2c = sc.K.double().numpy(), sc.w2c.double().numpy()
    ref_p, ref_c, ref_n = [], [], []
    for v in range(3):
        c2w = np.linalg.inv(w2c[v])
        for i in range(10):
            for j in range(12):
                if not res.mask[v, 0, i, j]: continue
                X = float(res.depth[v, 0, i, j]) * np.linalg.inv(K[v]) @ np.array([j, i, 1.0])
                ref_p.append(c2w[:3, :3] @ X + c2w[:3, 3]); ref_c.append(sc.images[v, :, i, j].numpy())
                # normal: central differences of the back-projected input depth (one-sided at the border)
                P = lambda a, b: float(d[v, 0, a, b]) * np.linalg.inv(K[v]) @ np.array([b, a, 1.0])
                du = P(i, min(j + 1, 11)) - P(i, max(j - 1, 0)); dv = P(min(i + 1, 9), j) - P(max(i - 1, 0), j)
                n = np.cross(du, dv); n = -n if n @ X > 0 else n
                ref_n.append(c2w[:3, :3] @ (n / np.linalg.norm(n)))
    assert len(ref_p) > 50
    np.testing.assert_allclose(pts.numpy(), np.array(ref_p), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cols.numpy(), np.array(ref_c), atol=1e-7)
    np.testing.assert_allclose(nrm.numpy(), np.array(ref_n), atol=1e-4)


def test_feature_depth_normals_fallback():
    K = torch.tensor([[[20., 0, 4.5], [0, 20., 3.5], [0, 0, 1]]])
    d = torch.full((1, 1, 8, 10), 3.0); d[0, 0, 4, 4] = 0  # a hole: its four neighbours lose a neighbour
    n, ok = depth_normals(d, K)
    assert not ok[0, 0, 4, 4] and not ok[0, 0, 3, 4] and not ok[0, 0, 4, 5] and ok.sum() == 80 - 5
    torch.testing.assert_close(n[0][:, ok[0, 0]].T, torch.tensor([0., 0., -1.]).expand(75, 3))  # fronto-parallel
    ray = -torch.nn.functional.normalize(torch.tensor([(4 - 4.5) / 20, (3 - 3.5) / 20, 1.0]), dim=0)
    torch.testing.assert_close(n[0, :, 3, 4], ray)  # fallback: toward the camera


def test_feature_voxel_downsample_matches_loop():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(500, 3, generator=g) * 2 - 1; c = torch.rand(500, 3, generator=g)
    nrm = torch.nn.functional.normalize(torch.randn(500, 3, generator=g), dim=1)
    q, qc, qn = voxel_downsample(p, c, 0.25, normals=nrm)
    groups = {}
    for k in range(500):
        groups.setdefault(tuple(math.floor(x / 0.25) for x in p[k].tolist()), []).append(k)
    assert len(q) == len(groups) < 500
    ref = {key: (p[ix].double().mean(0), c[ix].double().mean(0), torch.nn.functional.normalize(nrm[ix].double().sum(0), dim=0)) for key, ix in groups.items()}
    for a in range(len(q)):
        key = tuple(math.floor(x / 0.25) for x in q[a].tolist())  # a centroid lies in its own voxel
        rp, rc, rn = ref[key]
        torch.testing.assert_close(q[a].double(), rp, rtol=0, atol=1e-6)
        torch.testing.assert_close(qc[a].double(), rc, rtol=0, atol=1e-6)
        torch.testing.assert_close(qn[a].double(), rn, rtol=0, atol=1e-5)
    q2, qc2 = voxel_downsample(p + 5, c, 10.0)  # all in the voxel [0,10)^3 → the mean
    assert len(q2) == 1
    torch.testing.assert_close(q2[0], (p + 5).mean(0)); torch.testing.assert_close(qc2[0], c.mean(0))
    with pytest.raises(InputError, match="voxel"): voxel_downsample(p, c, 0.0)


def test_feature_fuse_voxel_and_normals(scene):
    pts, cols, nrm = fuse(scene.depth, None, scene.images, scene.K, scene.w2c, scene.pairs, FusionConfig(normals=True))
    # normals face the camera that saw the point and agree with the GT normals of the pixels
    res = cross_view_check(scene.depth, None, scene.K, scene.w2c, scene.pairs)
    gt_n = scene.normal.permute(0, 2, 3, 1)[res.mask[:, 0]]
    cos = (nrm * gt_n).sum(1)
    assert (cos > 0.95).float().mean() > 0.9
    vp, vc, vn = fuse(scene.depth, None, scene.images, scene.K, scene.w2c, scene.pairs, FusionConfig(normals=True, voxel=0.05))
    assert len(vp) < 0.5 * len(pts) and vn.shape == vp.shape
    torch.testing.assert_close(vn.norm(dim=1), torch.ones(len(vn)))


def test_exception_fuse(scene):
    with pytest.raises(InputError, match="fusion kept no points"):
        fuse(scene.depth, torch.full_like(scene.depth, 0.5), scene.images, scene.K, scene.w2c, scene.pairs)
    with pytest.raises(InputError, match=r"\[voxel\]"): FusionConfig(voxel=-1.0)
    assert FusionConfig(check="kdmvs_release").check.tau_geo == 0.005
    with pytest.raises(InputError, match="unknown preset"): FusionConfig(check="nope")
    with pytest.raises(Exception, match="images"): fuse(scene.depth, None, scene.images[:3], scene.K, scene.w2c, scene.pairs)


@pytest.mark.cuda
def test_feature_cuda_fuse(scene):
    cpu = fuse(scene.depth, None, scene.images, scene.K, scene.w2c, scene.pairs)[0]
    gpu = fuse(scene.depth.cuda(), None, scene.images.cuda(), scene.K.cuda(), scene.w2c.cuda(), scene.pairs)[0]
    assert gpu.is_cuda and abs(len(gpu) - len(cpu)) < 1e-3 * len(cpu) + 2


def test_feature_run_fuse_round_trip(scene, tmp_path):
    write_scene(scene, tmp_path / "scene")
    small = make_scene(views=5, height=24, width=32, seed=SEED)  # depth maps at half the image size
    conf = torch.rand(small.depth.shape, generator=torch.Generator().manual_seed(0)) * 0.2 + 0.7
    for v in range(5):
        write_pfm(tmp_path / "out" / "depth_est" / f"{v:08d}.pfm", small.depth[v, 0].numpy())
        write_pfm(tmp_path / "out" / "confidence" / f"{v:08d}.pfm", conf[v, 0].numpy())
    info = run_fuse(tmp_path / "scene", tmp_path / "out", tmp_path / "fused.ply", FusionConfig(normals=True))
    ply = read_ply(tmp_path / "fused.ply")
    assert info["num_points"] == len(ply.points) > 100 and ply.colors.dtype == np.uint8 and ply.normals is not None
    images = torch.stack([torch.from_numpy(read_image(tmp_path / "scene" / "images" / f"{v:08d}.png")).permute(2, 0, 1) for v in range(5)])
    pts, cols, nrm = fuse(small.depth, conf, images, small.K, small.w2c, small.pairs, FusionConfig(normals=True))
    np.testing.assert_allclose(ply.points, pts.numpy(), rtol=1e-5, atol=1e-5)
    assert np.abs(ply.colors.astype(int) - np.round(cols.numpy() * 255)).max() <= 1
    np.testing.assert_allclose(ply.normals, nrm.numpy(), atol=1e-5)
    assert 0 < info["kept_fraction_mean"] <= 1 and len(info["kept_fraction"]) == 5
    assert np.median(surface_distance(torch.from_numpy(ply.points))) < 1e-3
    with pytest.raises(InputError, match="exists"): run_fuse(tmp_path / "scene", tmp_path / "out", tmp_path / "fused.ply")
    info2 = run_fuse(tmp_path / "scene", tmp_path / "out", tmp_path / "fused.ply", FusionConfig(voxel=0.05), overwrite=True)
    assert info2["num_points"] < info["num_points"] and len(read_ply(tmp_path / "fused.ply").points) == info2["num_points"]
    # an empty result leaves no file behind
    for v in range(5): write_pfm(tmp_path / "low" / "depth_est" / f"{v:08d}.pfm", small.depth[v, 0].numpy())
    for v in range(5): write_pfm(tmp_path / "low" / "confidence" / f"{v:08d}.pfm", np.full((24, 32), 0.1, np.float32))
    with pytest.raises(InputError, match="kept no points"): run_fuse(tmp_path / "scene", tmp_path / "low", tmp_path / "empty.ply")
    assert not (tmp_path / "empty.ply").exists()
    (tmp_path / "scene" / "images" / "00000002.png").unlink()
    with pytest.raises(InputError, match="image of view 2"): run_fuse(tmp_path / "scene", tmp_path / "out", tmp_path / "x.ply")
