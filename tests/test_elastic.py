"""mvsnb.elastic against hand-computed values and per-pixel brute-force loops: the SNN contrastive and concentration
losses, neighbour sampling, positive sets, the part-propagation filter, the part smoothness and correspondence
terms, the region metrics, and a smoke run of part-aware PatchMatch (issue 6)."""
import math
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from mvsnb.core import InputError, ShapeError
from mvsnb.camera import look_at, relative_pose
from mvsnb.patchmatch import (PatchMatchState, PatchMatchConfig, prepare_context, neighbour_indices, propagation_pattern,
                              propagation_candidates, face_camera)
from mvsnb.elastic import (ElasticConfig, elastic_preset, positive_threshold, EmbeddingNet, embed_views, neighbour_offsets,
                           sample_neighbours, camera_points, positive_sets, snn_loss, concentration_loss, elastic_loss,
                           train_embedding, PartAwareConfig, part_aware_preset, part_candidates, correspondence_cost,
                           smoothness_cost, part_aware_hooks, part_aware_patchmatch, view_batches, region_metrics,
                           check_part_aware_config, sampled_neighbours)

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


# ---------------------------------------------------------------- fixtures
def rig(H=8, W=10, V=3, dtype=DT, seed=0):
    "A small forward-facing rig looking at z≈4, random images."
    g = torch.Generator().manual_seed(seed)
    eyes = torch.tensor([[0.0, 0.0, 0.0], [0.45, 0.05, 0.1], [-0.35, 0.3, -0.05]], dtype=dtype)[:V]
    targets = torch.tensor([[0.0, 0.0, 4.0], [0.1, 0.0, 4.0], [-0.1, 0.1, 4.0]], dtype=dtype)[:V]
    w2c = look_at(eyes, targets, up=torch.tensor([0.0, -1.0, 0.0], dtype=dtype))
    K = torch.tensor([[9.0, 0, (W - 1) / 2 + 0.3], [0, 9.5, (H - 1) / 2 - 0.2], [0, 0, 1]], dtype=dtype).repeat(V, 1, 1)
    images = torch.rand(1, V, 3, H, W, generator=g, dtype=dtype)
    return images, K[None], w2c[None]


def context_and_state(H=8, W=10, D=6, seed=0, two_parts=True):
    "A PatchMatch context with embeddings (two parts: left/right halves, or random) and a random current state."
    images, K, w2c = rig(H, W)
    g = torch.Generator().manual_seed(seed)
    ctx = prepare_context(images, K, w2c, torch.tensor([3.0], dtype=DT), torch.tensor([5.0], dtype=DT))
    V = images.shape[1]
    if two_parts:
        base = F.normalize(torch.randn(2, D, generator=g, dtype=DT), dim=1)
        part = (torch.arange(W) >= W // 2).long().expand(H, W)  # 0 left, 1 right
        z = base[part].permute(2, 0, 1) + 0.03 * torch.randn(D, H, W, generator=g, dtype=DT)
        emb = F.normalize(z, dim=0)[None, None].expand(1, V, D, H, W).clone()
        emb[:, 1:] = F.normalize(emb[:, 1:] + 0.1 * torch.randn(1, V - 1, D, H, W, generator=g, dtype=DT), dim=2)
    else:
        emb = F.normalize(torch.randn(1, V, D, H, W, generator=g, dtype=DT), dim=2)
    ctx.features["embedding"] = emb
    depth = 3.5 + torch.rand(1, 1, H, W, generator=g, dtype=DT)
    n = F.normalize(torch.tensor([0, 0, -1.0], dtype=DT).reshape(1, 3, 1, 1) + 0.3 * torch.randn(1, 3, H, W, generator=g, dtype=DT), dim=1)
    n = face_camera(n.flatten(2), ctx.rays, 80.0).reshape(1, 3, H, W)
    cost = 2 * torch.rand(1, 1, H, W, generator=g, dtype=DT)  # confidence clamp(1 - cost) spans [0, 1]
    state = PatchMatchState(depth, n, cost, torch.zeros(1, 2, H, W, dtype=DT), torch.zeros(1, 1, H, W, dtype=DT))
    return ctx, state


def bilinear(img, u, v):
    "img (C,H,W) at pixel (u, v) inside the image."
    C, H, W = img.shape
    x0, y0 = max(min(int(math.floor(u)), W - 2), 0), max(min(int(math.floor(v)), H - 2), 0)
    a, b = u - x0, v - y0
    return ((1 - a) * (1 - b) * img[:, y0, x0] + a * (1 - b) * img[:, y0, x0 + 1]
            + (1 - a) * b * img[:, y0 + 1, x0] + a * b * img[:, y0 + 1, x0 + 1])


# ---------------------------------------------------------------- losses
def test_feature_snn_loss_hand_computed():
    "Two anchors; the second sample of anchor 0 is ignored (not valid); anchor 1 has no positive and is skipped."
    z = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    zs = torch.tensor([[[0.6, 0.8], [0.0, 1.0], [1.0, 0.0], [-0.6, -0.8]],
                       [[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [0.6, -0.8]]])
    pos = torch.tensor([[True, True, False, False], [False, False, False, False]])
    valid = torch.tensor([[True, False, True, True], [True, True, True, True]])
    tau = 0.5
    s = [1.0, 0.8, 0.6, -1.0]  # ⟨z_0, z_q⟩
    expected = -math.log(math.exp(s[0] / tau) / (math.exp(s[0] / tau) + math.exp(s[2] / tau) + math.exp(s[3] / tau)))
    assert_close(snn_loss(z, zs, pos, valid, tau), torch.tensor(expected))
    loss, used = snn_loss(z, zs, pos, valid, tau, reduction="none")
    assert used.tolist() == [True, False] and loss[1] == 0


def test_feature_snn_loss_improves_when_positives_align():
    "Pulling the positives toward the anchor lowers the loss (the loss is not a constant)."
    z = torch.tensor([[1.0, 0.0]])
    far = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]]]); near = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    pos, valid = torch.tensor([[True, False]]), torch.ones(1, 2, dtype=torch.bool)
    assert snn_loss(z, near, pos, valid) < snn_loss(z, far, pos, valid)


def test_feature_concentration_loss_hand_computed():
    "Weights softmax(γ⟨z_p,z_q⟩) over valid samples; loss = ‖Σ w (q - p)‖."
    z = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    zs = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.6, 0.8, 0, 0], [-1.0, 0, 0, 0]]])
    off = torch.tensor([[[2, 0], [0, -3], [1, 1], [5, 5]]])
    valid = torch.tensor([[True, True, True, False]])
    g = 0.5
    w = [math.exp(g * 1.0), math.exp(0.0), math.exp(g * 0.6)]
    sw = sum(w)
    mean = [(w[0] * 2 + w[1] * 0 + w[2] * 1) / sw, (w[0] * 0 + w[1] * -3 + w[2] * 1) / sw]
    assert_close(concentration_loss(z, zs, off, valid, g), torch.tensor(math.hypot(*mean)))


@pytest.mark.parametrize("fn", ["snn", "concentration"])
def test_gradcheck_losses(fn):
    g = torch.Generator().manual_seed(3)
    z = F.normalize(torch.randn(4, 5, generator=g, dtype=DT), dim=1).requires_grad_()
    zs = F.normalize(torch.randn(4, 3, 5, generator=g, dtype=DT), dim=-1).requires_grad_()
    pos = torch.tensor([[True, False, True], [False, False, False], [True, True, False], [False, True, False]])
    valid = pos | torch.tensor([[False, True, False], [True, True, False], [False, False, True], [True, False, False]])
    off = torch.randint(-3, 4, (4, 3, 2), generator=g).to(DT)
    f = (lambda a, b: snn_loss(a, b, pos, valid, 0.5)) if fn == "snn" else (lambda a, b: concentration_loss(a, b, off, valid, 0.5))
    assert torch.autograd.gradcheck(f, (z, zs))


def test_feature_no_nan_gradient_without_positives():
    "Anchors without any positive or valid sample must not poison the gradient."
    z = F.normalize(torch.randn(3, 4), dim=1).requires_grad_()
    zs = F.normalize(torch.randn(3, 2, 4), dim=-1)
    pos = torch.tensor([[True, False], [False, False], [False, False]])
    valid = torch.tensor([[True, True], [True, False], [False, False]])
    (snn_loss(z, zs, pos, valid) + concentration_loss(z, zs, torch.ones(3, 2, 2), valid)).backward()
    assert torch.isfinite(z.grad).all() and z.grad[1:].abs().sum() < z.grad[0].abs().sum() + 1  # rows 1, 2: snn adds nothing


# ---------------------------------------------------------------- sampling
@pytest.mark.parametrize("radius", [None, 2])
def test_feature_sampling_frequencies(radius):
    "Per pixel, sampled frequencies match P(q|p) ∝ 1/‖q-p‖ over the image (within the window), computed by a loop."
    H, W, draws = 5, 6, 4000
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(H * W, H * W)
    for _ in range(5):
        idx, off, ok = sample_neighbours(H, W, draws, radius, g)
        assert ok.all()
        counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=counts.dtype))
        # offsets agree with the indices
        y, x = torch.arange(H * W)[:, None] // W, torch.arange(H * W)[:, None] % W
        assert ((idx // W - y) == off[..., 0]).all() and ((idx % W - x) == off[..., 1]).all()
    R = radius if radius is not None else max(H, W) - 1
    exact = torch.zeros(H * W, H * W)
    for p in range(H * W):
        py, px = divmod(p, W)
        for q in range(H * W):
            qy, qx = divmod(q, W)
            if q != p and max(abs(qy - py), abs(qx - px)) <= R: exact[p, q] = 1 / math.hypot(qy - py, qx - px)
        exact[p] /= exact[p].sum()
    freq = counts / counts.sum(1, keepdim=True)
    sigma = (exact * (1 - exact) / (5 * draws)).sqrt()
    assert ((freq - exact).abs() <= 5 * sigma + 1e-9).all()
    assert (freq[exact == 0] == 0).all()


def test_feature_sampling_seeded():
    a = sample_neighbours(6, 7, 8, None, torch.Generator().manual_seed(5))[0]
    b = sample_neighbours(6, 7, 8, None, torch.Generator().manual_seed(5))[0]
    c = sample_neighbours(6, 7, 8, None, torch.Generator().manual_seed(6))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(neighbour_offsets(2)) == 24


# ---------------------------------------------------------------- positive sets
def test_feature_positive_sets_brute_force():
    H, W, S = 5, 6, 7
    g = torch.Generator().manual_seed(1)
    depth = 2 + 3 * torch.rand(2, 1, H, W, generator=g, dtype=DT)
    depth[0, 0, 1, 2] = 0  # no depth
    normal = F.normalize(torch.randn(2, 3, H, W, generator=g, dtype=DT), dim=1)
    conf = torch.rand(2, 1, H, W, generator=g, dtype=DT)
    K = torch.tensor([[[6.0, 0, 2.6], [0, 6.5, 2.1], [0, 0, 1]], [[5.0, 0, 3.0], [0, 5.0, 2.0], [0, 0, 1]]], dtype=DT)
    nbr = torch.randint(0, H * W, (H * W, S), generator=g)
    eps, eta = torch.tensor([0.4, 0.8], dtype=DT), 0.5
    pos, certain, anchor = positive_sets(depth, normal, conf, K, nbr, eps, eta)
    for b in range(2):
        Kinv = torch.linalg.inv(K[b])
        X = lambda i: depth[b, 0].flatten()[i] * (Kinv @ torch.tensor([i % W, i // W, 1.0], dtype=DT))
        for p in range(H * W):
            a = bool(conf[b, 0].flatten()[p] >= eta and depth[b, 0].flatten()[p] > 0)
            assert anchor[b, p].item() == a
            for s in range(S):
                q = nbr[p, s].item()
                c = bool(conf[b, 0].flatten()[q] >= eta and depth[b, 0].flatten()[q] > 0)
                d = abs(float(normal[b, :, p // W, p % W] @ (X(q) - X(p))))
                assert certain[b, p, s].item() == c
                assert pos[b, p, s].item() == (a and c and d < eps[b].item())
    assert pos.any() and not pos.all()


def test_feature_positive_threshold_units():
    cfg = ElasticConfig(eps=2.0, eps_unit="interval")
    assert_close(positive_threshold(cfg, torch.tensor([1.0, 2.0]), torch.tensor([4.84, 2.96])), torch.tensor([0.04, 0.01]))
    assert_close(positive_threshold(ElasticConfig(), torch.tensor([1.0]), torch.tensor([9.0])), torch.tensor([0.5]))


# ---------------------------------------------------------------- part-aware PatchMatch pieces
def test_feature_candidate_filter_brute_force():
    "T_p membership = ‖z_p - z_q‖ < δ and c_q ≥ η, checked per (pixel, neighbour) against a loop."
    ctx, state = context_and_state(two_parts=False)
    B, S, H, W = ctx.shape
    idx = torch.arange(0, H * W, 3)
    nbr, inside = neighbour_indices(idx, propagation_pattern("acmh"), H, W)
    conf = (1 - state.cost).clamp(0, 1)[0, 0].flatten()
    z = ctx.features["embedding"][0, 0].flatten(1)
    for thr, eta in ((1.2, 0.3), (0.9, 0.0)):
        got = part_candidates(ctx, state, idx, nbr, thr, eta)
        R, n, M = nbr.shape
        for r in range(R):
            for k in range(n):
                for m in range(M):
                    p, q = idx[m].item(), nbr[r, k, m].item()
                    assert got[0, r, k, m].item() == bool((z[:, p] - z[:, q]).norm() < thr and conf[q] >= eta)


def test_feature_propagation_blocks_other_parts():
    "Through mvsnb.patchmatch's propagation, a pixel only ever receives a plane from its own (embedding) part."
    ctx, state = context_and_state(H=8, W=12)
    B, S, H, W = ctx.shape
    state.cost.fill_(0.1)  # every neighbour confident
    state.depth[..., : W // 2] = 3.2; state.depth[..., W // 2:] = 4.8  # the two parts sit at different depths
    state.normal[:] = torch.tensor([0, 0, -1.0], dtype=DT).reshape(1, 3, 1, 1)
    hooks = part_aware_hooks(PartAwareConfig(embed_threshold=0.5, eta=0.7))
    idx = torch.arange(H * W)
    depth, normal, ok = propagation_candidates(ctx, state, idx, hooks)
    col = (idx % W)[None, None].expand_as(depth)
    got = depth[ok]
    assert ok.sum() > 100
    assert_close(got, torch.where(col[ok] < W // 2, torch.tensor(3.2, dtype=DT), torch.tensor(4.8, dtype=DT)), atol=1e-9, rtol=0)  # fronto-parallel planes keep their depth
    plain = propagation_candidates(ctx, state, idx, None)
    assert ((plain[0][plain[2]] - torch.where(col[plain[2]] < W // 2, 3.2, 4.8).to(DT)).abs() > 0.1).any()  # without the filter they mix


@pytest.mark.parametrize("distance,fixed_omega", [("point", False), ("plane", False), ("point", True), ("plane", True)])
def test_feature_smoothness_brute_force(distance, fixed_omega):
    ctx, state = context_and_state()
    B, S, H, W = ctx.shape
    g = torch.Generator().manual_seed(2)
    idx = torch.tensor([0, 13, 27, 44, 79])
    M, D = len(idx), 3
    nbr, inside = neighbour_indices(idx, propagation_pattern("gipuma"), H, W)
    use = inside[None] & (torch.rand(1, *nbr.shape, generator=g) > 0.3)
    depth = 3 + 2 * torch.rand(1, D, M, generator=g, dtype=DT)
    normal = F.normalize(torch.randn(1, 3, D, M, generator=g, dtype=DT) + torch.tensor([0, 0, -2.0], dtype=DT).reshape(1, 3, 1, 1), dim=1)
    beta = 0.5
    n_cur = state.normal.flatten(2)[:, :, idx]  # (B,3,M) p's current normal, for omega_normal="current"
    got = smoothness_cost(ctx, state, idx, depth, normal, nbr, use, beta, distance, "current", n_cur if fixed_omega else None)
    Kinv = torch.linalg.inv(ctx.K_ref[0]); interval = 2.0 / 192
    conf = (1 - state.cost).clamp(0, 1)[0, 0].flatten()
    ray = lambda i: Kinv @ torch.tensor([i % W, i // W, 1.0], dtype=DT)
    for m in range(M):
        p = idx[m].item()
        for d in range(D):
            e_p = depth[0, d, m] * ray(p)
            num = den = 0.0
            for r in range(nbr.shape[0]):
                for k in range(nbr.shape[1]):
                    if not use[0, r, k, m]: continue
                    q = nbr[r, k, m].item()
                    e_q = state.depth[0, 0].flatten()[q] * ray(q)
                    n_q = state.normal[0, :, q // W, q % W]
                    n_p = n_cur[0, :, m] if fixed_omega else normal[0, :, d, m]
                    w = conf[q] * math.exp((float(n_p @ n_q) - 1) / beta)
                    dist = (e_p - e_q).norm() if distance == "point" else (n_q @ (e_p - e_q)).abs()
                    num += w * dist / interval; den += w
            expected = num / den if den > 1e-12 else 0.0
            assert abs(float(got[0, d, m]) - float(expected)) < 1e-6 * max(1.0, abs(float(expected)))
    assert (got > 0).any()


def test_feature_sampled_neighbours_brute_force():
    "Pattern neighbours unchanged; the far locations equal a per-pixel loop over the same random draws."
    H, W, num, radius = 12, 15, 5, 9
    regions = propagation_pattern("acmh")
    idx = torch.arange(1, H * W, 2)
    nbr, inside = sampled_neighbours(idx, regions, H, W, num, radius, torch.Generator().manual_seed(4))
    base, base_in = neighbour_indices(idx, regions, H, W)
    n = base.shape[1]
    assert nbr.shape == (8, n + num, len(idx))
    assert torch.equal(nbr[:, :n], base) and torch.equal(inside[:, :n], base_in) and not inside[:4, n:].any()
    g = torch.Generator().manual_seed(4)
    u = torch.rand((4, num, len(idx)), generator=g); v = torch.rand((4, num, len(idx)), generator=g)
    dirs = [(-1, 0), (1, 0), (0, -1), (0, 1)]  # regions 4..7 look up, down, left, right
    for k in range(4):
        for j in range(num):
            for m in range(len(idx)):
                r = 3 + (radius - 3) * float(u[k, j, m])
                th = math.atan2(*dirs[k]) + (float(v[k, j, m]) - 0.5) * math.pi / 2
                y = int(idx[m]) // W + int(torch.round(torch.tensor(r * math.sin(th))))
                x = int(idx[m]) % W + int(torch.round(torch.tensor(r * math.cos(th))))
                ok = 0 <= y < H and 0 <= x < W
                assert bool(inside[4 + k, n + j, m]) == ok
                if ok: assert int(nbr[4 + k, n + j, m]) == y * W + x
    assert torch.equal(sampled_neighbours(idx, regions, H, W, 0, radius)[0], base)


def test_feature_smoothness_uses_the_sampled_propagation_set():
    "In one half-sweep the Eq. 4 term sums over the locations the propagation drew, and only there."
    ctx, state = context_and_state(H=10, W=12)
    B, S, H, W = ctx.shape
    cfg = PartAwareConfig(embed_threshold=0.5, eta=0.3, alpha=0.0, num_sampled=3, sample_radius=8)
    hooks = part_aware_hooks(cfg)
    idx = torch.arange(0, H * W, 2)
    nbr, inside = hooks.neighbours(ctx, state, idx, torch.Generator().manual_seed(0))
    assert nbr.shape[1] == 11 + 3
    depth, normal = state.depth.flatten(2)[:, :, idx], state.normal.flatten(2)[:, :, None, idx]
    use = inside[None] & part_candidates(ctx, state, idx, nbr, 0.5, 0.3)
    want = 0.01 * smoothness_cost(ctx, state, idx, depth, normal, nbr, use, 0.5, "point", "current", state.normal.flatten(2)[:, :, idx])
    assert_close(hooks.extra_cost(ctx, state, idx, depth, normal), want)
    other = torch.arange(1, H * W, 2)  # not the cached pixels: the fixed pattern
    pn, pi = neighbour_indices(other, propagation_pattern("acmh"), H, W)
    d2, n2 = state.depth.flatten(2)[:, :, other], state.normal.flatten(2)[:, :, None, other]
    use2 = pi[None] & part_candidates(ctx, state, other, pn, 0.5, 0.3)
    assert_close(hooks.extra_cost(ctx, state, other, d2, n2),
                 0.01 * smoothness_cost(ctx, state, other, d2, n2, pn, use2, 0.5, "point", "current", state.normal.flatten(2)[:, :, other]))
    assert part_aware_hooks(PartAwareConfig(part_propagation=False)).neighbours is None  # w/o PR: Gipuma-like fixed pattern
    assert part_aware_hooks(PartAwareConfig(num_sampled=0)).neighbours is None


def test_feature_correspondence_cost_brute_force():
    "1 - cos(z_ref(p), normalised bilinear z_src(projection)), 2 for unseen views, mean of the best top_k views."
    ctx, state = context_and_state(two_parts=False)
    B, S, H, W = ctx.shape
    idx = torch.tensor([0, 17, 35, 58, 79])
    depth = torch.tensor([[[3.2, 3.9, 4.4, 0.8, 4.9], [4.1, 3.0, 3.5, 4.0, 4.5]]], dtype=DT)  # 0.8: some views may not see it
    got = correspondence_cost(ctx, idx, depth)
    emb = ctx.features["embedding"][0]
    Kinv = torch.linalg.inv(ctx.K_ref[0])
    for d in range(2):
        for m, p in enumerate(idx.tolist()):
            X = depth[0, d, m] * (Kinv @ torch.tensor([p % W, p // W, 1.0], dtype=DT))
            costs = []
            for s in range(S):
                T = ctx.T_src_ref[0, s]
                Xs = T[:3, :3] @ X + T[:3, 3]
                if Xs[2] <= 1e-9: costs.append(2.0); continue
                uv = ctx.K_src[0, s] @ (Xs / Xs[2])
                u, v = float(uv[0]), float(uv[1])
                if not (0 <= u <= W - 1 and 0 <= v <= H - 1): costs.append(2.0); continue
                zs = F.normalize(bilinear(emb[s + 1], u, v), dim=0)
                costs.append(1 - float(zs @ emb[0, :, p // W, p % W]))
            k = min(ctx.config.top_k, S)
            assert abs(float(got[0, d, m]) - sum(sorted(costs)[:k]) / k) < 1e-6


def test_feature_ablation_switches():
    ctx, state = context_and_state()
    B, S, H, W = ctx.shape
    idx = torch.arange(0, H * W, 2)
    nbr, inside = neighbour_indices(idx, propagation_pattern("acmh"), H, W)
    valid = inside[None].clone()
    depth, normal = state.depth.flatten(2)[:, :, idx], state.normal.flatten(2)[:, :, None, idx]
    on = part_aware_hooks(PartAwareConfig(embed_threshold=0.5, eta=0.3))
    assert (on.candidate_filter(ctx, state, idx, nbr, valid) <= valid).all()
    assert not torch.equal(on.candidate_filter(ctx, state, idx, nbr, valid), valid)
    off = part_aware_hooks(PartAwareConfig(part_propagation=False))
    assert torch.equal(off.candidate_filter(ctx, state, idx, nbr, valid), valid)
    full = on.extra_cost(ctx, state, idx, depth, normal)
    no_pc = part_aware_hooks(PartAwareConfig(embed_threshold=0.5, eta=0.3, part_correspondence=False)).extra_cost(ctx, state, idx, depth, normal)
    assert_close(full - no_pc, 0.1 * correspondence_cost(ctx, idx, depth))
    no_ps = part_aware_hooks(PartAwareConfig(embed_threshold=0.5, eta=0.3, part_smoothness=False)).extra_cost(ctx, state, idx, depth, normal)
    assert not torch.allclose(no_ps, full)
    none = part_aware_hooks(PartAwareConfig(alpha=0.0, smoothness_weight=0.0)).extra_cost(ctx, state, idx, depth, normal)
    assert (none == 0).all()


# ---------------------------------------------------------------- whole runs
@pytest.fixture(scope="module")
def tiny_scene():
    from mvsnb.synthetic import make_scene
    return make_scene(views=3, height=16, width=20, seed=1)


def test_smoke_part_aware_patchmatch(tiny_scene):
    sc = tiny_scene
    b = view_batches(sc.images, sc.K, sc.w2c, sc.pairs, sc.depth_min, sc.depth_max)
    net = EmbeddingNet(embed_dim=8, base_channels=4)
    emb = embed_views(net, b["images"])
    assert emb.shape == (3, 3, 8, 16, 20)
    cfg = part_aware_preset("synthetic", iterations=1)
    out = part_aware_patchmatch(b["images"], b["K"], b["w2c"], b["depth_min"], b["depth_max"], emb, cfg, seed=0, pairs=sc.pairs)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"depth": (3, 1, 16, 20), "normal": (3, 3, 16, 20),
                                                          "cost": (3, 1, 16, 20), "conf": (3, 1, 16, 20), "extra": (3, 1, 16, 20),
                                                          "view_cost": (3, 2, 16, 20)}
    assert torch.isfinite(out["depth"]).all() and ((out["depth"] >= sc.depth_min) & (out["depth"] <= sc.depth_max)).all()
    again = part_aware_patchmatch(b["images"], b["K"], b["w2c"], b["depth_min"], b["depth_max"], emb, cfg, seed=0, pairs=sc.pairs)
    assert torch.equal(out["depth"], again["depth"])
    prior = part_aware_patchmatch(b["images"], b["K"], b["w2c"], b["depth_min"], b["depth_max"], emb,
                                  part_aware_preset("synthetic", iterations=1, conf_source="prior"), seed=0, prior_conf=out["conf"])
    assert prior["depth"].shape == (3, 1, 16, 20)
    seen = []
    geo_cfg = part_aware_preset("synthetic", iterations=2, conf_source="geometric")
    geo = part_aware_patchmatch(b["images"], b["K"], b["w2c"], b["depth_min"], b["depth_max"], emb, geo_cfg, seed=0, pairs=sc.pairs,
                                on_sweep=lambda ctx, state, it: seen.append((it, ctx.features["geometric_conf"].clone(), state.depth.clone())))
    assert [it for it, _, _ in seen] == [-1, 0, 1] and (seen[0][1] == 1).all()  # all consistent before the first sweep
    from mvsnb.elastic import consistency_mask
    for it, g, d in seen[1:]:  # after a sweep: the cross-view consistency of that sweep's depth maps
        assert torch.equal(g.bool(), consistency_mask(d, sc.K, sc.w2c, sc.pairs, 2))
    with pytest.raises(InputError, match="pairs"):
        part_aware_patchmatch(b["images"], b["K"], b["w2c"], b["depth_min"], b["depth_max"], emb, geo_cfg)


def test_smoke_training_lowers_loss(tiny_scene):
    sc = tiny_scene
    g = torch.Generator().manual_seed(0)
    from mvsnb.patchmatch import normals_to_camera
    n = normals_to_camera(sc.normal, sc.w2c)
    conf = torch.ones(3, 1, 16, 20)
    N = 3
    net, hist = train_embedding(sc.images, sc.depth, n, conf, sc.K, torch.full((N,), sc.depth_min), torch.full((N,), sc.depth_max),
                                elastic_preset("synthetic", steps=25, embed_dim=8, base_channels=4), seed=0)
    first, last = sum(h["contrastive"] for h in hist[:5]), sum(h["contrastive"] for h in hist[-5:])
    assert last < first and all(h["anchors"] > 0 for h in hist)
    assert not net.training


def test_exception_bad_inputs(tiny_scene):
    sc = tiny_scene
    b = view_batches(sc.images, sc.K, sc.w2c, sc.pairs, sc.depth_min, sc.depth_max)
    emb = F.normalize(torch.randn(3, 3, 4, 16, 20), dim=2)
    args = [b[k] for k in ("images", "K", "w2c", "depth_min", "depth_max")]
    with pytest.raises(ShapeError, match="embedding"):
        part_aware_patchmatch(*args, emb[:, :2])
    with pytest.raises(InputError, match="prior_conf"):
        part_aware_patchmatch(*args, emb, PartAwareConfig(conf_source="prior", iterations=1))
    with pytest.raises(InputError, match=r"\[smoothness_distance\]"):
        check_part_aware_config(PartAwareConfig(smoothness_distance="l2"))
    for field, bad in (("smoothness_set", "all"), ("omega_normal", "mean"), ("num_sampled", -1), ("sample_radius", 2)):
        with pytest.raises(InputError, match=rf"\[{field}\]"):
            check_part_aware_config(PartAwareConfig(**{field: bad}))
    with pytest.raises(InputError, match=r"\[num_propagated\]"):
        part_aware_preset("paper", pattern="gipuma", num_propagated=4)
    with pytest.raises(InputError, match=r"\[tau\]"):
        elastic_preset("dtu", tau=0.0)
    with pytest.raises(InputError, match="unknown preset"):
        elastic_preset("eth3d")
    with pytest.raises(InputError, match="pairs"):
        view_batches(sc.images, sc.K, sc.w2c, sc.pairs[:2], sc.depth_min, sc.depth_max)
    with pytest.raises(ShapeError, match="nbr"):
        positive_sets(sc.depth[:1], torch.ones(1, 3, 16, 20), torch.ones(1, 1, 16, 20), sc.K[:1], torch.zeros(5, 2, dtype=torch.long), 0.1, 0.5)


def test_feature_region_metrics_hand_computed():
    gt = torch.full((1, 1, 2, 3), 4.0)
    pred = gt + torch.tensor([[0.0, 0.1, 0.3], [0.05, 1.0, 0.0]]).reshape(1, 1, 2, 3)
    region = torch.tensor([[True, True, True], [True, True, False]]).reshape(1, 1, 2, 3)
    keep = torch.tensor([[True, True, True], [False, True, True]]).reshape(1, 1, 2, 3)
    m = region_metrics(pred, gt, region, keep, interval=0.1, threshold=2.0)
    # kept region pixels: errors 0, 1, 3, 10 intervals; the unkept one (0.5) is a miss for completeness
    assert_close(m["accuracy"], 3.5, rtol=1e-5, atol=1e-5); assert_close(m["completeness"], 40.0)
    assert_close(m["abs_mean"], (0 + 1 + 3 + 0.5 + 10) / 5, rtol=1e-5, atol=1e-5); assert_close(m["within"], 60.0)
    assert m["kept"] == 80.0 and m["n"] == 5


@pytest.mark.slow
def test_pipeline_papermill(tmp_path):
    "The pipeline notebook runs end to end with tiny parameters and writes its outputs (both methods, shared cache)."
    import json
    from pathlib import Path
    from mvsnb.runner import run_notebook
    nb = Path(__file__).resolve().parents[1] / "nbs" / "pipelines" / "40_elastic.ipynb"
    tiny = dict(views=3, height=16, width=20, iterations=1, train_steps=3, cache_dir=str(tmp_path / "cache"))
    run_notebook(nb, tmp_path / "plain", dict(tiny, method="plain"))
    run_notebook(nb, tmp_path / "part", dict(tiny, part_smoothness=False))
    for name in ("plain", "part"):
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        assert 0 <= m["textured"]["completeness"] <= 100 and m["textured"]["n"] > 0 and "textureless" in m
        assert (tmp_path / name / "params.json").exists() and (tmp_path / name / "fig_depth.png").exists()
    assert (tmp_path / "part" / "fig_embedding.png").exists() and len(list((tmp_path / "cache").glob("*.pt"))) == 1
    # the depth maps in MVSNet's output layout, readable as a network's outputs, equal to depth.pt
    import torch
    from mvsnb.crossview import load_depth_outputs
    for name in ("plain", "part"):
        got = load_depth_outputs(tmp_path / name / "scene", tmp_path / name / "outputs")
        want = torch.load(tmp_path / name / "depth.pt")["depth"]
        assert got["depths"].shape == (3, 1, 16, 20) and got["confs"] is not None
        assert torch.allclose(got["depths"], torch.where(want > 0, want, torch.zeros_like(want)))
