"""mvsnb.patchmatch against hand-written references: a per-pixel brute-force NCC cost and propagation on tiny
images, the plane-sweep warp of mvsnb.warp, explicit plane homographies, and the ground truth of a synthetic
scene (the issue-6 done-means: mean depth error on textured pixels within a few depth intervals)."""
import math
import time
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from mvsnb.core import ShapeError, InputError
from mvsnb.camera import look_at, relative_pose, inverse_intrinsics
from mvsnb.warp import homography_warp
from mvsnb.patchmatch import (PatchMatchConfig, PatchMatchHooks, PatchMatchState, prepare_context, window_coords,
                              plane_homography, photometric_cost, weighted_ncc, checkerboard_masks, propagation_pattern,
                              PATTERNS, propagation_candidates, neighbour_indices, plane_depth, select_best, patchmatch,
                              normals_to_camera, random_hypotheses, face_camera, evaluation_masks, depth_edges,
                              visibility_count, confidence, check_config)

DT = torch.float64
NUM_INTERVALS = 192  # depth interval = (depth_max - depth_min) / 192, DTU's plane count


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def rig(H=8, W=10, V=3, dtype=DT, seed=0):
    "A small forward-facing rig looking at z≈4 from a few centimetre-scale baselines, and random images."
    g = torch.Generator().manual_seed(seed)
    eyes = torch.tensor([[0.0, 0.0, 0.0], [0.45, 0.05, 0.1], [-0.35, 0.3, -0.05], [0.1, -0.4, 0.05]], dtype=dtype)[:V]
    targets = torch.tensor([[0.0, 0.0, 4.0], [0.1, 0.0, 4.0], [-0.1, 0.1, 4.0], [0.0, -0.1, 4.0]], dtype=dtype)[:V]
    w2c = look_at(eyes, targets, up=torch.tensor([0.0, -1.0, 0.0], dtype=dtype))  # reference ≈ identity pose
    K = torch.tensor([[9.0, 0, (W - 1) / 2 + 0.3], [0, 9.5, (H - 1) / 2 - 0.2], [0, 0, 1]], dtype=dtype).repeat(V, 1, 1)
    images = torch.rand(1, V, 3, H, W, generator=g, dtype=dtype)
    return images, K[None], w2c[None]


def random_planes(ctx, M, seed=1):
    "Depths in [3, 5] and normals within 60° of the direction to the camera, one per pixel."
    g = torch.Generator().manual_seed(seed)
    depth = 3 + 2 * torch.rand(1, 1, M, generator=g, dtype=ctx.rays.dtype)
    n = F.normalize(torch.randn(1, 3, 1, M, generator=g, dtype=ctx.rays.dtype) * 0.5 + torch.tensor([0, 0, -1.0], dtype=ctx.rays.dtype).reshape(1, 3, 1, 1), dim=1)
    return depth, face_camera(n, ctx.rays[:, :, None], 60.0)


# ---------------------------------------------------------------- brute-force references
def bilinear(img, u, v):
    "Bilinear sample of img (H,W) at a pixel centre coordinate inside [0,W-1]x[0,H-1]."
    H, W = img.shape
    x0, y0 = min(int(math.floor(u)), W - 2), min(int(math.floor(v)), H - 2)
    x0, y0 = max(x0, 0), max(y0, 0)
    a, b = u - x0, v - y0
    return ((1 - a) * (1 - b) * img[y0, x0] + a * (1 - b) * img[y0, x0 + 1]
            + (1 - a) * b * img[y0 + 1, x0] + a * b * img[y0 + 1, x0 + 1])


def brute_cost(images, K, w2c, depth, normal, cfg):
    "Per-pixel, per-view, per-sample Python loops: cost (M,) and view costs (S,M) of one hypothesis per pixel."
    _, V, _, H, W = images.shape
    gray = (images[0] * torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).reshape(3, 1, 1)).sum(1)  # V,H,W
    Kinv = torch.linalg.inv(K[0, 0])
    r = cfg.window // 2
    offs = [(du * cfg.dilation, dv * cfg.dilation) for dv in range(-r, r + 1) for du in range(-r, r + 1)]
    costs, view_costs = [], []
    for p in range(H * W):
        y, x = divmod(p, W)
        d, n = float(depth[p]), normal[:, p]
        rho = d * float(n @ (Kinv @ torch.tensor([x, y, 1.0], dtype=DT)))
        per_view = []
        for s in range(1, V):
            T = w2c[0, s] @ torch.linalg.inv(w2c[0, 0])
            ws, a_s, b_s, wall = [], [], [], 0.0
            for du, dv in offs:
                qx, qy = x + du, y + dv
                if not (0 <= qx < W and 0 <= qy < H): continue
                w = math.exp(-(float(gray[0, qy, qx] - gray[0, y, x]) ** 2) / (2 * cfg.sigma_color ** 2)
                             - (du * du + dv * dv) / (2 * cfg.sigma_spatial ** 2))
                wall += w
                ray = Kinv @ torch.tensor([qx, qy, 1.0], dtype=DT)
                z = rho / float(n @ ray)
                if z <= 0: continue
                Xs = T[:3, :3] @ (z * ray) + T[:3, 3]
                if Xs[2] <= 0: continue
                uvw = K[0, s] @ Xs
                u, v = float(uvw[0] / uvw[2]), float(uvw[1] / uvw[2])
                if not (0 <= u <= W - 1 and 0 <= v <= H - 1): continue
                ws.append(w); a_s.append(float(gray[0, qy, qx])); b_s.append(float(bilinear(gray[s], u, v)))
            sw = sum(ws)
            if sw < cfg.min_view_weight * wall or sw == 0:
                per_view.append(cfg.invalid_cost); continue
            ma = sum(w * a for w, a in zip(ws, a_s)) / sw; mb = sum(w * b for w, b in zip(ws, b_s)) / sw
            va = sum(w * (a - ma) ** 2 for w, a in zip(ws, a_s)) / sw
            vb = sum(w * (b - mb) ** 2 for w, b in zip(ws, b_s)) / sw
            cov = sum(w * (a - ma) * (b - mb) for w, a, b in zip(ws, a_s, b_s)) / sw
            ncc = max(-1.0, min(1.0, cov / math.sqrt((va + cfg.ncc_eps) * (vb + cfg.ncc_eps))))
            per_view.append(1 - ncc)
        k = min(cfg.top_k, V - 1)
        costs.append(sum(sorted(per_view)[:k]) / k); view_costs.append(per_view)
    return torch.tensor(costs, dtype=DT), torch.tensor(view_costs, dtype=DT).T


@pytest.mark.parametrize("window,dilation,top_k", [(3, 2, 1), (5, 1, 2)])
def test_feature_ncc_cost_matches_brute_force(window, dilation, top_k):
    images, K, w2c = rig(V=3)
    cfg = PatchMatchConfig(window=window, dilation=dilation, top_k=top_k)
    ctx = prepare_context(images, K, w2c, torch.tensor([2.0], dtype=DT), torch.tensor([6.0], dtype=DT), cfg)
    M = 80
    depth, normal = random_planes(ctx, M)
    cost, view_cost = photometric_cost(ctx, torch.arange(M), depth, normal)
    ref_cost, ref_view = brute_cost(images, K, w2c, depth[0, 0], normal[0, :, 0], cfg)
    assert (ref_view == cfg.invalid_cost).any() and (ref_view < cfg.invalid_cost).sum() > 40  # both cases exercised
    assert_close(view_cost[0, :, 0], ref_view, atol=1e-9, rtol=0)
    assert_close(cost[0, 0], ref_cost, atol=1e-9, rtol=0)


def test_feature_weighted_ncc_identities():
    g = torch.Generator().manual_seed(0)
    a, w = torch.rand(4, 25, 6, generator=g, dtype=DT), torch.rand(4, 25, 6, generator=g, dtype=DT)
    assert_close(weighted_ncc(a, 2 * a + 0.3, w, eps=1e-15), torch.ones(4, 6, dtype=DT))
    assert_close(weighted_ncc(a, -a, w, eps=1e-15), -torch.ones(4, 6, dtype=DT))
    w0 = w.clone(); w0[:, 3] = 0  # a zero weight removes the sample
    b = torch.rand(4, 25, 6, generator=g, dtype=DT)
    b2 = b.clone(); b2[:, 3] = 100.0
    assert_close(weighted_ncc(a, b, w0), weighted_ncc(a, b2, w0))
    assert_close(weighted_ncc(a, torch.full_like(a, 0.5), w), torch.zeros(4, 6, dtype=DT))  # flat: no correlation


# ---------------------------------------------------------------- homographies
def test_feature_window_coords_match_explicit_homography():
    images, K, w2c = rig(H=8, W=10, V=3)
    ctx = prepare_context(images, K, w2c, torch.tensor([2.0], dtype=DT), torch.tensor([6.0], dtype=DT),
                          PatchMatchConfig(window=3, dilation=2))
    M = 80
    depth, normal = random_planes(ctx, M, seed=5)
    uv, valid = window_coords(ctx, torch.arange(M), depth, normal)  # 1,S,2,1,W2,M
    n = normal[0, :, 0].T  # M,3
    rho = depth[0, 0] * (n * ctx.rays[0].T).sum(1)
    for s in range(2):
        Hs = plane_homography(ctx.K_ref[0], ctx.K_src[0, s], ctx.T_src_ref[0, s], n, rho)  # M,3,3
        for m in range(M):
            y, x = divmod(m, 10)
            q = torch.stack([x + ctx.offsets[:, 0], y + ctx.offsets[:, 1], torch.ones(9, dtype=DT)])  # 3,W2
            h = Hs[m] @ q
            ok = valid[0, s, 0, :, m]
            assert_close(uv[0, s, :, 0, :, m][:, ok], (h[:2] / h[2:])[:, ok], atol=1e-9, rtol=1e-9)


def test_feature_fronto_parallel_window_equals_plane_sweep():
    H, W = 8, 10
    images, K, w2c = rig(H, W, V=3)
    ctx = prepare_context(images, K, w2c, torch.tensor([2.0], dtype=DT), torch.tensor([6.0], dtype=DT),
                          PatchMatchConfig(window=3, dilation=1))
    from mvsnb.core import sample_image
    d = 4.3
    fronto = torch.tensor([0, 0, -1.0], dtype=DT).reshape(1, 3, 1, 1).expand(1, 3, 1, H * W)
    uv, valid = window_coords(ctx, torch.arange(H * W), torch.full((1, 1, H * W), d, dtype=DT), fronto)
    checked = 0
    for s in range(2):
        warped, ok = homography_warp(ctx.gray_src[:, s], ctx.K_ref, ctx.K_src[:, s], ctx.T_src_ref[:, s],
                                     torch.full((1, 1, H, W), d, dtype=DT))
        for k, (du, dv) in enumerate(ctx.offsets.long().tolist()):
            vals, inside = sample_image(ctx.gray_src[:, s], uv[:, s, :, 0, k].reshape(1, 2, H, W))
            for y in range(H):
                for x in range(W):
                    qx, qy = x + du, y + dv
                    if not (0 <= qx < W and 0 <= qy < H): continue
                    if not (inside[0, 0, y, x] and valid[0, s, 0, k, y * W + x] and ok[0, 0, 0, qy, qx]): continue
                    assert abs(float(vals[0, 0, y, x] - warped[0, 0, 0, qy, qx])) < 1e-9
                    checked += 1
    assert checked > 300


# ---------------------------------------------------------------- checkerboard and propagation
@pytest.mark.parametrize("H,W", [(1, 1), (5, 7), (8, 10)])
def test_feature_checkerboard_masks_partition(H, W):
    red, black = checkerboard_masks(H, W)
    assert not (red & black).any() and (red | black).all()
    assert abs(int(red.sum()) - int(black.sum())) <= 1
    for name in PATTERNS:  # every propagation offset leads to the other colour
        for region in PATTERNS[name]:
            for dy, dx in region:
                for y in range(H):
                    for x in range(W):
                        if 0 <= y + dy < H and 0 <= x + dx < W: assert red[y, x] != red[y + dy, x + dx]


def test_feature_propagation_candidates_match_brute_force():
    H, W = 8, 10
    images, K, w2c = rig(H, W, V=3)
    for pattern in ("acmh", "gipuma", [[(0, 1), (2, 1)], [(-3, 0)]]):
        ctx = prepare_context(images, K, w2c, torch.tensor([2.0], dtype=DT), torch.tensor([6.0], dtype=DT),
                              PatchMatchConfig(pattern=pattern))
        g = torch.Generator().manual_seed(2)
        depth, normal = random_hypotheses(ctx, torch.arange(H * W), 1, g)
        state = PatchMatchState(depth.reshape(1, 1, H, W), normal[:, :, 0].reshape(1, 3, H, W),
                                torch.rand(1, 1, H, W, generator=g, dtype=DT), torch.zeros(1, 2, H, W, dtype=DT),
                                torch.zeros(1, 1, H, W, dtype=DT))
        idx = checkerboard_masks(H, W)[1].flatten().nonzero()[:, 0]
        cd, cn, cv = propagation_candidates(ctx, state, idx)
        Kinv = torch.linalg.inv(K[0, 0])
        for m, p in enumerate(idx.tolist()):
            y, x = divmod(p, W)
            rp = Kinv @ torch.tensor([x, y, 1.0], dtype=DT)
            for r, region in enumerate(propagation_pattern(pattern)):
                inside = [(y + dy, x + dx) for dy, dx in region if 0 <= y + dy < H and 0 <= x + dx < W]
                if not inside: assert not cv[0, r, m]; continue
                qy, qx = min(inside, key=lambda q: float(state.cost[0, 0, q[0], q[1]]))
                nq, dq = state.normal[0, :, qy, qx], float(state.depth[0, 0, qy, qx])
                rq = Kinv @ torch.tensor([qx, qy, 1.0], dtype=DT)
                if float(nq @ rp) >= 0: assert not cv[0, r, m]; continue
                d = dq * float(nq @ rq) / float(nq @ rp)
                assert bool(cv[0, r, m]) == (2.0 <= d <= 6.0)
                if cv[0, r, m]:
                    assert abs(float(cd[0, r, m]) - d) < 1e-9
                    assert_close(cn[0, :, r, m], nq)


def test_feature_plane_depth_keeps_the_plane():
    g = torch.Generator().manual_seed(3)
    rq, rp = torch.randn(1, 3, 50, generator=g, dtype=DT), torch.randn(1, 3, 50, generator=g, dtype=DT)
    rq[:, 2], rp[:, 2] = 1.0, 1.0
    n = F.normalize(torch.randn(1, 3, 50, generator=g, dtype=DT), dim=1)
    dq = 2 + torch.rand(1, 50, generator=g, dtype=DT)
    dp = plane_depth(dq, n, rq, rp)
    front = (n * rp).sum(1) < 0
    assert front.any() and (~front).any()
    assert torch.isnan(dp[~front]).all()
    assert_close(((n * rp).sum(1) * dp)[front], ((n * rq).sum(1) * dq)[front])  # nᵀX_p = nᵀX_q = ρ


def test_feature_select_best_keeps_minimum():
    H, W = 8, 10
    images, K, w2c = rig(H, W, V=3)
    ctx = prepare_context(images, K, w2c, torch.tensor([2.0], dtype=DT), torch.tensor([6.0], dtype=DT))
    g = torch.Generator().manual_seed(4)
    idx = torch.arange(H * W)
    d0, n0 = random_hypotheses(ctx, idx, 1, g)
    c0, v0 = photometric_cost(ctx, idx, d0, n0)
    state = PatchMatchState(d0.reshape(1, 1, H, W).clone(), n0[:, :, 0].reshape(1, 3, H, W).clone(),
                            c0.reshape(1, 1, H, W).clone(), v0[:, :, 0].reshape(1, 2, H, W).clone(), torch.zeros(1, 1, H, W, dtype=DT))
    d, n = random_hypotheses(ctx, idx, 4, g)
    valid = torch.rand(1, 4, H * W, generator=g) > 0.3
    changed = select_best(ctx, state, idx, d, n, valid)
    c, _ = photometric_cost(ctx, idx, d, n)
    c = torch.where(valid, c, torch.full_like(c, float("inf")))
    expect = torch.minimum(c.min(1).values, c0[:, 0])
    assert_close(state.cost.flatten(1), expect)
    assert_close(changed, c.min(1).values < c0[:, 0])
    best = c.argmin(1)
    assert_close(state.depth.flatten(1)[changed], d.gather(1, best[:, None])[:, 0][changed])


# ---------------------------------------------------------------- on the synthetic scene
@pytest.fixture(scope="module")
def scene():
    from mvsnb.synthetic import make_scene
    return make_scene(views=5, height=64, width=80, seed=0)


@pytest.fixture(scope="module")
def result(scene):
    b = scene.mvs_batch(0)
    old = torch.get_num_threads(); torch.set_num_threads(1)
    t = time.perf_counter()
    out = patchmatch(b["images"], b["K"], b["w2c"], b["depth_min"], b["depth_max"], seed=0)
    torch.set_num_threads(old)
    return out, time.perf_counter() - t


def test_feature_gt_normals_face_the_camera(scene):
    b = scene.mvs_batch(0)
    n = normals_to_camera(scene.normal[:1], scene.w2c[:1])
    ctx = prepare_context(b["images"], b["K"], b["w2c"], b["depth_min"], b["depth_max"])
    facing = (n.flatten(2) * ctx.rays).sum(1) < 0
    assert facing[b["valid"].flatten(1)].float().mean() > 0.99


def test_feature_gt_hypotheses_beat_random(scene):
    from mvsnb.synthetic import LAMBERTIAN
    b = scene.mvs_batch(0)
    ctx = prepare_context(b["images"], b["K"], b["w2c"], b["depth_min"], b["depth_max"])
    masks = evaluation_masks(scene)
    idx = masks["textured"].flatten().nonzero()[:, 0]
    n_gt = normals_to_camera(scene.normal[:1], scene.w2c[:1]).flatten(2)[:, :, None, idx]
    gt_cost, _ = photometric_cost(ctx, idx, b["depth"].flatten(2)[:, :, idx], n_gt)
    d_r, n_r = random_hypotheses(ctx, idx, 4, torch.Generator().manual_seed(0))
    rand_cost, _ = photometric_cost(ctx, idx, d_r, n_r)
    assert (gt_cost[0, 0] < rand_cost[0].min(0).values).float().mean() > 0.85
    assert gt_cost.mean() < 0.5 * rand_cost.mean()


def test_feature_depth_accuracy_on_synthetic_scene(scene, result):
    "Issue 6 done-means: mean |depth error| on textured, visible, non-boundary pixels within a few intervals."
    out, seconds = result
    b = scene.mvs_batch(0)
    interval = (scene.depth_max - scene.depth_min) / NUM_INTERVALS
    err = (out["depth"] - b["depth"]).abs() / interval
    masks = evaluation_masks(scene)
    textured, textureless = err[masks["textured"]], err[masks["textureless"]]
    print(f"\npatchmatch 64x80, 4 sources, 5 sweeps: {seconds:.1f} s; mean |error| in intervals: "
          f"textured {textured.mean():.2f} ({len(textured)} px), textureless {textureless.mean():.2f} ({len(textureless)} px)")
    assert len(textured) > 1000 and len(textureless) > 300
    assert textured.mean() < 3.0
    assert textureless.mean() > 3 * textured.mean()  # NCC has no signal there: what ElasticMVS improves
    assert out["conf"][masks["textured"]].mean() > out["conf"][masks["textureless"]].mean() + 0.3
    assert seconds < 15


def test_feature_outputs(scene, result):
    out, _ = result
    assert out["depth"].shape == (1, 1, 64, 80) and out["normal"].shape == (1, 3, 64, 80)
    assert out["cost"].shape == out["conf"].shape == (1, 1, 64, 80) and out["view_cost"].shape == (1, 4, 64, 80)
    assert ((out["depth"] >= scene.depth_min) & (out["depth"] <= scene.depth_max)).all()
    assert_close(out["normal"].norm(dim=1), torch.ones(1, 64, 80), atol=1e-4, rtol=0)
    ctx = prepare_context(*[scene.mvs_batch(0)[k] for k in ("images", "K", "w2c", "depth_min", "depth_max")])
    assert ((out["normal"].flatten(2) * ctx.rays).sum(1) < 0).all()  # facing the camera
    assert ((out["cost"] >= 0) & (out["cost"] <= 2)).all()
    assert_close(out["conf"], (1 - out["cost"]).clamp(0, 1))
    assert_close(confidence(out["cost"], PatchMatchConfig(conf="exp", conf_sigma=0.5)), torch.exp(-2 * out["cost"]))


# ---------------------------------------------------------------- determinism, hooks, chunking
def small_args(seed=1):
    from mvsnb.synthetic import make_scene
    b = make_scene(views=3, height=24, width=30, seed=seed).mvs_batch(0)
    return [b[k] for k in ("images", "K", "w2c", "depth_min", "depth_max")]


def test_feature_determinism_and_seed():
    args = small_args(); cfg = PatchMatchConfig(iterations=2)
    a, b, c = patchmatch(*args, cfg, seed=7), patchmatch(*args, cfg, seed=7), patchmatch(*args, cfg, seed=8)
    for k in a: assert torch.equal(a[k], b[k])
    assert not torch.equal(a["depth"], c["depth"])
    ch = patchmatch(*args, PatchMatchConfig(iterations=2, chunk=101), seed=7)
    assert_close(ch["depth"], a["depth"], atol=1e-5, rtol=1e-5)


def test_feature_hooks():
    args = small_args(); cfg = PatchMatchConfig(iterations=2)
    pulled = patchmatch(*args, cfg, hooks=PatchMatchHooks(extra_cost=lambda c, s, i, d, n: 10 * (d - 4.0).abs()))
    assert (pulled["depth"] - 4.0).abs().median() < 0.1
    seen, sweeps = [], []
    def veto(ctx, state, idx, nbr, valid):
        seen.append((tuple(nbr.shape), tuple(valid.shape), len(idx))); return torch.zeros_like(valid)
    hooks = PatchMatchHooks(candidate_filter=veto, on_sweep=lambda ctx, state, it: sweeps.append(it))
    vetoed = patchmatch(*args, cfg, hooks=hooks)
    assert sweeps == [-1, 0, 1] and len(seen) == 4
    assert seen[0][0][:2] == (8, 11) and seen[0][1] == (1, 8, 11, seen[0][2])
    plain = patchmatch(*args, cfg)
    assert not torch.equal(vetoed["depth"], plain["depth"])


def test_feature_neighbours_hook_and_features():
    "A `neighbours` hook replaces the pattern (same-colour offsets allowed); `features=` reaches the hooks' context."
    H, W = 8, 10
    images, K, w2c = rig(H, W, V=3)
    ctx = prepare_context(images, K, w2c, torch.tensor([2.0], dtype=DT), torch.tensor([6.0], dtype=DT))
    g = torch.Generator().manual_seed(2)
    depth, normal = random_hypotheses(ctx, torch.arange(H * W), 1, g)
    state = PatchMatchState(depth.reshape(1, 1, H, W), normal[:, :, 0].reshape(1, 3, H, W),
                            torch.rand(1, 1, H, W, generator=g, dtype=DT), torch.zeros(1, 2, H, W, dtype=DT),
                            torch.zeros(1, 1, H, W, dtype=DT))
    idx = checkerboard_masks(H, W)[0].flatten().nonzero()[:, 0]
    def two_right(ctx, state, idx, generator):  # one region: the pixel two to the right (same colour)
        x = idx % ctx.shape[3] + 2
        return (idx + 2).clamp(max=ctx.shape[2] * ctx.shape[3] - 1)[None, None], (x < ctx.shape[3])[None, None]
    cd, cn, cv = propagation_candidates(ctx, state, idx, PatchMatchHooks(neighbours=two_right))
    assert cd.shape == (1, 1, len(idx))
    Kinv = torch.linalg.inv(K[0, 0])
    for m, p in enumerate(idx.tolist()):
        y, x = divmod(p, W)
        if x + 2 >= W: assert not cv[0, 0, m]; continue
        nq, dq = state.normal[0, :, y, x + 2], float(state.depth[0, 0, y, x + 2])
        rp, rq = Kinv @ torch.tensor([x, y, 1.0], dtype=DT), Kinv @ torch.tensor([x + 2, y, 1.0], dtype=DT)
        if float(nq @ rp) >= 0: assert not cv[0, 0, m]; continue
        d = dq * float(nq @ rq) / float(nq @ rp)
        assert bool(cv[0, 0, m]) == (2.0 <= d <= 6.0)
        if cv[0, 0, m]: assert abs(float(cd[0, 0, m]) - d) < 1e-9
    seen = []
    hooks = PatchMatchHooks(neighbours=lambda c, s, i, gen: (seen.append(c.features["tag"]), two_right(c, s, i, gen))[1])
    patchmatch(*small_args(), PatchMatchConfig(iterations=1), hooks=hooks, features={"tag": 7})
    assert seen == [7, 7]  # one call per half-sweep, with the features given to patchmatch


def test_feature_init_is_used():
    args = small_args(); cfg = PatchMatchConfig(iterations=0, num_init=1)
    first = patchmatch(*args, PatchMatchConfig(iterations=3))
    again = patchmatch(*args, cfg, seed=5, init=(first["depth"], first["normal"]))
    assert (again["cost"] <= first["cost"] + 1e-3).all()  # float32 rounding; the given start is kept unless a random plane beats it


def test_feature_depth_edges_brute_force():
    d = torch.full((1, 1, 6, 7), 4.0)
    d[..., 2:4, 3:5] = 3.0
    d[..., 5, 0] = 4.1  # a 2.5 % step: not a discontinuity at rel=0.05
    edges = depth_edges(d, radius=1, rel=0.05)
    def jump(y, x, y2, x2):
        a, b = float(d[0, 0, y, x]), float(d[0, 0, y2, x2])
        return abs(a - b) > 0.05 * min(a, b)
    for y in range(6):
        for x in range(7):
            expect = any(jump(yy, xx, y2, x2)
                         for yy in range(max(y - 1, 0), min(y + 2, 6)) for xx in range(max(x - 1, 0), min(x + 2, 7))
                         for y2, x2 in ((yy + 1, xx), (yy - 1, xx), (yy, xx + 1), (yy, xx - 1)) if 0 <= y2 < 6 and 0 <= x2 < 7)
            assert bool(edges[0, 0, y, x]) == expect
    assert edges.any() and not edges.all()


def test_feature_visibility_count_brute_force():
    H, W = 8, 10
    _, K, w2c = rig(H, W, V=3, dtype=torch.float32)
    plane_ref = torch.full((1, 1, H, W), 4.0)  # the plane z = 4 of the reference camera, seen by every view
    Kinv = torch.linalg.inv(K[0, 0])
    depth_src = torch.zeros(1, 2, 1, H, W)
    for s in (1, 2):
        T_ref_src = w2c[0, 0] @ torch.linalg.inv(w2c[0, s])
        C, Rt = T_ref_src[:3, 3], T_ref_src[:3, :3]
        for y in range(H):
            for x in range(W):
                ray = Rt @ (torch.linalg.inv(K[0, s]) @ torch.tensor([x, y, 1.0]))  # z = 1 in the source frame
                depth_src[0, s - 1, 0, y, x] = (4.0 - C[2]) / ray[2]  # source z-depth of the plane point
    count = visibility_count(plane_ref, depth_src, K, w2c)
    for y in range(H):
        for x in range(W):
            X = 4.0 * (Kinv @ torch.tensor([x, y, 1.0]))
            n = 0
            for s in (1, 2):
                T = w2c[0, s] @ torch.linalg.inv(w2c[0, 0])
                uvw = K[0, s] @ (T[:3, :3] @ X + T[:3, 3])
                u, v = float(uvw[0] / uvw[2]), float(uvw[1] / uvw[2])
                n += int(0 <= u <= W - 1 and 0 <= v <= H - 1)
            assert int(count[0, 0, y, x]) == n
    assert count.min() < 2 and count.max() == 2
    assert (visibility_count(plane_ref, depth_src + 1.0, K, w2c) == 0).all()  # something in front: occluded


def test_feature_batch_of_two_matches_single_items():
    from mvsnb.synthetic import make_scene
    b0, b1 = make_scene(views=3, height=24, width=30, seed=1).mvs_batch(0), make_scene(views=3, height=24, width=30, seed=2).mvs_batch(1)
    cat = {k: torch.cat([b0[k], b1[k]]) for k in ("images", "K", "w2c", "depth_min", "depth_max")}
    ctx2 = prepare_context(*cat.values())
    idx = torch.arange(24 * 30)
    d, n = random_hypotheses(ctx2, idx, 3, torch.Generator().manual_seed(0))
    cost2, view2 = photometric_cost(ctx2, idx, d, n)
    for i, b in enumerate((b0, b1)):
        ctx = prepare_context(*[b[k] for k in ("images", "K", "w2c", "depth_min", "depth_max")])
        cost, view = photometric_cost(ctx, idx, d[i:i + 1], n[i:i + 1])
        assert_close(cost2[i:i + 1], cost, atol=1e-5, rtol=1e-5); assert_close(view2[i:i + 1], view, atol=1e-5, rtol=1e-5)
    out = patchmatch(*cat.values(), PatchMatchConfig(iterations=2))
    assert out["depth"].shape == (2, 1, 24, 30) and out["view_cost"].shape == (2, 2, 24, 30)
    for i in range(2):
        assert ((out["depth"][i] >= cat["depth_min"][i]) & (out["depth"][i] <= cat["depth_max"][i])).all()


# ---------------------------------------------------------------- errors
def test_exception_shapes_and_values():
    args = small_args()
    with pytest.raises(ShapeError, match="images"): patchmatch(args[0][0], *args[1:])
    with pytest.raises(ShapeError, match="K"): patchmatch(args[0], args[1][:, :2], *args[2:])
    with pytest.raises(InputError, match="at least one source"):
        patchmatch(args[0][:, :1], args[1][:, :1], args[2][:, :1], *args[3:])
    with pytest.raises(InputError, match="depth_min < depth_max"): patchmatch(*args[:3], args[4], args[3])
    with pytest.raises(InputError, match=r"\[window\]"): patchmatch(*args, PatchMatchConfig(window=4))
    with pytest.raises(InputError, match=r"\[top_k\]"): check_config(PatchMatchConfig(top_k=0))
    with pytest.raises(InputError, match="unknown pattern"): check_config(PatchMatchConfig(pattern="hex"))
    with pytest.raises(InputError, match="even"): check_config(PatchMatchConfig(pattern=[[(0, 2)]]))
    with pytest.raises(ShapeError, match="init depth"):
        patchmatch(*args, PatchMatchConfig(iterations=0), init=(torch.ones(1, 1, 5, 5), torch.ones(1, 3, 24, 30)))


@pytest.mark.cuda
def test_cuda_matches_cpu_statistically():
    args = small_args()
    cpu = patchmatch(*args, PatchMatchConfig(iterations=3))
    gpu = patchmatch(*[a.cuda() for a in args], PatchMatchConfig(iterations=3))
    assert gpu["depth"].device.type == "cuda"
    assert abs(float(gpu["cost"].mean().cpu() - cpu["cost"].mean())) < 0.05  # different random streams, same quality
