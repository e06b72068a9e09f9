"""mvsnb.losses.div: occlusion masks (brute force, synthetic scene), weight normalisation, synthesis loss, view sampling."""
import itertools
import numpy as np
import pytest
import torch

from mvsnb.core import InputError, ShapeError
from mvsnb.camera import intrinsics, look_at, relative_pose, reproject, unproject, invert_pose
from mvsnb.losses.div import (DivConfig, ViewWeightNet, occlusion_masks, gt_visibility, occlusion_aware_weights,
                              synthesize_reference, div_synthesis_loss, sample_supervision_views)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


# ---------------------------------------------------------------- occlusion masks

def _tiny_scene(H=8, W=10):
    "Reference depth: a tilted backdrop with a near block; three source cameras around it (float64)."
    K = intrinsics(9.0, 9.5, 4.6, 3.4, dtype=torch.float64)
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    depth = 4.0 + 0.08 * u - 0.05 * v
    depth[2:6, 3:6] = 2.2 + 0.02 * u[2:6, 3:6]
    w2c_ref = torch.eye(4, dtype=torch.float64)
    eyes = torch.tensor([[-0.9, 0.2, 0.1], [0.8, -0.3, 0.0], [0.1, 0.9, -0.2]], dtype=torch.float64)
    w2c_src = look_at(eyes, torch.tensor([0., 0., 3.5], dtype=torch.float64).expand(3, 3), up=torch.tensor([0., -1., 0.], dtype=torch.float64))
    return depth[None, None], K, w2c_ref, w2c_src


def _brute_occlusion(depth, K, w2c_ref, K_src, w2c_src, tol, eps=1e-4):
    """Per reference pixel and source view, a Python loop over the quads of the reference depth grid: the nearest
    surface along the source ray through the projection (screen barycentrics for inclusion, ray-plane for depth)."""
    H, W = depth.shape[-2:]
    Kn, D = K.numpy(), depth[0, 0].numpy()
    X_ref = np.array([[D[i, j] * np.linalg.solve(Kn, [j, i, 1.0]) for j in range(W)] for i in range(H)])  # H,W,3 ref camera
    tris = []
    for i in range(H - 1):
        for j in range(W - 1):
            a, b, c, d = (i, j), (i, j + 1), (i + 1, j), (i + 1, j + 1)
            tris += [(a, b, c), (b, d, c)]
    out = np.zeros((len(w2c_src), H, W), dtype=bool)
    for n, T_w in enumerate(w2c_src):
        T = (T_w @ invert_pose(w2c_ref)).numpy()  # ref camera → source camera
        Ks = K_src[n].numpy()
        P = X_ref @ T[:3, :3].T + T[:3, 3]  # H,W,3 in the source camera
        UV = (P @ Ks.T)[..., :2] / P[..., 2:3]
        for i in range(H):
            for j in range(W):
                u, v = UV[i, j]; z = P[i, j, 2]
                if not (-1e-3 <= u <= W - 1 + 1e-3 and -1e-3 <= v <= H - 1 + 1e-3 and z > 0): continue
                u, v = min(max(u, 0), W - 1), min(max(v, 0), H - 1)
                ray = np.linalg.solve(Ks, [u, v, 1.0])
                best = np.inf
                for t in tris:
                    Q = np.array([P[p] for p in t]); q = np.array([UV[p] for p in t])
                    A = np.stack([q[1] - q[0], q[2] - q[0]], 1)
                    if abs(np.linalg.det(A)) < 1e-12 or (Q[:, 2] <= 0).any(): continue
                    l1, l2 = np.linalg.solve(A, np.array([u, v]) - q[0])
                    if min(1 - l1 - l2, l1, l2) < -eps: continue
                    nrm = np.cross(Q[1] - Q[0], Q[2] - Q[0])
                    best = min(best, nrm @ Q[0] / (nrm @ ray))
                out[n, i, j] = not (np.isfinite(best) and z > best + tol)
    return torch.from_numpy(out)


def test_feature_occlusion_masks_vs_bruteforce():
    depth, K, w2c_ref, w2c_src = _tiny_scene()
    K_src = K[None].expand(3, 3, 3)
    vis = occlusion_masks(depth, K[None], w2c_ref[None], K_src[None], w2c_src[None], tol=1e-3)
    ref = _brute_occlusion(depth, K, w2c_ref, K_src, w2c_src, tol=1e-3)
    assert vis.shape == (1, 3, 1, 8, 10) and vis.dtype == torch.bool
    assert (~ref).sum() > 10 and ref.sum() > 50  # some occluded/out-of-view and many visible pixels
    assert torch.equal(vis[0, :, 0], ref)


def test_feature_occlusion_masks_synthetic_scene():
    synthetic = pytest.importorskip("mvsnb.synthetic")
    s = synthetic.make_scene(views=5, height=48, width=64, seed=0)
    for r in (0, 3):
        src = [i for i, _ in s.pairs[r][1]][:4]
        args = (s.depth[[r]], s.K[[r]], s.w2c[[r]], s.K[src][None], s.w2c[src][None])
        # gt_visibility reads the sources' GT depth at the nearest pixel: on slanted surfaces that is off by up to
        # slope × half a pixel, so it needs ~1 % of the depth as tolerance to be right itself
        gt = gt_visibility(s.depth[[r]], s.K[[r]], s.w2c[[r]], s.depth[src][None], s.K[src][None], s.w2c[src][None], tol=0.05)
        vis = occlusion_masks(*args, tol=0.05)
        assert 0.05 < (~gt).float().mean() < 0.6  # the scene has real occlusions
        assert (vis == gt).float().mean() > 0.95
        # the exact read hardly depends on the tolerance (ε only absorbs round-off), unlike a nearest-pixel read
        tight = occlusion_masks(*args, tol=0.005)
        assert (tight == vis).float().mean() > 0.99
        assert (occlusion_masks(*args, tol=0.005, sample="nearest") == vis).float().mean() < 0.9


def test_feature_occlusion_masks_options():
    depth, K, w2c_ref, w2c_src = _tiny_scene(16, 20)
    K = K.float(); depth = depth.float(); w2c_ref = w2c_ref.float(); w2c_src = w2c_src.float()
    args = (depth, K[None], w2c_ref[None], K[None, None].expand(1, 3, 3, 3), w2c_src[None])
    base = occlusion_masks(*args, tol=1e-3)
    # grid-buffer reads approach the exact read once the tolerance covers their slope error (this view is oblique)
    agree = lambda how, tol: (occlusion_masks(*args, tol=tol, sample=how) == base).float().mean()
    assert agree("max", 0.05) > 0.95 and agree("nearest", 0.2) > 0.95 and agree("bilinear", 0.2) > 0.8
    assert agree("nearest", 0.05) < agree("nearest", 0.2)
    # a huge relative tolerance sees through everything: visible = lands inside the source image
    loose = occlusion_masks(*args, tol=0.0, tol_rel=10.0)
    assert (loose >= base).all() and loose.sum() > base.sum()
    # invalid reference pixels are never visible
    valid = torch.ones_like(depth, dtype=torch.bool); valid[..., :3, :] = False
    masked = occlusion_masks(*args, tol=1e-3, valid=valid)
    assert not masked[..., :3, :].any()
    # the view itself as a source: every valid pixel is visible
    self_vis = occlusion_masks(depth, K[None], w2c_ref[None], K[None, None], w2c_ref[None, None], tol=1e-4)
    assert self_vis.all()


def test_exception_occlusion_masks():
    depth, K, w2c_ref, w2c_src = _tiny_scene()
    with pytest.raises(ShapeError, match="K_src"):
        occlusion_masks(depth, K[None], w2c_ref[None], K[None], w2c_src[None], tol=1e-3)
    with pytest.raises(ShapeError, match="depth_ref"):
        occlusion_masks(depth[0], K[None], w2c_ref[None], K[None, None], w2c_src[None, :1], tol=1e-3)
    with pytest.raises(InputError, match="sample"):
        occlusion_masks(depth, K[None], w2c_ref[None], K[None, None], w2c_src[None, :1], tol=1e-3, sample="cubic")
    with pytest.raises(InputError, match="occ_sample"): DivConfig(occ_sample="linear")


@pytest.mark.cuda
def test_feature_cuda_occlusion_masks_match_cpu():
    depth, K, w2c_ref, w2c_src = _tiny_scene(16, 20)
    args = (depth.float(), K[None].float(), w2c_ref[None].float(), K[None, None].expand(1, 3, 3, 3).float(), w2c_src[None].float())
    cpu = occlusion_masks(*args, tol=1e-3)
    gpu = occlusion_masks(*[a.cuda() for a in args], tol=1e-3)
    assert gpu.is_cuda and (gpu.cpu() == cpu).float().mean() > 0.999


# ---------------------------------------------------------------- weights and synthesis

def test_feature_occlusion_aware_weights_by_hand():
    # pixel 0: views see it (T, F, T); pixel 1: (T, T, T); pixel 2: nobody
    w = torch.tensor([[0.2, 0.5, 0.1], [0.3, 0.25, 0.6], [0.5, 0.25, 0.3]]).reshape(1, 3, 1, 1, 3)
    m = torch.tensor([[True, True, False], [False, True, False], [True, True, False]]).reshape(1, 3, 1, 1, 3)
    w_o, M = occlusion_aware_weights(w, m)
    expect = torch.tensor([[0.2 / 0.7, 0.5, 0.0], [0.0, 0.25, 0.0], [0.5 / 0.7, 0.25, 0.0]]).reshape(1, 3, 1, 1, 3)
    torch.testing.assert_close(w_o, expect)
    assert M.reshape(-1).tolist() == [True, True, False]
    imgs = torch.tensor([1.0, 4.0, 10.0]).reshape(1, 3, 1, 1, 1).expand(1, 3, 1, 1, 3)
    torch.testing.assert_close(synthesize_reference(imgs, w_o).reshape(-1),
                               torch.tensor([(0.2 * 1 + 0.5 * 10) / 0.7, 0.5 * 1 + 0.25 * 4 + 0.25 * 10, 0.0]))


def test_gradcheck_synthesis_loss():
    g = torch.Generator().manual_seed(0)
    B, N, H, W = 1, 2, 5, 6
    warped = torch.rand(B, N, 3, H, W, generator=g, dtype=torch.float64).requires_grad_()
    weights = (torch.rand(B, N, 1, H, W, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    ref = torch.rand(B, 3, H, W, generator=g, dtype=torch.float64)
    valid = torch.rand(B, N, 1, H, W, generator=g) > 0.2
    visible = torch.rand(B, N, 1, H, W, generator=g) > 0.2
    f = lambda a, b: tuple(div_synthesis_loss(a, valid, ref, weights=b, visible=visible)[k] for k in ("photo", "ssim"))
    assert torch.autograd.gradcheck(f, (warped, weights), fast_mode=True)
    assert torch.autograd.gradcheck(lambda b: occlusion_aware_weights(b, visible)[0], (weights,))


def test_feature_synthesis_loss_values():
    g = torch.Generator().manual_seed(1)
    B, N, H, W = 2, 3, 12, 16
    ref = torch.rand(B, 3, H, W, generator=g)
    warped = ref[:, None].repeat(1, N, 1, 1, 1)
    valid = torch.ones(B, N, 1, H, W, dtype=torch.bool)
    uniform = lambda x: torch.full_like(x[:, :, :1], 1.0 / x.shape[1])
    out = div_synthesis_loss(warped, valid, ref, uniform)
    assert out["photo"].abs() < 1e-6 and out["ssim"].abs() < 1e-4
    # garbage in view 1 where it is marked invisible changes nothing; where it is visible, it does
    bad = warped.clone(); bad[:, 1, :, :6] = torch.rand(B, 3, 6, W, generator=g)
    visible = valid.clone(); visible[:, 1, :, :6] = False
    assert div_synthesis_loss(bad, valid, ref, uniform, visible=visible)["photo"].abs() < 1e-6
    noisy = div_synthesis_loss(bad, valid, ref, uniform)
    assert noisy["photo"] > 1e-3 and noisy["ssim"] > 1e-3
    # the scales of Eqs. 12–13 multiply the two terms
    scaled = div_synthesis_loss(bad, valid, ref, uniform, photo_scale=3.0, ssim_scale=4.0)
    torch.testing.assert_close(scaled["photo"], 3.0 * noisy["photo"]); torch.testing.assert_close(scaled["ssim"], 2.0 * noisy["ssim"])
    # nobody sees anything → zero loss, zero mask
    none = div_synthesis_loss(bad, torch.zeros_like(valid), ref, uniform)
    assert none["photo"] == 0 and not none["mask"].any()
    # reduction="none" gives maps; weights at another resolution are resized
    maps = div_synthesis_loss(bad, valid, ref, uniform, reduction="none")
    assert maps["photo"].shape == (B, 1, H, W) and maps["ssim"].shape == (B, 1, H - 2, W - 2)
    small = div_synthesis_loss(bad, valid, ref, weights=torch.full((B, N, 1, 3, 4), 1 / 3))
    torch.testing.assert_close(small["photo"], noisy["photo"])
    with pytest.raises(InputError, match="reduction"): div_synthesis_loss(bad, valid, ref, uniform, reduction="sum")
    with pytest.raises(ShapeError, match="visible"): div_synthesis_loss(bad, valid, ref, uniform, visible=visible[:, :2])


def test_feature_weight_net():
    torch.manual_seed(0)
    net = ViewWeightNet(4, channels=(8, 16, 32))
    x = torch.rand(2, 4, 3, 20, 28)
    w = net(x)
    assert w.shape == (2, 4, 1, 20, 28) and (w > 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(2, 1, 20, 28))
    seen = {}
    net.head.register_forward_hook(lambda m, i, o: seen.update(shape=tuple(o.shape)))
    net(x)
    assert seen["shape"] == (2, 4, 5, 7)  # logits at 1/4 resolution
    # the release layout: 3N → 16 → 32 → 64 → N by default
    d = ViewWeightNet(3)
    assert d.stem[0].in_channels == 9 and d.stem[0].out_channels == 16 and d.head.out_channels == 3
    assert d.down1[0][0].stride == (2, 2) and d.down2[0][0].out_channels == 64
    ref = torch.rand(2, 3, 20, 28)
    out = div_synthesis_loss(x, torch.ones(2, 4, 1, 20, 28, dtype=torch.bool), ref, net)
    (out["photo"] + out["ssim"]).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    with pytest.raises(ShapeError, match="N=4"): net(torch.rand(1, 3, 3, 20, 28))


# ---------------------------------------------------------------- supervision-view sampling

def _exact_ordered(scores, M, n):
    "P(ordered draw) for sequential sampling without replacement ∝ score among the top M."
    top = sorted(range(len(scores)), key=lambda i: -scores[i])[:M]
    probs = {}
    for seq in itertools.permutations(top, n):
        p, left = 1.0, sum(scores[i] for i in top)
        for i in seq:
            p *= scores[i] / left; left -= scores[i]
        probs[seq] = p
    return probs


def test_feature_view_sampling_distribution():
    scores = [0.5, 9.0, 7.0, 1.0, 6.0, 3.0, 2.0]
    exact = _exact_ordered(scores, M=4, n=2)
    assert abs(sum(exact.values()) - 1) < 1e-12
    g = torch.Generator().manual_seed(0)
    t = torch.tensor(scores)
    R = 12000
    counts = {}
    for _ in range(R):
        seq = tuple(sample_supervision_views(t, M=4, n=2, generator=g).tolist())
        counts[seq] = counts.get(seq, 0) + 1
    assert set(counts) <= set(exact)  # never a view outside the top 4, never a repeat
    for seq, p in exact.items():
        f = counts.get(seq, 0) / R
        assert abs(f - p) < 4.5 * np.sqrt(p * (1 - p) / R) + 1e-3, (seq, f, p)
    # a fixed seed reproduces the draw; n = M gives a permutation of the top M
    a = sample_supervision_views(t, 4, 3, torch.Generator().manual_seed(5))
    b = sample_supervision_views(t, 4, 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.dtype == torch.int64
    assert sorted(sample_supervision_views(t, 4, 4, g).tolist()) == [1, 2, 4, 5]


def test_exception_view_sampling():
    with pytest.raises(InputError, match="positive score"): sample_supervision_views(torch.tensor([2., 0., 0., 1.]), M=10, n=3)
    with pytest.raises(InputError, match="positive score"): sample_supervision_views(torch.tensor([5., 4., 3., 2.]), M=2, n=3)
    with pytest.raises(InputError, match=">= 0"): sample_supervision_views(torch.tensor([1., -1., 2.]), n=1)
    with pytest.raises(ShapeError): sample_supervision_views(torch.ones(2, 3), n=1)
