"""mvsnb.render: z-buffer vs brute force, vs Open3D raycasting, vs analytic meshes; near-plane; PyTorch3D (cuda)."""
import math
import numpy as np
import pytest
import torch

from mvsnb.core import InputError, ShapeError, pixel_grid
from mvsnb.camera import intrinsics, look_at, unproject, project, transform_points, invert_pose
from mvsnb.render import depth_grid_mesh, grid_faces, zbuffer_render, zbuffer_at, raycast_depth, render_depth


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def _cam(H=8, W=10, f=9.0):
    return intrinsics(f, f * 1.1, (W - 1) / 2 + 0.3, (H - 1) / 2 - 0.2, dtype=torch.float64)


def _brute_depth_at(V, F, K, w2c, pts, znear=0.0, eps=1e-4):
    """Per position, per triangle: screen-space barycentrics by a 2x2 solve (inclusion), depth by intersecting the
    position's ray with the triangle's plane in the camera frame (independent of the 1/z interpolation)."""
    R, t = w2c[:3, :3].numpy(), w2c[:3, 3].numpy()
    Kn = K.numpy()
    Xc = V.numpy() @ R.T + t
    out = []
    for (x, y) in pts:
        ray = np.linalg.solve(Kn, np.array([x, y, 1.0]))  # camera-frame direction with z = 1
        best = np.inf
        for f in F.numpy():
            P = Xc[f]
            if (P[:, 2] <= znear).any(): continue
            uv = (P @ Kn.T)[:, :2] / P[:, 2:3]
            A = np.stack([uv[1] - uv[0], uv[2] - uv[0]], 1)
            if abs(np.linalg.det(A)) < 1e-12: continue
            l1, l2 = np.linalg.solve(A, np.array([x, y]) - uv[0])
            if min(1 - l1 - l2, l1, l2) < -eps: continue
            nrm = np.cross(P[1] - P[0], P[2] - P[0])
            best = min(best, nrm @ P[0] / (nrm @ ray))  # ray point z·ray lies on the plane
        out.append(best if np.isfinite(best) else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def _brute_zbuffer(V, F, K, w2c, H, W, znear=0.0, eps=1e-4):
    pts = [(j, i) for i in range(H) for j in range(W)]
    return _brute_depth_at(V, F, K, w2c, pts, znear, eps).reshape(H, W)


def _random_triangles(seed=3, n=30):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(n, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.4, 3.0], dtype=torch.float64) \
        - torch.tensor([1.5, 1.2, -2.0], dtype=torch.float64)
    V = (centres[:, None] + 1.0 * torch.randn(n, 3, 3, generator=g, dtype=torch.float64)).reshape(-1, 3)
    V[-3:, 2] = torch.tensor([-0.5, 3.0, 3.0], dtype=torch.float64)  # one triangle straddles the camera plane
    return V, torch.arange(3 * n).reshape(n, 3)


def test_feature_zbuffer_vs_bruteforce():
    H, W = 8, 10
    K = _cam(H, W)
    V, F = _random_triangles()  # 30 random triangles 2-6 px wide in front of the camera, overlapping in depth
    w2cs = torch.stack([torch.eye(4, dtype=torch.float64),
                        look_at(torch.tensor([0.8, -0.3, -0.2], dtype=torch.float64), torch.tensor([0., 0., 3.5], dtype=torch.float64),
                                up=torch.tensor([0., -1., 0.], dtype=torch.float64))])
    out = zbuffer_render(V, F, K[None].expand(2, -1, -1), w2cs, H, W)
    assert out.shape == (2, 1, H, W) and out.dtype == torch.float64
    for b in range(2):
        ref = _brute_zbuffer(V, F, K, w2cs[b], H, W)
        assert (ref > 0).float().mean() > 0.4  # the test scene actually covers the image
        torch.testing.assert_close(out[b, 0], ref, rtol=1e-9, atol=1e-9)


def test_feature_zbuffer_at_vs_bruteforce():
    H, W = 8, 10
    K = _cam(H, W)
    V, F = _random_triangles(seed=4)
    g = torch.Generator().manual_seed(0)
    uv = torch.rand(2, 2, 6, 7, generator=g, dtype=torch.float64) * torch.tensor([W - 1.0, H - 1.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    uv[0, :, 0, 0] = torch.tensor([-0.5, 3.0]); uv[0, :, 0, 1] = float("nan")  # outside the image / non-finite → 0
    w2cs = torch.stack([torch.eye(4, dtype=torch.float64),
                        look_at(torch.tensor([-0.6, 0.3, 0.1], dtype=torch.float64), torch.tensor([0., 0., 3.5], dtype=torch.float64),
                                up=torch.tensor([0., -1., 0.], dtype=torch.float64))])
    out = zbuffer_at(V, F, K[None].expand(2, -1, -1), w2cs, uv, H, W)
    assert out.shape == (2, 1, 6, 7)
    for b in range(2):
        pts = uv[b].reshape(2, -1).T.tolist()
        ref = _brute_depth_at(V, F, K, w2cs[b], [(x, y) if (0 <= x <= W - 1 and 0 <= y <= H - 1) else (1e9, 1e9) for x, y in pts])
        assert (ref > 0).float().mean() > 0.3
        torch.testing.assert_close(out[b, 0].reshape(-1), ref, rtol=1e-9, atol=1e-9)
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 0, 1] == 0
    # at the pixel centres it is the z-buffer, also in chunks
    grid = pixel_grid(H, W, dtype=torch.float64)[None].expand(2, -1, -1, -1)
    torch.testing.assert_close(zbuffer_at(V, F, K[None].expand(2, -1, -1), w2cs, grid, H, W, chunk=5),
                               zbuffer_render(V, F, K[None].expand(2, -1, -1), w2cs, H, W))
    with pytest.raises(ShapeError, match="uv"): zbuffer_at(V, F, K[None], w2cs[:1], uv, H, W)


def test_feature_bruteforce_near_plane():
    H, W = 8, 10
    K = _cam(H, W)
    V = torch.tensor([[-2., -2., 0.5], [2., -2., 0.5], [0., 2., 4.0]], dtype=torch.float64)
    F = torch.tensor([[0, 1, 2]])
    w2c = torch.eye(4, dtype=torch.float64)
    for znear in (0.0, 0.4, 0.5, 1.0):
        out = zbuffer_render(V, F, K[None], w2c[None], H, W, znear=znear)[0, 0]
        torch.testing.assert_close(out, _brute_zbuffer(V, F, K, w2c, H, W, znear=znear), rtol=1e-9, atol=1e-9)
        assert ((out > 0).sum() > 0) == (znear < 0.5)


def test_feature_grid_mesh_self_render():
    "The depth-grid mesh rendered into its own camera gives the depth back at every pixel centre (vertices on centres)."
    g = torch.Generator().manual_seed(0)
    H, W = 24, 30
    K = intrinsics(30., 31., 14.5, 11.5)
    depth = 3 + torch.nn.functional.interpolate(torch.rand(1, 1, 4, 5, generator=g), (H, W), mode="bilinear", align_corners=True)[0]
    w2c = look_at(torch.tensor([1., 2., 0.5]), torch.zeros(3))
    V, F = depth_grid_mesh(depth, K, w2c)
    out = zbuffer_render(V, F, K[None], w2c[None], H, W)
    assert (out > 0).all()
    torch.testing.assert_close(out[0], depth, rtol=2e-5, atol=0)


def test_feature_depth_grid_mesh():
    H, W = 5, 6
    K = intrinsics(6., 6., 2.5, 2.)
    depth = torch.full((1, H, W), 2.0)
    depth[0, :, 3:] = 4.0  # a step between columns 2 and 3
    V, F = depth_grid_mesh(depth, K, compact=False)
    assert V.shape == (H * W, 3) and F.shape == (2 * 4 * 5, 3)
    torch.testing.assert_close(V[:, 2], depth.reshape(-1))
    uv, _ = project(V.T[None], K[None])
    torch.testing.assert_close(uv[0].T, pixel_grid(H, W).reshape(2, -1).T, atol=1e-5, rtol=0)  # vertex k = pixel k, row-major
    _, F_torn = depth_grid_mesh(depth, K, max_edge_ratio=1.5)
    assert F_torn.shape[0] == F.shape[0] - 2 * (H - 1)  # the quads spanning the step are gone
    valid = torch.ones(H, W, dtype=torch.bool); valid[0, 0] = False
    V2, F2 = depth_grid_mesh(depth, K, valid=valid)
    assert F2.shape[0] == F.shape[0] - 1 and V2.shape[0] == H * W - 1  # corner pixel touches one triangle
    depth_nan = depth.clone(); depth_nan[0, 2, 2] = float("nan")
    V3, F3 = depth_grid_mesh(depth_nan, K)
    assert torch.isfinite(V3).all() and F3.shape[0] == F.shape[0] - 6
    w2c = look_at(torch.tensor([0.5, -3., 1.]), torch.zeros(3))
    Vw, _ = depth_grid_mesh(depth, K, w2c, compact=False)  # world frame: back in the camera it is the camera-frame mesh
    torch.testing.assert_close(transform_points(w2c[None], Vw.T[None])[0].T, V, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="max_edge_ratio"): depth_grid_mesh(depth, K, max_edge_ratio=0.5)
    with pytest.raises(ShapeError, match="depth"): depth_grid_mesh(torch.ones(2, 1, H, W), K)
    assert grid_faces(3, 3).max() == 8


def _box_mesh(lo, hi):
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    faces = [t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))]
    return torch.tensor(corners, dtype=torch.float64), torch.tensor(faces)


def _analytic_box_depth(lo, hi, K, w2c, H, W):
    "Slab-method ray/box intersection; rays have camera-frame z = 1, so the entry parameter is the z-depth."
    c2w = invert_pose(w2c.double())
    uv1 = np.stack([*np.meshgrid(np.arange(W), np.arange(H)), np.ones((H, W))], -1).reshape(-1, 3)
    d = (c2w[:3, :3].numpy() @ np.linalg.solve(K.double().numpy(), uv1.T)).T
    o = c2w[:3, 3].numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (np.asarray(lo) - o) / d, (np.asarray(hi) - o) / d
    tmin, tmax = np.minimum(t1, t2).max(1), np.maximum(t1, t2).min(1)
    hit = (tmax >= tmin) & (tmin > 0)
    return torch.from_numpy(np.where(hit, tmin, 0.0).reshape(H, W)), torch.from_numpy(((tmax - tmin) / np.abs(tmin)).reshape(H, W))


def _analytic_plane_depth(p0, nrm, K, w2c, H, W):
    c2w = invert_pose(w2c.double())
    rays = c2w[:3, :3] @ unproject(torch.ones(1, 1, H, W, dtype=torch.float64), K.double()[None])[0].reshape(3, -1)
    t = ((p0 - c2w[:3, 3]) @ nrm) / (nrm @ rays)
    return t.reshape(H, W)


@pytest.mark.open3d
def test_feature_known_meshes_zbuffer_raycast_analytic():
    pytest.importorskip("open3d")
    H, W = 30, 40
    K = intrinsics(38., 40., 19.7, 14.6, dtype=torch.float64)
    w2c = look_at(torch.tensor([2.3, -1.7, 1.9], dtype=torch.float64), torch.tensor([0.1, 0.05, 0.0], dtype=torch.float64))
    # a cube of side 1
    lo, hi = [-0.5, -0.4, -0.45], [0.5, 0.6, 0.55]
    V, F = _box_mesh(lo, hi)
    gt, slab = _analytic_box_depth(lo, hi, K, w2c, H, W)
    zb = zbuffer_render(V, F, K[None], w2c[None], H, W)[0, 0]
    rc = raycast_depth(V, F, K, w2c, H, W)[0, 0].double()
    assert 0.1 < (gt > 0).float().mean() < 0.9  # silhouette inside the image
    safe = slab.abs() > 1e-3  # pixel centres not within numerical noise of the silhouette
    for out in (zb, rc):
        assert ((out > 0) == (gt > 0))[safe].all()
        torch.testing.assert_close(out[gt > 0], gt[gt > 0], rtol=1e-5, atol=0)
    # a tilted plane (two big triangles) partly covering the image
    p0 = torch.tensor([0., 0., -0.2], dtype=torch.float64); nrm = torch.nn.functional.normalize(torch.tensor([0.2, 0.1, 1.], dtype=torch.float64), dim=0)
    e1 = torch.nn.functional.normalize(torch.linalg.cross(nrm, torch.tensor([1., 0, 0], dtype=torch.float64)), dim=0)
    e2 = torch.linalg.cross(nrm, e1)
    Vp = torch.stack([p0 + 1.2 * (s1 * e1 + s2 * e2) for s1, s2 in ((-1, -1), (1, -1), (1, 1), (-1, 1))])
    Fp = torch.tensor([[0, 1, 2], [0, 2, 3]])
    gtp = _analytic_plane_depth(p0, nrm, K, w2c, H, W)
    zbp = zbuffer_render(Vp, Fp, K[None], w2c[None], H, W)[0, 0]
    rcp = raycast_depth(Vp, Fp, K, w2c, H, W)[0, 0].double()
    hit = zbp > 0
    assert 0.2 < hit.float().mean() < 0.95
    assert ((rcp > 0) == hit).float().mean() > 0.99  # may differ only on pixel centres on the border
    torch.testing.assert_close(zbp[hit], gtp[hit], rtol=1e-6, atol=0)
    both = hit & (rcp > 0)
    torch.testing.assert_close(rcp[both], gtp[both], rtol=1e-5, atol=0)
    # the plane and the cube together: nearest surface wins in both renderers
    Vs, Fs = torch.cat([V, Vp]), torch.cat([F, Fp + len(V)])
    zbs = zbuffer_render(Vs, Fs, K[None], w2c[None], H, W)[0, 0]
    rcs = raycast_depth(Vs, Fs, K, w2c, H, W)[0, 0].double()
    expect = torch.where(gt > 0, torch.where(hit, torch.minimum(gt, gtp), gt), torch.where(hit, gtp, torch.zeros_like(gt)))
    ok = safe & (zbs > 0) & (rcs > 0)
    assert ok.float().mean() > 0.3
    torch.testing.assert_close(zbs[ok], expect[ok], rtol=1e-5, atol=0)
    torch.testing.assert_close(rcs[ok], expect[ok], rtol=1e-5, atol=0)


@pytest.mark.open3d
def test_feature_axis_convention_and_znear():
    pytest.importorskip("open3d")
    H, W = 20, 30
    K = intrinsics(20., 20., 14.5, 9.5)
    w2c = torch.eye(4)
    # a small triangle right of and below the optical axis (camera x right, y down) at z = 2
    V = torch.tensor([[0.5, 0.3, 2.0], [0.8, 0.3, 2.0], [0.5, 0.6, 2.0]])
    F = torch.tensor([[0, 1, 2]])
    for out in (zbuffer_render(V, F, K[None], w2c[None], H, W), raycast_depth(V, F, K, w2c, H, W)):
        ys, xs = (out[0, 0] > 0).nonzero(as_tuple=True)
        assert len(xs) > 0 and (xs > 14.5).all() and (ys > 9.5).all()
        torch.testing.assert_close(out[out > 0], torch.full_like(out[out > 0], 2.0))
    # znear = 0 must render (the Self-sup CVP release got empty maps); geometry behind znear is dropped
    plane_V = torch.tensor([[-5., -5., 2.], [5., -5., 2.], [5., 5., 2.], [-5., 5., 2.]])
    plane_F = torch.tensor([[0, 1, 2], [0, 2, 3]])
    for render in (lambda **k: zbuffer_render(plane_V, plane_F, K[None], w2c[None], H, W, **k),
                   lambda **k: raycast_depth(plane_V, plane_F, K, w2c, H, W, **k)):
        assert (render(znear=0.0) == 2.0).all()
        assert (render(znear=2.5) == 0).all()
    # a plane tilted through the camera plane: the z-buffer skips the straddling triangles, the raycaster clips per ray
    tilted = plane_V.clone(); tilted[:2, 2] = -1.0; tilted[2:, 2] = 5.0
    zb = zbuffer_render(tilted, plane_F, K[None], w2c[None], H, W, znear=0.0)
    rc = raycast_depth(tilted, plane_F, K, w2c, H, W, znear=0.0)
    assert (zb == 0).all() and (rc > 0).float().mean() > 0.5
    rc_far = raycast_depth(tilted, plane_F, K, w2c, H, W, znear=3.0)
    assert (rc_far[rc_far > 0] >= 3.0 - 1e-5).all() and (rc_far > 0).sum() < (rc > 0).sum()
    zf = zbuffer_render(plane_V, plane_F, K[None], w2c[None], H, W, zfar=1.5)
    assert (zf == 0).all()


def test_feature_chunking_batching_and_dtype():
    g = torch.Generator().manual_seed(1)
    H, W = 16, 20
    K = intrinsics(16., 16., 9.5, 7.5)
    depth = 2 + torch.rand(1, H, W, generator=g)
    V, F = depth_grid_mesh(depth, K)
    w2c = torch.stack([torch.eye(4), look_at(torch.tensor([0.4, 0.2, 0.]), torch.tensor([0., 0., 2.5]), up=torch.tensor([0., -1., 0.]))])
    a = zbuffer_render(V, F, K[None].expand(2, -1, -1), w2c, H, W)
    b = zbuffer_render(V[None].expand(2, -1, -1), F, K.expand(2, 3, 3), w2c, H, W, chunk=300)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    c = zbuffer_render(V.double(), F, K[None].expand(2, -1, -1), w2c, H, W)
    torch.testing.assert_close(a.double(), c, rtol=1e-6, atol=0)
    torch.testing.assert_close(render_depth(V, F, K[None].expand(2, -1, -1), w2c, H, W), a)


def test_exception_render_inputs():
    K = intrinsics(10., 10., 4.5, 3.5)
    V = torch.rand(5, 3) + torch.tensor([0., 0., 2.])
    F = torch.tensor([[0, 1, 2], [2, 3, 4]])
    with pytest.raises(ShapeError, match="K"): zbuffer_render(V, F, torch.eye(4)[None], torch.eye(4)[None], 8, 10)
    with pytest.raises(ShapeError, match="w2c"): zbuffer_render(V, F, K[None].expand(2, -1, -1), torch.eye(4)[None].expand(3, -1, -1), 8, 10)
    with pytest.raises(ShapeError, match="faces"): zbuffer_render(V, F[:, :2], K[None], torch.eye(4)[None], 8, 10)
    with pytest.raises(InputError, match="faces index"): zbuffer_render(V, F + 3, K[None], torch.eye(4)[None], 8, 10)
    with pytest.raises(InputError, match="unknown backend"): render_depth(V, F, K[None], torch.eye(4)[None], 8, 10, backend="gl")
    with pytest.raises(ShapeError, match="open3d"): render_depth(V[None], F, K[None], torch.eye(4)[None], 8, 10, backend="open3d")


def test_smoke_speed_128x160():
    "A 128x160 depth-grid mesh (~40k triangles) renders in well under a second per view on the CPU."
    import time
    K = intrinsics(160., 160., 79.5, 63.5)
    depth = 3 + 0.05 * torch.rand(1, 128, 160)
    V, F = depth_grid_mesh(depth, K)
    w2c = torch.eye(4); w2c[:3, 3] = torch.tensor([-0.4, 0.13, 0.05])
    zbuffer_render(V, F, K[None], w2c[None], 128, 160)
    t0 = time.process_time()  # CPU time of one thread (fixture): robust to a busy machine; measured ~20-30 ms
    out = zbuffer_render(V, F, K[None], w2c[None], 128, 160)
    assert time.process_time() - t0 < 1.0 and (out > 0).float().mean() > 0.5


@pytest.mark.cuda
def test_feature_cuda_zbuffer_matches_cpu():
    H, W = 32, 40
    K = intrinsics(40., 40., 19.5, 15.5)
    depth = 2 + torch.rand(1, H, W, generator=torch.Generator().manual_seed(2))
    V, F = depth_grid_mesh(depth, K)
    w2c = look_at(torch.tensor([0.4, 0.2, 0.]), torch.tensor([0., 0., 2.5]), up=torch.tensor([0., -1., 0.]))
    cpu = zbuffer_render(V, F, K[None], w2c[None], H, W)
    gpu = zbuffer_render(V.cuda(), F.cuda(), K[None].cuda(), w2c[None].cuda(), H, W)
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu)


@pytest.mark.cuda
def test_feature_cuda_pytorch3d_matches_zbuffer():
    pytest.importorskip("pytorch3d")
    from mvsnb.render import pytorch3d_render
    H, W = 30, 40
    K = intrinsics(38., 40., 19.7, 14.6)
    w2c = look_at(torch.tensor([2.3, -1.7, 1.9]), torch.tensor([0.1, 0.05, 0.0]))
    V, F = _box_mesh([-0.5, -0.4, -0.45], [0.5, 0.6, 0.55])
    V = V.float().cuda(); F = F.cuda()
    p3 = pytorch3d_render(V, F, K[None].cuda(), w2c[None].cuda(), H, W)[0, 0].cpu()
    zb = zbuffer_render(V, F, K[None].cuda(), w2c[None].cuda(), H, W)[0, 0].cpu()
    assert (p3 > 0).float().mean() > 0.1
    assert ((p3 > 0) == (zb > 0)).float().mean() > 0.99  # a half-pixel convention error would shift the silhouette
    both = (p3 > 0) & (zb > 0)
    torch.testing.assert_close(p3[both], zb[both], rtol=1e-4, atol=0)
    assert render_depth(V, F, K[None].cuda(), w2c[None].cuda(), H, W).is_cuda
