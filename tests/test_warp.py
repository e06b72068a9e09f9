"""mvsnb.warp against hand-written references: a per-pixel brute-force reprojection, analytic homographies,
degenerate poses, kornia, and the ground truth of a synthetic scene."""
import math
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from mvsnb.core import ShapeError, InputError, pixel_grid, sample_image
from mvsnb.camera import relative_pose, invert_pose
from mvsnb.warp import depth_hypotheses, homography_warp, inverse_warp, probability_synthesis

DT = torch.float64


def rotation(axis, angle, dtype=DT):
    "Rotation matrix (3,3) from an axis and an angle (Rodrigues via the matrix exponential)."
    a = torch.nn.functional.normalize(torch.tensor(axis, dtype=dtype), dim=0) * angle
    S = torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]], dtype=dtype)
    return torch.linalg.matrix_exp(S)


def pose(R, t, dtype=DT):
    T = torch.eye(4, dtype=dtype)
    T[:3, :3], T[:3, 3] = R, torch.tensor(t, dtype=dtype)
    return T


def K_of(fx, fy, cx, cy, dtype=DT):
    return torch.tensor([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=dtype)


def camera_pair(B=2, H=8, W=10, Hs=None, Ws=None, dtype=DT):
    "Two different reference/source rigs per batch element; the source may have its own size."
    Hs, Ws = Hs or H, Ws or W
    K_ref = torch.stack([K_of(9.0, 9.5, (W - 1) / 2 + 0.3, (H - 1) / 2 - 0.2, dtype),
                         K_of(11.0, 10.0, (W - 1) / 2 - 0.4, (H - 1) / 2 + 0.1, dtype)][:B])
    K_src = torch.stack([K_of(8.5, 9.0, (Ws - 1) / 2 - 0.1, (Hs - 1) / 2 + 0.3, dtype),
                         K_of(10.0, 10.5, (Ws - 1) / 2 + 0.2, (Hs - 1) / 2, dtype)][:B])
    T = torch.stack([pose(rotation([0.2, 1.0, 0.1], 0.12, dtype), [-0.6, 0.15, 0.1], dtype),
                     pose(rotation([1.0, -0.3, 0.2], -0.08, dtype), [0.3, -0.5, -0.2], dtype)][:B])
    return K_ref, K_src, T


# ---------------------------------------------------------------- brute-force reference (per-pixel loop)

def brute_bilinear(img, u, v):
    "Bilinear sample of img (C,H,W) at (u, v), zeros outside, written out by hand."
    C, H, W = img.shape
    x0, y0 = math.floor(u), math.floor(v)
    ax, ay = u - x0, v - y0
    out = torch.zeros(C, dtype=img.dtype)
    for (x, y, w) in ((x0, y0, (1 - ax) * (1 - ay)), (x0 + 1, y0, ax * (1 - ay)),
                      (x0, y0 + 1, (1 - ax) * ay), (x0 + 1, y0 + 1, ax * ay)):
        if 0 <= x < W and 0 <= y < H: out += w * img[:, y, x]
    return out


def brute_warp(src, K_ref, K_src, T, depth, eps=1e-6):
    "src (C,Hs,Ws), depth (H,W) → warped (C,H,W), valid (H,W): K_src (R K_ref^-1 [u,v,1] d + t), pixel by pixel."
    C, Hs, Ws = src.shape
    H, W = depth.shape
    K_inv = torch.linalg.inv(K_ref)
    R, t = T[:3, :3], T[:3, 3]
    out, valid = torch.zeros(C, H, W, dtype=src.dtype), torch.zeros(H, W, dtype=torch.bool)
    for i in range(H):
        for j in range(W):
            d = float(depth[i, j])
            if not (math.isfinite(d) and d > 0): continue
            X = R @ (K_inv @ torch.tensor([j, i, 1.0], dtype=src.dtype) * d) + t
            if X[2] <= eps: continue
            p = K_src @ X
            u, v = float(p[0] / p[2]), float(p[1] / p[2])
            if not (0 <= u <= Ws - 1 and 0 <= v <= Hs - 1): continue
            out[:, i, j], valid[i, j] = brute_bilinear(src, u, v), True
    return out, valid


@pytest.mark.parametrize("src_hw", [(8, 10), (7, 12)])
def test_feature_brute_force(src_hw):
    torch.manual_seed(0)
    B, C, D, H, W = 2, 3, 3, 8, 10
    K_ref, K_src, T = camera_pair(B, H, W, *src_hw)
    src = torch.rand(B, C, *src_hw, dtype=DT)
    hyps = 1.5 + 3 * torch.rand(B, D, H, W, dtype=DT)
    hyps[0, 1, 2, 3] = 0.0  # no depth: invalid
    hyps[1, 2, 4, 4] = -1.0
    warped, valid = homography_warp(src, K_ref, K_src, T, hyps)
    assert warped.shape == (B, C, D, H, W) and valid.shape == (B, 1, D, H, W) and valid.dtype == torch.bool
    n_valid = 0
    for b in range(B):
        for k in range(D):
            ref_w, ref_v = brute_warp(src[b], K_ref[b], K_src[b], T[b], hyps[b, k])
            assert torch.equal(valid[b, 0, k], ref_v), (b, k)
            assert_close(warped[b, :, k], ref_w, atol=1e-10, rtol=0)
            n_valid += int(ref_v.sum())
            inv_w, inv_v = inverse_warp(src[b:b + 1], hyps[b:b + 1, k:k + 1], K_ref[b:b + 1], K_src[b:b + 1], T[b:b + 1])
            assert torch.equal(inv_v[0, 0], ref_v)
            assert_close(inv_w[0], ref_w, atol=1e-10, rtol=0)
    assert 0.3 * B * D * H * W < n_valid < B * D * H * W  # the case mixes valid and invalid samples
    assert not valid[0, 0, 1, 2, 3] and not valid[1, 0, 2, 4, 4]


# ---------------------------------------------------------------- degenerate cases and analytic homographies

def test_feature_identity_pose():
    torch.manual_seed(1)
    K_ref, _, _ = camera_pair(2)
    src = torch.rand(2, 4, 8, 10, dtype=DT)
    eye = torch.eye(4, dtype=DT).expand(2, 4, 4)
    depth = 1 + 5 * torch.rand(2, 1, 8, 10, dtype=DT)
    out, valid = inverse_warp(src, depth, K_ref, K_ref, eye)
    assert valid.all()
    assert_close(out, src, atol=1e-12, rtol=0)
    for dtype, tol in ((torch.float32, 1e-5), (DT, 1e-12)):
        vol, vvol = homography_warp(src.to(dtype), K_ref.to(dtype), K_ref.to(dtype), eye.to(dtype),
                                    depth_hypotheses(torch.tensor([0.5, 2.0]), torch.tensor([50.0, 3.0]), 5, 8, 10).to(dtype))
        assert vvol.all() and vol.dtype == dtype
        assert_close(vol, src.to(dtype)[:, :, None].expand_as(vol), atol=tol, rtol=0)


def homography(K_ref, K_src, T, n, c):
    "H = K_src (R + t n^T / c) K_ref^-1 for the plane n^T X = c in the reference camera."
    R, t = T[:, :3, :3], T[:, :3, 3:]
    return K_src @ (R + t @ n[:, None, :] / c) @ torch.linalg.inv(K_ref)


def apply_h(Hm, H, W):
    x = torch.cat([pixel_grid(H, W, dtype=Hm.dtype), torch.ones(1, H, W, dtype=Hm.dtype)]).reshape(3, -1)
    p = Hm @ x
    return (p[:, :2] / p[:, 2:]).reshape(-1, 2, H, W)


@pytest.mark.parametrize("tilted", [False, True])
def test_feature_plane_homography(tilted):
    "Fronto-parallel (plane sweep) and tilted (inverse warp) planes warp by the analytic homography."
    torch.manual_seed(2)
    B, H, W = 2, 8, 10
    K_ref, K_src, T = camera_pair(B, H, W)
    c = 3.0
    if tilted:
        n = torch.nn.functional.normalize(torch.tensor([[0.3, -0.2, 1.0], [-0.25, 0.1, 1.0]], dtype=DT), dim=1)
        rays = torch.linalg.inv(K_ref) @ torch.cat([pixel_grid(H, W, dtype=DT), torch.ones(1, H, W, dtype=DT)]).reshape(3, -1)
        depth = (c / (n[:, None] @ rays)).reshape(B, 1, H, W)  # n^T (d r) = c
    else:
        n = torch.tensor([[0.0, 0.0, 1.0]], dtype=DT).expand(B, 3)
        depth = torch.full((B, 1, H, W), c, dtype=DT)
    coords = pixel_grid(H, W, dtype=DT)[None].expand(B, -1, -1, -1)  # the source's own pixel coordinates
    if tilted: uv_w, valid = inverse_warp(coords, depth, K_ref, K_src, T)
    else:
        uv_w, valid = homography_warp(coords, K_ref, K_src, T, depth)
        uv_w, valid = uv_w[:, :, 0], valid[:, :, 0]
    uv_h = apply_h(homography(K_ref, K_src, T, n, c), H, W)
    inside = ((uv_h >= 0) & (uv_h <= torch.tensor([W - 1.0, H - 1.0], dtype=DT)[:, None, None])).all(1, keepdim=True)
    assert torch.equal(valid, inside) and inside.float().mean() > 0.5
    m = valid.expand_as(uv_w)
    assert_close(uv_w[m], uv_h[m], atol=1e-9, rtol=0)  # bilinear sampling of a linear ramp is exact
    src = torch.rand(B, 3, H, W, dtype=DT)
    out = inverse_warp(src, depth, K_ref, K_src, T)[0]
    expected, _ = sample_image(src, uv_h)
    assert_close(out, torch.where(valid, expected, 0.0), atol=1e-9, rtol=0)


def test_feature_behind_camera():
    "Points behind the source camera are invalid even where their (mirrored) projection falls inside."
    torch.manual_seed(3)
    H, W = 8, 10
    K = K_of(9.0, 9.0, 4.5, 3.5)[None]
    T = pose(torch.eye(3, dtype=DT), [0.0, 0.0, -3.0])[None]  # source camera 3 units ahead of the reference
    depth = 1.5 + 3 * torch.rand(1, 1, H, W, dtype=DT)
    src = torch.rand(1, 2, H, W, dtype=DT) + 0.5
    out, valid = inverse_warp(src, depth, K, K, T)
    # without the guard: project X_src = d r + t and keep only the image bounds
    r = torch.linalg.inv(K[0]) @ torch.cat([pixel_grid(H, W, dtype=DT), torch.ones(1, H, W, dtype=DT)]).reshape(3, -1)
    X = r * depth.reshape(1, -1) + T[0, :3, 3:]
    p = K[0] @ X
    u, v = p[0] / p[2], p[1] / p[2]
    naive_inside = ((u >= 0) & (u <= W - 1) & (v >= 0) & (v <= H - 1)).reshape(H, W)
    behind = (depth[0, 0] < 3.0)
    assert (behind & naive_inside).any()  # the test would catch a missing z guard
    assert not valid[0, 0][behind].any()
    assert (out[0][:, behind] == 0).all()
    assert torch.equal(valid[0, 0], ~behind & naive_inside)
    vol, vvol = homography_warp(src, K, K, T, torch.tensor([1.0, 2.999, 3.0, 3.5], dtype=DT)[None, :, None, None].expand(1, 4, H, W))
    assert not vvol[0, 0, :3].any() and vvol[0, 0, 3].any() and (vol[:, :, :3] == 0).all()
    turn = pose(rotation([0, 1, 0], math.pi), [0.0, 0.0, 0.0])[None]  # facing backwards: nothing is seen
    out, valid = inverse_warp(src, depth, K, K, turn)
    assert not valid.any() and (out == 0).all()


def test_feature_invalid_depth():
    "Depth 0 / NaN / negative is invalid, per batch element and per plane, even where it would project inside."
    K_ref, K_src, _ = camera_pair(2)
    T = pose(rotation([0, 1, 0], 0.02), [0.05, 0.02, 0.5]).expand(2, 4, 4)  # epipole inside the source image
    src = torch.rand(2, 3, 8, 10, dtype=DT) + 0.5
    hyps = torch.full((2, 2, 8, 10), 3.0, dtype=DT)
    bad = [(0, 0, 3, 4), (0, 1, 4, 5), (1, 0, 5, 5), (1, 1, 2, 6)]
    for (b, k, i, j), value in zip(bad, (0.0, float("nan"), -2.0, 0.0)): hyps[b, k, i, j] = value
    vol, vvol = homography_warp(src, K_ref, K_src, T, hyps)
    expect = torch.ones(2, 2, 8, 10, dtype=torch.bool)
    for b, k, i, j in bad: expect[b, k, i, j] = False
    assert torch.equal(vvol[:, 0], expect) and torch.isfinite(vol).all()
    assert (vol.permute(0, 2, 3, 4, 1)[~expect] == 0).all()
    for k in range(2):
        out, valid = inverse_warp(src, hyps[:, k:k + 1], K_ref, K_src, T)
        assert torch.equal(valid[:, 0], expect[:, k]) and torch.isfinite(out).all()
    # without the check, depth 0 is the reference centre, which projects to the epipole, inside the image
    e = K_src[0] @ T[0, :3, 3]
    assert 0 <= e[0] / e[2] <= 9 and 0 <= e[1] / e[2] <= 7


def test_feature_sweep_equals_inverse_warp():
    "Plane k of the sweep is the inverse warp with depth map = hypothesis k (constant and per-pixel)."
    torch.manual_seed(4)
    B, D, H, W = 2, 6, 8, 10
    K_ref, K_src, T = camera_pair(B, H, W)
    src = torch.rand(B, 5, H, W, dtype=DT)
    for hyps in (depth_hypotheses(torch.tensor([1.5, 2.0], dtype=DT), torch.tensor([6.0, 4.0], dtype=DT), D, H, W, "inverse"),
                 1 + 4 * torch.rand(B, D, H, W, dtype=DT)):
        vol, vvol = homography_warp(src, K_ref, K_src, T, hyps)
        for k in range(D):
            out, valid = inverse_warp(src, hyps[:, k:k + 1], K_ref, K_src, T)
            assert torch.equal(vvol[:, :, k], valid)
            assert_close(vol[:, :, k], out, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- chunking, hypotheses, synthesis

def test_feature_chunk_identical():
    torch.manual_seed(5)
    B, D, H, W = 2, 7, 8, 10
    K_ref, K_src, T = [x.float() for x in camera_pair(B, H, W)]
    src = torch.rand(B, 4, H, W)
    hyps = 1 + 4 * torch.rand(B, D, H, W)
    full, vfull = homography_warp(src, K_ref, K_src, T, hyps)
    for chunk in (1, 2, 3, 7, 100):
        out, valid = homography_warp(src, K_ref, K_src, T, hyps, chunk=chunk)
        assert torch.equal(out, full) and torch.equal(valid, vfull), chunk
    prob = torch.rand(B, D, H, W).softmax(1)
    img, v = probability_synthesis(prob, src, K_ref, K_src, T, hyps)
    img3, v3 = probability_synthesis(prob, src, K_ref, K_src, T, hyps, chunk=3)
    assert torch.equal(v, v3)
    assert_close(img3, img, atol=1e-6, rtol=0)  # only the summation order differs
    with pytest.raises(InputError, match="chunk"): homography_warp(src, K_ref, K_src, T, hyps, chunk=0)


def test_feature_depth_hypotheses():
    dmin, dmax = torch.tensor([425.0, 2.0], dtype=DT), torch.tensor([935.0, 3.0], dtype=DT)
    for space in ("depth", "inverse"):
        h = depth_hypotheses(dmin, dmax, 48, 4, 5, space=space)
        assert h.shape == (2, 48, 4, 5) and h.dtype == DT
        assert torch.equal(h[:, 0, 0, 0], dmin) and torch.equal(h[:, -1, 0, 0], dmax)
        assert (h[:, 1:] > h[:, :-1]).all()  # strictly increasing along D
        assert torch.equal(h, h[:, :, :1, :1].expand_as(h))  # the same at every pixel
        step = h[:, 1:, 0, 0] - h[:, :-1, 0, 0] if space == "depth" else 1 / h[:, :-1, 0, 0] - 1 / h[:, 1:, 0, 0]
        assert_close(step, step[:, :1].expand_as(step), rtol=1e-9, atol=0)  # uniform in the chosen space
    inv = depth_hypotheses(dmin, dmax, 48, 1, 1, space="inverse")[:, :, 0, 0]
    lin = depth_hypotheses(dmin, dmax, 48, 1, 1)[:, :, 0, 0]
    assert (inv[:, 1:-1] < lin[:, 1:-1]).all()  # inverse spacing is denser near the camera
    assert_close(depth_hypotheses(torch.tensor([2.0]), torch.tensor([4.0]), 2, 1, 1)[0, :, 0, 0], torch.tensor([2.0, 4.0]))


@pytest.mark.parametrize("dmin,dmax,num,space,match", [
    ([3.0], [3.0], 8, "depth", "depth_min must be < depth_max"),
    ([4.0, 1.0], [3.0, 2.0], 8, "depth", "depth_min must be < depth_max"),
    ([0.0], [3.0], 8, "depth", "depth_min must be finite and > 0"),
    ([-1.0], [3.0], 8, "inverse", "depth_min must be finite and > 0"),
    ([1.0], [float("inf")], 8, "depth", "depth_max must be finite and > 0"),
    ([1.0], [3.0], 1, "depth", "at least 2"),
    ([1.0], [3.0], 8, "disparity", "'depth' or 'inverse'"),
])
def test_exception_depth_hypotheses(dmin, dmax, num, space, match):
    with pytest.raises(InputError, match=match):
        depth_hypotheses(torch.tensor(dmin), torch.tensor(dmax), num, 4, 5, space=space)


def test_feature_synthesis_onehot_and_mass_rule():
    torch.manual_seed(6)
    B, D, H, W = 2, 5, 8, 10
    K_ref, K_src, T = camera_pair(B, H, W)
    src = torch.rand(B, 3, H, W, dtype=DT)
    hyps = depth_hypotheses(torch.tensor([2.0, 2.5], dtype=DT), torch.tensor([5.0, 4.0], dtype=DT), D, H, W).contiguous()
    for k in range(D):  # a one-hot distribution at hypothesis k is the inverse warp at that depth
        onehot = F.one_hot(torch.full((B, H, W), k), D).permute(0, 3, 1, 2).to(DT)
        img, valid = probability_synthesis(onehot, src, K_ref, K_src, T, hyps)
        ref_img, ref_valid = inverse_warp(src, hyps[:, k:k + 1], K_ref, K_src, T)
        assert torch.equal(valid, ref_valid)
        assert_close(img, ref_img, atol=1e-12, rtol=0)
    # mass rule: plane 0 has no depth (invalid everywhere); valid ⇔ mass on valid planes ≥ min_valid_mass
    hyps[:, 0] = 0.0
    plane2, valid2 = inverse_warp(src, hyps[:, 2:3], K_ref, K_src, T)
    for p_bad, expect_valid in ((0.4, True), (0.5, True), (0.6, False)):
        prob = torch.zeros(B, D, H, W, dtype=DT)
        prob[:, 0], prob[:, 2] = p_bad, 1 - p_bad
        img, valid = probability_synthesis(prob, src, K_ref, K_src, T, hyps)
        assert torch.equal(valid, valid2 & expect_valid)
        assert_close(img, plane2 * (1 - p_bad) * expect_valid, atol=1e-12, rtol=0)  # invalid samples count as 0
        img_n, valid_n = probability_synthesis(prob, src, K_ref, K_src, T, hyps, renormalize=True)
        assert torch.equal(valid_n, valid)
        assert_close(img_n, plane2 * expect_valid, atol=1e-12, rtol=0)  # expectation over the valid planes
    img, valid = probability_synthesis(prob, src, K_ref, K_src, T, hyps, min_valid_mass=0.3)
    assert torch.equal(valid, valid2)
    with pytest.raises(InputError, match="min_valid_mass"):
        probability_synthesis(prob, src, K_ref, K_src, T, hyps, min_valid_mass=0.0)


# ---------------------------------------------------------------- gradients

def test_gradcheck_inverse_warp():
    torch.manual_seed(7)
    K_ref, K_src, T = camera_pair(1, 4, 5)
    depth = (2.5 + torch.rand(1, 1, 4, 5, dtype=DT)).requires_grad_()
    src = torch.rand(1, 1, 4, 5, dtype=DT, requires_grad=True)
    valid = inverse_warp(src, depth, K_ref, K_src, T)[1]
    assert 0.3 < valid.float().mean() < 1  # some samples are masked: the mask must not break gradients
    assert torch.autograd.gradcheck(lambda d, s: inverse_warp(s, d, K_ref, K_src, T)[0], (depth, src))


def test_gradcheck_homography_warp_and_synthesis():
    torch.manual_seed(8)
    K_ref, K_src, T = camera_pair(1, 3, 4)
    hyps = (2 + 2 * torch.rand(1, 3, 3, 4, dtype=DT)).requires_grad_()
    src = torch.rand(1, 1, 3, 4, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, s: homography_warp(s, K_ref, K_src, T, h, chunk=2)[0], (hyps, src))
    prob = torch.rand(1, 3, 3, 4, dtype=DT).softmax(1).requires_grad_()
    for renorm in (False, True):
        f = lambda p: probability_synthesis(p, src.detach(), K_ref, K_src, T, hyps.detach(), renormalize=renorm, min_valid_mass=0.05)[0]
        assert torch.autograd.gradcheck(f, (prob,))
    img, _ = probability_synthesis(prob, src, K_ref, K_src, T, hyps.detach())
    img.sum().backward()
    assert prob.grad is not None and prob.grad.abs().sum() > 0 and src.grad.abs().sum() > 0


# ---------------------------------------------------------------- shapes

def test_exception_shapes():
    K_ref, K_src, T = camera_pair(2)
    src, depth = torch.rand(2, 3, 8, 10, dtype=DT), torch.full((2, 1, 8, 10), 3.0, dtype=DT)
    hyps, prob = torch.full((2, 4, 8, 10), 3.0, dtype=DT), torch.full((2, 4, 8, 10), 0.25, dtype=DT)
    cases = [
        (lambda: inverse_warp(src[0], depth, K_ref, K_src, T), "src"),
        (lambda: inverse_warp(src, depth[:, 0], K_ref, K_src, T), "depth_ref"),
        (lambda: inverse_warp(src, depth.expand(2, 2, 8, 10), K_ref, K_src, T), "depth_ref"),
        (lambda: inverse_warp(src[:1], depth, K_ref, K_src, T), "src"),
        (lambda: inverse_warp(src, depth, K_ref[:1], K_src, T), "K_ref"),
        (lambda: inverse_warp(src, depth, K_ref, K_src[:, :2], T), "K_src"),
        (lambda: inverse_warp(src, depth, K_ref, K_src, T[:, :3]), "T_src_ref"),
        (lambda: homography_warp(src, K_ref, K_src, T, hyps[0]), "depth_hyps"),
        (lambda: homography_warp(src[:, :, None], K_ref, K_src, T, hyps), "src"),
        (lambda: homography_warp(src, K_ref, K_src, T[:1], hyps), "T_src_ref"),
        (lambda: probability_synthesis(prob[:, :3], src, K_ref, K_src, T, hyps), "depth_hyps"),
        (lambda: probability_synthesis(prob[:, :, :7], src, K_ref, K_src, T, hyps), "depth_hyps"),
        (lambda: probability_synthesis(prob[0], src, K_ref, K_src, T, hyps), "prob_volume"),
        (lambda: depth_hypotheses(torch.tensor([[1.0]]), torch.tensor([2.0]), 4, 2, 2), "depth_min"),
        (lambda: depth_hypotheses(torch.tensor([1.0, 1.0]), torch.tensor([2.0]), 4, 2, 2), "depth_max"),
    ]
    for fn, name in cases:
        with pytest.raises(ShapeError) as e: fn()
        assert str(e.value).startswith(name + ":"), (name, str(e.value))


# ---------------------------------------------------------------- references outside mvsnb

def test_feature_kornia():
    kgd = pytest.importorskip("kornia.geometry.depth")
    torch.manual_seed(9)
    B, H, W = 2, 8, 10
    K_ref, _, T = camera_pair(B, H, W)  # kornia uses one camera matrix for both views
    src = torch.rand(B, 3, H, W, dtype=DT)
    depth = 2 + 2 * torch.rand(B, 1, H, W, dtype=DT)
    ours, valid = inverse_warp(src, depth, K_ref, K_ref, T)
    theirs = kgd.warp_frame_depth(src, depth, T, K_ref)  # image_src, depth_dst, src_trans_dst (= T_src_ref)
    assert valid.float().mean() > 0.5 and not valid.all()
    m = valid.expand_as(ours)
    assert_close(ours[m], theirs[m], atol=1e-9, rtol=0)


def test_feature_synthetic_scene_gt():
    "Warping each source with the GT reference depth reproduces the reference on Lambertian, visible pixels."
    synthetic = pytest.importorskip("mvsnb.synthetic")
    scene = synthetic.make_scene(views=4, height=48, width=64, seed=0)
    V = scene.images.shape[0]
    ref_img, depth_ref = scene.images[:1].expand(V - 1, -1, -1, -1), scene.depth[:1].expand(V - 1, -1, -1, -1)
    K_ref, K_src = scene.K[:1].expand(V - 1, -1, -1), scene.K[1:]
    T = relative_pose(scene.w2c[1:], scene.w2c[:1].expand(V - 1, -1, -1))
    warped, valid = inverse_warp(scene.images[1:], depth_ref, K_ref, K_src, T)
    # occlusion: the point's z in the source must match the source's own GT depth there
    from mvsnb.camera import reproject
    uv, z = reproject(depth_ref, K_ref, K_src, T)
    src_depth, _ = sample_image(scene.depth[1:], uv.nan_to_num(-10.0), mode="nearest")
    visible = valid & (src_depth > 0) & ((z - src_depth).abs() < 0.01 * z)
    lamb = scene.valid[:1] & (scene.material[:1] == synthetic.LAMBERTIAN)
    keep = visible & lamb
    # also away from depth edges, where bilinear sampling mixes surfaces
    edge = F.max_pool2d(depth_ref, 3, 1, 1) - (-F.max_pool2d(-depth_ref, 3, 1, 1)) > 0.05 * depth_ref
    keep = keep & ~edge
    assert keep.float().mean() > 0.2, f"too few checkable pixels: {keep.float().mean():.2f}"
    err = (warped - ref_img).abs().mean(1, keepdim=True)
    assert err[keep].mean() < 0.03, f"mean |error| {err[keep].mean():.4f}"
    # and a wrong depth does not: the check can fail
    wrong, wvalid = inverse_warp(scene.images[1:], depth_ref * 1.1, K_ref, K_src, T)
    werr = (wrong - ref_img).abs().mean(1, keepdim=True)
    assert werr[keep & wvalid].mean() > 2 * err[keep].mean()
