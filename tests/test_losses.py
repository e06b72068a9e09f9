"""Unsupervised losses: hand-computed values, brute-force references, gradchecks, synthetic-scene properties."""
import math, itertools
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mvsnb.core import InputError, ShapeError
from mvsnb.losses.photometric import (masked_mean, image_gradients, reconstruction_error, topk_views, photometric_loss,
                                      ssim, ssim_loss, warp_sources, PhotometricLoss, SSIMLoss)
from mvsnb.losses.smoothness import edge_weights, smoothness_loss, SmoothnessLoss
from mvsnb.losses.featuremetric import featuremetric_error, featuremetric_loss, aleatoric_loss, FeaturemetricLoss
from mvsnb.losses.synthesis import (VGG16Features, load_vgg16_features, perceptual_loss, synthesis_loss,
                                    SynthesisWeights, SynthesisLoss, synthesize_from_probability)
from mvsnb.losses.unsup import (LossWeights, UnsupLossConfig, UNSUP_PRESETS, unsup_config, unsup_loss, UnsupLoss,
                                oracle_outputs, build_unsup_loss, stage_views)

def t(rows):  # nested lists → (1,1,H,W) float64 tensor
    return torch.tensor(rows, dtype=torch.float64)[None, None]

def smooth_l1(x): return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5

# ---------------------------------------------------------------------------------------------- hand values
def test_feature_reconstruction_error_by_hand():
    ref = [[0.1, 0.4, 0.2], [0.9, 0.3, 0.5]]
    war = [[0.3, 0.4, 0.0], [0.2, 2.0, 0.5]]
    H, W = 2, 3
    exp = [[0.0] * W for _ in range(H)]
    for i in range(H):
        for j in range(W):
            photo = smooth_l1(war[i][j] - ref[i][j])
            gx = abs((war[i][j + 1] - war[i][j]) - (ref[i][j + 1] - ref[i][j])) if j + 1 < W else 0.0
            gy = abs((war[i + 1][j] - war[i][j]) - (ref[i + 1][j] - ref[i][j])) if i + 1 < H else 0.0
            exp[i][j] = 0.5 * photo + 0.5 * (gx + gy)
    ok = torch.ones(1, 1, H, W, dtype=torch.bool)
    out = reconstruction_error(t(war), t(ref), ok)
    torch.testing.assert_close(out, t(exp))
    torch.testing.assert_close(reconstruction_error(t(war), t(ref), ok, reduction="mean"), t(exp).mean())

def test_feature_reconstruction_error_masks_invalid_pixels():
    ref, war = torch.rand(1, 3, 4, 5), torch.rand(1, 3, 4, 5)
    valid = torch.ones(1, 1, 4, 5, dtype=torch.bool); valid[..., 1, 2] = False
    e = reconstruction_error(war, ref, valid)
    war2 = war.clone(); war2[..., 1, 2] = 123.0  # what the warp put at an invalid pixel must not matter
    torch.testing.assert_close(reconstruction_error(war2, ref, valid), e)
    m = reconstruction_error(war, ref, valid, reduction="mean")
    torch.testing.assert_close(m, e[valid].mean())

def test_feature_ssim_hand_value_and_identities():
    p = [[0.1, 0.5, 0.9], [0.2, 0.4, 0.6], [0.3, 0.8, 0.7]]
    q = [[0.2, 0.5, 0.7], [0.1, 0.6, 0.6], [0.4, 0.9, 0.5]]
    a, b = sum(p, []), sum(q, [])
    mx, my = sum(a) / 9, sum(b) / 9
    vx = sum(v * v for v in a) / 9 - mx * mx; vy = sum(v * v for v in b) / 9 - my * my
    cxy = sum(u * v for u, v in zip(a, b)) / 9 - mx * my
    C1, C2 = 0.01 ** 2, 0.03 ** 2
    hand = (2 * mx * my + C1) * (2 * cxy + C2) / ((mx * mx + my * my + C1) * (vx + vy + C2))
    assert ssim(t(p), t(q)).item() == pytest.approx(hand, rel=1e-10)
    assert ssim_loss(t(p), t(q)).item() == pytest.approx((1 - hand) / 2, rel=1e-10)
    x = torch.rand(2, 3, 7, 9, dtype=torch.float64)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, 3, 5, 7, dtype=torch.float64))
    torch.testing.assert_close(ssim(x, x, padding="reflect"), torch.ones_like(x))
    assert ssim_loss(x, x).item() == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(ssim(x, x.flip(-1)), ssim(x.flip(-1), x))  # symmetric

def test_feature_ssim_agrees_with_kornia_where_it_should():
    kornia = pytest.importorskip("kornia")
    x = torch.rand(1, 3, 12, 14, dtype=torch.float64)
    # identical images: 1 for any window
    torch.testing.assert_close(kornia.metrics.ssim(x, x, 3), ssim(x, x, padding="reflect"))
    # constant images: only the luminance term survives, whatever the window shape
    a, b = torch.full((1, 3, 9, 9), 0.3, dtype=torch.float64), torch.full((1, 3, 9, 9), 0.7, dtype=torch.float64)
    torch.testing.assert_close(kornia.metrics.ssim(a, b, 3)[..., 1:-1, 1:-1], ssim(a, b))
    # a textured pair: kornia's Gaussian window differs from the 3x3 box, so the values must not coincide
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert (kornia.metrics.ssim(x, y, 3)[..., 1:-1, 1:-1] - ssim(x, y)).abs().max() > 1e-3

def test_feature_ssim_loss_window_mask():
    x, y = torch.rand(1, 3, 6, 7), torch.rand(1, 3, 6, 7)
    valid = torch.ones(1, 1, 6, 7, dtype=torch.bool); valid[..., 3, 3] = False
    m = ssim_loss(x, y, valid, reduction="none")  # (1,1,4,5): windows (i,j) cover rows i..i+2, cols j..j+2
    for i, j in itertools.product(range(4), range(5)):
        touches = i <= 3 <= i + 2 and j <= 3 <= j + 2
        assert (m[0, 0, i, j] == 0) == touches
    d = ((1 - ssim(x, y)) / 2).clamp(0, 1).mean(1, keepdim=True)
    keep = m != 0
    torch.testing.assert_close(ssim_loss(x, y, valid), d[keep].mean())

def test_feature_smoothness_by_hand():
    D = [[1.0, 2.0, 4.0, 4.5], [2.0, 2.5, 3.0, 0.5], [0.0, 1.0, 5.0, 5.5]]
    I = [[0.0, 0.5, 0.5, 0.1], [0.2, 0.2, 0.9, 0.3], [0.0, 0.1, 0.1, 0.8]]
    H, W = 3, 4
    wx = lambda r, c: math.exp(-abs(I[r][c + 1] - I[r][c]))
    wy = lambda r, c: math.exp(-abs(I[r + 1][c] - I[r][c]))
    for alpha in (None, 1.2):
        cap = (lambda v: abs(v)) if alpha is None else (lambda v: min(abs(v), alpha))
        first = [[0.0] * W for _ in range(H)]; second = [[0.0] * W for _ in range(H)]
        for r in range(H):
            for c in range(W):
                if c + 1 < W: first[r][c] += wx(r, c) * cap(D[r][c + 1] - D[r][c])
                if r + 1 < H: first[r][c] += wy(r, c) * cap(D[r + 1][c] - D[r][c])
                if c + 2 < W: second[r][c] += wx(r, c) * cap(D[r][c + 2] - 2 * D[r][c + 1] + D[r][c])
                if r + 2 < H: second[r][c] += wy(r, c) * cap(D[r + 2][c] - 2 * D[r + 1][c] + D[r][c])
                if r + 1 < H and c + 1 < W:
                    mixed = D[r + 1][c + 1] - D[r][c + 1] - D[r + 1][c] + D[r][c]
                    second[r][c] += (wx(r, c) + wy(r, c)) * cap(mixed)
        torch.testing.assert_close(smoothness_loss(t(D), t(I), order=1, clamp=alpha, reduction="none"), t(first))
        torch.testing.assert_close(smoothness_loss(t(D), t(I), order=2, clamp=alpha, reduction="none"), t(second))
        assert smoothness_loss(t(D), t(I), order=2, clamp=alpha).item() == pytest.approx(sum(sum(second, [])) / (H * W))

def test_feature_edge_weights_release_standardises():
    img = torch.rand(2, 3, 5, 6)
    wx1, wy1 = edge_weights(img, "div_release")
    wx2, wy2 = edge_weights(img * 0.5 + 0.2, "div_release")  # contrast/brightness change: same standardised image
    torch.testing.assert_close(wx1, wx2, rtol=1e-4, atol=1e-5); torch.testing.assert_close(wy1, wy2, rtol=1e-4, atol=1e-5)
    gx, _ = image_gradients(img)
    torch.testing.assert_close(edge_weights(img)[0], torch.exp(-gx.abs().mean(1, keepdim=True)))

def test_feature_featuremetric_by_hand():
    ref = torch.tensor([[[[1.0, 2.0]], [[0.0, 3.0]]]])  # (1,2,1,2)
    v0 = torch.tensor([[[[1.5, 2.0]], [[0.0, 1.0]]]]); v1 = torch.tensor([[[[1.0, 2.2]], [[0.4, 3.0]]]])
    e0 = [(0.5 + 0.0) / 2, (0.0 + 2.0) / 2]; e1 = [(0.0 + 0.4) / 2, (0.2 + 0.0) / 2]
    ok = torch.ones(1, 2, 1, 1, 2, dtype=torch.bool)
    out = featuremetric_loss(torch.stack([v0, v1], 1), ref, ok, top_k=1, reduction="none")
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([min(e0[0], e1[0]), min(e0[1], e1[1])]))
    out2 = featuremetric_loss(torch.stack([v0, v1], 1), ref, ok, top_k=2)
    assert out2.item() == pytest.approx((e0[0] + e1[0] + e0[1] + e1[1]) / 2)

def test_feature_aleatoric_by_hand():
    photo, feat, s = [0.3, 0.1, 0.6], [0.2, 0.8, 0.0], [0.5, -1.0, 0.0]
    mask = [True, True, False]
    keep = [i for i in range(3) if mask[i]]
    hand = 0.5 * (sum(math.exp(-s[i]) * photo[i] for i in keep) / 2 + 0.25 * sum(math.exp(-s[i]) * feat[i] for i in keep) / 2
                  + 0.1 * sum(s[i] for i in keep) / 2)
    r = lambda v: torch.tensor(v).reshape(1, 1, 1, 3)
    got = aleatoric_loss(r(photo), r(s), r(feat), r(mask))
    assert got.item() == pytest.approx(hand, rel=1e-6)
    assert aleatoric_loss(r(photo), r(s)).item() == pytest.approx(
        0.5 * sum(math.exp(-s[i]) * photo[i] + 0.1 * s[i] for i in range(3)) / 3, rel=1e-6)

def test_feature_perceptual_against_direct_conv():
    torch.manual_seed(0)
    vgg = VGG16Features(("relu1_1",)).double()
    x, y = torch.rand(1, 3, 5, 6, dtype=torch.float64), torch.rand(1, 3, 5, 6, dtype=torch.float64)
    conv = vgg.features[0]
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).reshape(1, 3, 1, 1)
    phi = lambda im: F.relu(F.conv2d((im - mean) / std, conv.weight, conv.bias, padding=1))
    assert perceptual_loss(x, y, vgg).item() == pytest.approx(((phi(x) - phi(y)) ** 2).mean().item(), rel=1e-6)  # float32 constants
    assert perceptual_loss(x, x, vgg).item() == 0

def test_feature_synthesis_loss_by_hand():
    p = [[0.1, 0.5, 0.9], [0.2, 0.4, 0.6], [0.3, 0.8, 0.7]]
    ref = t(p).expand(1, 3, 3, 3)
    synth = (ref + 0.1)[:, None]
    ok = torch.ones(1, 1, 1, 3, 3, dtype=torch.bool)
    depth = t([[4.0, 4.0, 4.0], [4.0, 4.0, 4.0], [4.0, 4.0, 4.2]])
    mu = sum(sum(p, [])) / 9
    s = (2 * mu * (mu + 0.1) + 1e-4) / (mu ** 2 + (mu + 0.1) ** 2 + 1e-4)
    # smoothness: only the bottom-right corner differs (+0.2); the forward differences touching it
    img = p
    sm = (math.exp(-abs(img[2][2] - img[2][1])) * 0.2 + math.exp(-abs(img[2][2] - img[1][2])) * 0.2) / 9
    total, terms = synthesis_loss(synth, ok, ref, depth, SynthesisWeights(grad=6, ssim=6, perceptual=0, smooth=0.18))
    assert terms["grad"].item() == pytest.approx(0.0, abs=1e-12)
    assert terms["ssim"].item() == pytest.approx((1 - s) / 2, rel=1e-9)
    assert terms["smooth"].item() == pytest.approx(sm, rel=1e-9)
    assert total.item() == pytest.approx(6 * (1 - s) / 2 + 0.18 * sm, rel=1e-9)

# ---------------------------------------------------------------------------------------- brute force / quirks
def _brute_topk(err, valid, k, exclude=True):
    B, V, _, H, W = err.shape
    out = torch.zeros(B, 1, H, W, dtype=err.dtype); counted = torch.zeros(B, 1, H, W, dtype=torch.bool)
    for b, i, j in itertools.product(range(B), range(H), range(W)):
        vals = sorted(float(err[b, v, 0, i, j]) for v in range(V) if valid[b, v, 0, i, j])
        if exclude and len(vals) < k: continue
        out[b, 0, i, j] = sum(vals[:k]); counted[b, 0, i, j] = True
    return out, counted

@pytest.mark.parametrize("k", [1, 2, 3])
def test_feature_topk_matches_brute_force(k):
    torch.manual_seed(k)
    err = torch.rand(2, 4, 1, 5, 6, dtype=torch.float64)
    valid = torch.rand(2, 4, 1, 5, 6) > 0.3
    for incomplete in ("exclude", "partial"):
        got, counted = topk_views(err, valid, k, incomplete)
        ref, ref_counted = _brute_topk(err, valid, k, incomplete == "exclude")
        torch.testing.assert_close(got, ref); assert torch.equal(counted, ref_counted)

def test_feature_photometric_per_pixel_matches_brute_force():
    torch.manual_seed(3)
    ref = torch.rand(1, 3, 5, 6, dtype=torch.float64)
    warped = (ref[:, None] + 0.3 * torch.randn(1, 3, 3, 5, 6, dtype=torch.float64)).clamp(0, 1)
    valid = torch.rand(1, 3, 1, 5, 6) > 0.2
    err = torch.stack([reconstruction_error(warped[:, v], ref, valid[:, v]) for v in range(3)], 1)
    want, counted = _brute_topk(err, valid, 2)
    got = photometric_loss(warped, ref, valid, top_k=2, reduction="none")
    torch.testing.assert_close(got, want)
    assert photometric_loss(warped, ref, valid, top_k=2).item() == pytest.approx(want[counted].mean().item())

def test_feature_legacy_reproduces_mean_then_topk_and_differs():
    # view 0: perfect except a bright pixel; view 1: speckled everywhere (lower per-pixel error at the bright pixel)
    ref = torch.full((1, 1, 1, 6), 0.5, dtype=torch.float64)
    warped = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.5, 0.8], [0.6, 0.4, 0.6, 0.4, 0.6, 0.4]], dtype=torch.float64).reshape(1, 2, 1, 1, 6)
    valid = torch.ones(1, 2, 1, 1, 6, dtype=torch.bool); valid[0, 0, 0, 0, 1] = False
    err = torch.stack([reconstruction_error(warped[:, v], ref, valid[:, v]) for v in range(2)], 1)
    # brute-force legacy: one scalar per view (mean over batch and all pixels), then per pixel the best valid view
    means = [float(err[:, v].mean()) for v in range(2)]
    want = torch.zeros(1, 1, 1, 6, dtype=torch.float64)
    for j in range(6):
        cand = [means[v] for v in range(2) if valid[0, v, 0, 0, j]]
        want[0, 0, 0, j] = min(cand)
    legacy = photometric_loss(warped, ref, valid, top_k=1, legacy_mean_reduction=True, reduction="none")
    torch.testing.assert_close(legacy, want)
    per_pixel = photometric_loss(warped, ref, valid, top_k=1, reduction="none")
    assert (legacy - per_pixel).abs().max() > 0.01
    assert photometric_loss(warped, ref, valid, top_k=1, legacy_mean_reduction=True).item() != pytest.approx(
        photometric_loss(warped, ref, valid, top_k=1).item(), rel=1e-3)

def test_feature_invalid_views_never_leak():
    ref = torch.zeros(1, 1, 2, 2)
    warped = torch.stack([torch.full((1, 2, 2), 0.1), torch.full((1, 2, 2), 100.0)], 0)[None]  # view 1: huge error
    valid = torch.ones(1, 2, 1, 2, 2, dtype=torch.bool); valid[0, 0, 0, 0, 0] = False
    out, counted = topk_views(torch.stack([reconstruction_error(warped[:, v], ref, valid[:, v]) for v in range(2)], 1), valid, 2)
    assert not counted[0, 0, 0, 0] and out[0, 0, 0, 0] == 0  # < K valid views: excluded, contributes nothing
    assert torch.isfinite(photometric_loss(warped, ref, valid, top_k=2)) and photometric_loss(warped, ref, valid, top_k=2) < 200

# ------------------------------------------------------------------------------------------- smoothness facts
def test_feature_ramp_and_clamp():
    H, W = 5, 7
    grey = torch.full((1, 3, H, W), 0.4)
    ramp = (2.0 + 0.3 * torch.arange(W, dtype=torch.float32) + 0.2 * torch.arange(H, dtype=torch.float32)[:, None])[None, None]
    assert smoothness_loss(ramp, grey, order=2).item() == pytest.approx(0.0, abs=1e-6)
    assert smoothness_loss(ramp, grey, order=1).item() > 0.3
    step = torch.where(torch.arange(W) < 3, 1.0, 50.0).expand(1, 1, H, W).contiguous()
    for alpha in (0.5, 3.0):
        m = smoothness_loss(step, grey, order=2, clamp=alpha, reduction="none")
        assert m.max() <= 4 * alpha + 1e-6  # 4 terms, each capped at α (edge weights are 1 on a grey image)
        assert smoothness_loss(step, grey, order=2, clamp=alpha, reduction="none")[0, 0, 0, 1].item() == pytest.approx(alpha)
        torch.testing.assert_close(smoothness_loss(step, grey, order=2, clamp=alpha / 2, depth_interval=2.0, reduction="none"), m)
    # per-batch depth intervals
    two = torch.cat([step, step]); iv = torch.tensor([1.0, 4.0])
    m2 = smoothness_loss(two, grey.expand(2, -1, -1, -1), order=1, clamp=1.0, depth_interval=iv, reduction="none")
    assert m2[0].max().item() == pytest.approx(1.0) and m2[1].max().item() == pytest.approx(4.0)

# ---------------------------------------------------------------------------------------------- gradchecks
def _gc(fn, *xs): assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-5, fast_mode=True)

def test_gradcheck_photometric_ssim():
    torch.manual_seed(0)
    ref = torch.rand(1, 2, 4, 4, dtype=torch.float64)
    w = (ref[:, None] + 0.3 * torch.randn(1, 3, 2, 4, 4, dtype=torch.float64)).requires_grad_()
    v = torch.rand(1, 3, 1, 4, 4) > 0.2
    _gc(lambda x: reconstruction_error(x[:, 0], ref, v[:, 0]), w)
    _gc(lambda x: photometric_loss(x, ref, v, top_k=2), w)
    _gc(lambda x: photometric_loss(x, ref, v, top_k=2, legacy_mean_reduction=True, grad_penalty="smooth_l1"), w)
    _gc(lambda x: ssim_loss(x[:, 0], ref, v[:, 0]), w)

def test_gradcheck_smoothness():
    torch.manual_seed(1)
    d = (3 + torch.rand(1, 1, 4, 5, dtype=torch.float64)).requires_grad_()
    img = torch.rand(1, 3, 4, 5, dtype=torch.float64)
    for kw in (dict(order=1), dict(order=2), dict(order=2, clamp=0.3), dict(order=2, clamp=0.3, edge="div_release")):
        _gc(lambda x: smoothness_loss(x, img, **kw), d)

def test_gradcheck_featuremetric_aleatoric():
    torch.manual_seed(2)
    wf = torch.randn(1, 2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    rf = torch.randn(1, 3, 3, 4, dtype=torch.float64)
    v = torch.rand(1, 2, 1, 3, 4) > 0.2
    _gc(lambda x: featuremetric_loss(x, rf, v, top_k=1), wf)
    p, f, s = (torch.rand(1, 1, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    _gc(lambda a, b, c: aleatoric_loss(a, c, b, v[:, 0]), p, f, s)

def test_gradcheck_synthesis_and_perceptual():
    torch.manual_seed(3)
    ref = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    syn = (ref[:, None] + 0.2 * torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)).requires_grad_()
    v = torch.rand(1, 2, 1, 4, 4) > 0.2
    d = (3 + torch.rand(1, 1, 4, 4, dtype=torch.float64)).requires_grad_()
    vgg = VGG16Features(("relu1_1",)).double()
    _gc(lambda s, dd: synthesis_loss(s, v, ref, dd, SynthesisWeights(perceptual=0.5), vgg)[0], syn, d)

def test_gradcheck_unsup_through_depth():
    torch.manual_seed(4)
    H, W = 4, 5
    K = torch.tensor([[8.0, 0, 2.0], [0, 8.0, 1.5], [0, 0, 1]], dtype=torch.float64).expand(1, 3, 3, 3)
    w2c = torch.eye(4, dtype=torch.float64).repeat(1, 3, 1, 1); w2c[0, 1, 0, 3] = 0.1; w2c[0, 2, 1, 3] = -0.1
    images = torch.rand(1, 3, 3, H, W, dtype=torch.float64)
    depth = (2 + 0.3 * torch.rand(1, 1, H, W, dtype=torch.float64)).requires_grad_()
    cfg = unsup_config("khot", top_k=1, ssim_views=1)
    _gc(lambda d: unsup_loss({"stages": [dict(depth=d, K=K)]}, images, K, w2c, cfg)[0], depth)

# ------------------------------------------------------------------------------------------ VGG weights I/O
def test_feature_vgg_roundtrip_and_errors(tmp_path):
    torch.manual_seed(0)
    net = VGG16Features(("relu1_2", "relu2_2"))
    torch.save({f"features.{k}": v for k, v in net.features.state_dict().items()} | {"classifier.6.bias": torch.zeros(10)}, tmp_path / "full.pth")
    torch.save(net.features.state_dict(), tmp_path / "feat.pth")
    x = torch.rand(1, 3, 8, 8)
    for name in ("full.pth", "feat.pth"):
        loaded = load_vgg16_features(tmp_path / name, ("relu2_2",))
        torch.testing.assert_close(loaded(x)["relu2_2"], net(x)["relu2_2"])
        assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(InputError, match="not found"): load_vgg16_features(tmp_path / "missing.pth")
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(InputError, match="missing"): load_vgg16_features(tmp_path / "partial.pth")
    sd = net.features.state_dict(); sd["0.weight"] = torch.zeros(64, 1, 3, 3); torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(InputError, match="do not fit"): load_vgg16_features(tmp_path / "shape.pth", ("relu1_2",))
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="cannot read"): load_vgg16_features(tmp_path / "junk.pth")

def test_exception_perceptual_without_weights():
    syn, ok = torch.rand(1, 1, 3, 4, 4), torch.ones(1, 1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(InputError, match="no VGG-16 weights"):
        synthesis_loss(syn, ok, torch.rand(1, 3, 4, 4), torch.ones(1, 1, 4, 4), SynthesisWeights(perceptual=1.0))
    with pytest.raises(InputError, match="vgg16"):
        UnsupLoss(unsup_config("selfsup_cvp", cvp={"perceptual": 0.1}))

# --------------------------------------------------------------------------------------------- shapes/errors
def test_exception_shapes_and_options():
    ref, ok = torch.rand(1, 3, 4, 5), torch.ones(1, 1, 4, 5, dtype=torch.bool)
    with pytest.raises(ShapeError, match="valid"): reconstruction_error(ref, ref, ok[:, :, :3])
    with pytest.raises(ShapeError, match="warped"): photometric_loss(ref, ref, ok)
    with pytest.raises(InputError, match="top_k"): photometric_loss(ref[:, None], ref, ok[:, None], top_k=2)
    with pytest.raises(InputError, match="reduction"): ssim_loss(ref, ref, reduction="sum")
    with pytest.raises(InputError, match="grad_penalty"): reconstruction_error(ref, ref, ok, grad_penalty="l2")
    with pytest.raises(InputError, match="order"): smoothness_loss(ok.float(), ref, order=0)
    with pytest.raises(InputError, match="clamp"): smoothness_loss(ok.float(), ref, clamp=-1.0)
    with pytest.raises(InputError, match="edge"): smoothness_loss(ok.float(), ref, edge="canny")
    with pytest.raises(ShapeError, match="img"): smoothness_loss(ok.float(), ref[..., :3, :])

def test_modules_match_functions():
    torch.manual_seed(0)
    ref = torch.rand(1, 3, 5, 6); w = torch.rand(1, 2, 3, 5, 6); v = torch.rand(1, 2, 1, 5, 6) > 0.2
    assert PhotometricLoss(top_k=1)(w, ref, v) == photometric_loss(w, ref, v, top_k=1)
    assert SSIMLoss(padding="reflect")(w[:, 0], ref) == ssim_loss(w[:, 0], ref, padding="reflect")
    d = torch.rand(1, 1, 5, 6) + 2
    assert SmoothnessLoss(order=2, clamp=0.1)(d, ref) == smoothness_loss(d, ref, order=2, clamp=0.1)
    assert FeaturemetricLoss(top_k=2)(w, ref, v) == featuremetric_loss(w, ref, v, top_k=2)

# ------------------------------------------------------------------------------------------------- presets
def test_feature_presets_cite_the_published_values():
    c = {n: unsup_config(n) for n in UNSUP_PRESETS}
    assert c["khot"].weights == LossWeights(12.0, 6.0, 0.18) and c["khot"].top_k == 3 and not c["khot"].legacy_mean_reduction
    assert c["khot_release"].legacy_mean_reduction and c["khot_release"].top_k == 3
    for n in ("rc_release", "cl_release"):
        assert c[n].legacy_mean_reduction and c[n].top_k == 1 and c[n].stage_weights == [0.5, 1.0, 2.0]
    assert c["cl_release"].weights.photo == 8.0
    kd = c["kd_teacher"]
    assert kd.weights == LossWeights(24.0, 6.0, 0.18) and kd.top_k == 3 and kd.featuremetric and kd.aleatoric
    assert (kd.feat_weight, kd.log_var_weight, kd.aleatoric_scale) == (0.25, 0.1, 0.5)
    assert c["div_paper"].weights.smooth == 0.18 and c["div_paper"].smooth_clamp == 4.0 and c["div_paper"].smooth_order == 2
    assert c["div_release"].weights.smooth == 0.36 and c["div_release"].smooth_clamp == 2.0 and c["div_release"].edge == "div_release"
    assert c["selfsup_cvp"].synthesis == "probability" and c["selfsup_cvp"].cvp.perceptual == 0.0
    with pytest.raises(InputError, match="unknown loss preset"): unsup_config("nope")
    with pytest.raises(InputError, match="unknown loss config fields"): unsup_config("khot", top_K=1)

# ----------------------------------------------------------------------------------------- unsup composition
def _toy_batch(H=8, W=10, V=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = torch.tensor([[12.0, 0, 4.5], [0, 12.0, 3.5], [0, 0, 1]]).expand(1, V, 3, 3).clone()
    w2c = torch.eye(4).repeat(1, V, 1, 1)
    for v in range(1, V): w2c[0, v, 0, 3] = 0.15 * v
    images = torch.rand(1, V, 3, H, W, generator=g)
    depth = 2 + 0.5 * torch.rand(1, 1, H, W, generator=g)
    return images, K, w2c, depth

def test_feature_unsup_khot_equals_composition():
    images, K, w2c, depth = _toy_batch()
    cfg = unsup_config("khot", top_k=2)
    total, log = unsup_loss({"stages": [dict(depth=depth, K=K)]}, images, K, w2c, cfg)
    warped, valid = warp_sources(images, depth, K, w2c)
    photo = photometric_loss(warped, images[:, 0], valid, top_k=2)
    ss = ssim_loss(warped[:, 0], images[:, 0], valid[:, 0]) + ssim_loss(warped[:, 1], images[:, 0], valid[:, 1])
    sm = smoothness_loss(depth, images[:, 0])
    torch.testing.assert_close(total, 12 * photo + 6 * ss + 0.18 * sm)
    torch.testing.assert_close(log["photo"], photo); torch.testing.assert_close(log["s0.total"], total)

def test_feature_unsup_stage_weights_and_downsampling():
    images, K, w2c, depth = _toy_batch(H=8, W=12)
    out = oracle_outputs(depth, K, 1.5, 3.0, num_depth=8, scales=(0.5, 1.0))
    cfg = unsup_config("khot", stage_weights=[0.5, 2.0], top_k=1)
    total, log = unsup_loss(out, images, K, w2c, cfg)
    torch.testing.assert_close(total, 0.5 * log["s0.total"] + 2.0 * log["s1.total"])
    imgs, K_s = stage_views(images, K, 4, 6)
    torch.testing.assert_close(imgs[0, 0, :, 0, 0], images[0, 0, :, :2, :2].mean(dim=(1, 2)))  # area = 2x2 mean
    torch.testing.assert_close(K_s, out["stages"][0]["K"])
    with pytest.raises(InputError, match="stage weights"):
        unsup_loss(out, images, K, w2c, unsup_config("khot", stage_weights=[1.0]))

def test_feature_unsup_kd_teacher_equals_composition():
    images, K, w2c, depth = _toy_batch(V=4, seed=1)
    feats = torch.randn(1, 4, 5, 8, 10)
    log_var = 0.3 * torch.randn(1, 1, 8, 10)
    cfg = unsup_config("kd_teacher", stage_weights=None)
    total, log = unsup_loss({"stages": [dict(depth=depth, K=K, features=feats, log_var=log_var)]}, images, K, w2c, cfg)
    warped, valid = warp_sources(images, depth, K, w2c)
    err = torch.stack([reconstruction_error(warped[:, v], images[:, 0], valid[:, v]) for v in range(3)], 1)
    photo, c1 = topk_views(err, valid, 3)
    wf, vf = warp_sources(feats, depth, K, w2c)
    ferr = torch.stack([featuremetric_error(wf[:, v], feats[:, 0], vf[:, v]) for v in range(3)], 1)
    feat, c2 = topk_views(ferr, vf, 3)
    m = c1 & c2
    recon = 0.5 * (masked_mean(torch.exp(-log_var) * photo, m) + 0.25 * masked_mean(torch.exp(-log_var) * feat, m) + 0.1 * masked_mean(log_var, m))
    ss = sum(ssim_loss(warped[:, v], images[:, 0], valid[:, v]) for v in range(2))
    torch.testing.assert_close(total, 24 * recon + 6 * ss + 0.18 * smoothness_loss(depth, images[:, 0]))
    with pytest.raises(InputError, match="return_features"):
        unsup_loss({"stages": [dict(depth=depth, K=K, log_var=log_var)]}, images, K, w2c, cfg)

def test_feature_unsup_relative_clamp_needs_interval():
    images, K, w2c, depth = _toy_batch()
    cfg = unsup_config("khot", smooth_order=2, smooth_clamp=1.5, clamp_in_intervals=True)
    with pytest.raises(InputError, match="depth interval"):
        unsup_loss({"stages": [dict(depth=depth, K=K)]}, images, K, w2c, cfg)
    t1, l1 = unsup_loss({"stages": [dict(depth=depth, K=K)]}, images, K, w2c, cfg, depth_min=torch.tensor([1.0]), depth_max=torch.tensor([3.0]))
    assert l1["smooth"].item() == pytest.approx(smoothness_loss(depth, images[:, 0], order=2, clamp=1.5 * 2.0 / 192).item(), rel=1e-5)

def test_smoke_train_registry():
    train = pytest.importorskip("mvsnb.train")
    import mvsnb.losses.unsup  # noqa: F401  (registers the presets)
    for name in UNSUP_PRESETS: assert name in train._LOSSES
    loss_fn = train.build_loss("khot", {"top_k": 1})
    assert isinstance(loss_fn, UnsupLoss) and loss_fn.cfg.top_k == 1
    images, K, w2c, depth = _toy_batch()
    total, terms = loss_fn({"stages": [dict(depth=depth, K=K)]}, dict(images=images, K=K, w2c=w2c))
    assert total.ndim == 0 and set(terms) >= {"total", "photo", "ssim", "smooth"}

# ------------------------------------------------------------------------------------------ synthetic scene
@pytest.fixture(scope="module")
def scene():
    synthetic = pytest.importorskip("mvsnb.synthetic")
    return synthetic.make_scene()  # 5 views 64x80

@pytest.fixture(scope="module")
def dtu_scene():
    synthetic = pytest.importorskip("mvsnb.synthetic")
    return synthetic.make_scene(height=48, width=64, scale=100.0)

def test_feature_photometric_near_zero_with_true_depth(scene):
    from mvsnb.synthetic import LAMBERTIAN
    for ref in (0, 2):
        b = scene.mvs_batch(ref=ref)
        lamb = F.max_pool2d((scene.material[ref:ref + 1] != LAMBERTIAN).float(), 5, 1, 2) == 0
        flat = (F.max_pool2d(b["depth"], 5, 1, 2) + F.max_pool2d(-b["depth"], 5, 1, 2)) < 0.05 * b["depth"]
        core = lamb & flat
        assert core.float().mean() > 0.05
        def mean_loss(s):
            warped, valid = warp_sources(b["images"], b["depth"] * s, b["K"], b["w2c"])
            return masked_mean(photometric_loss(warped, b["images"][:, 0], valid, top_k=1, reduction="none"), core).item()
        at_true = mean_loss(1.0)
        assert at_true < 0.006, at_true  # resampling error only (SmoothL1 + gradient terms of images in [0,1])
        assert at_true < 0.5 * min(mean_loss(0.95), mean_loss(1.05))

def test_feature_div_clamped_smoothness_penalises_gt_less(dtu_scene):
    """DIV Fig. 2: on ground-truth depth the clamped 2nd-order loss is far below the 1st-order one."""
    for ref in range(dtu_scene.num_views):
        d, img = dtu_scene.depth[ref:ref + 1], dtu_scene.images[ref:ref + 1]
        first = smoothness_loss(d, img, order=1)
        assert smoothness_loss(d, img, order=2, clamp=4.0) < 0.3 * first  # paper: α = 4 mm at DTU scale
        assert smoothness_loss(d, img, order=2, clamp=2.0, edge="div_release") < 0.3 * smoothness_loss(d, img, order=1, edge="div_release")
        assert smoothness_loss(d, img, order=2) > first  # without the clamp, 2nd order is worse (why DIV clamps)
    interval = (dtu_scene.depth_max - dtu_scene.depth_min) / 192
    d, img = dtu_scene.depth[:1] / 100, dtu_scene.images[:1]  # unscaled: α in depth intervals instead
    assert smoothness_loss(d, img, order=2, clamp=1.5, depth_interval=interval / 100) < 0.3 * smoothness_loss(d, img, order=1)

def test_feature_every_preset_prefers_true_depth():
    synthetic = pytest.importorskip("mvsnb.synthetic")
    sc = synthetic.make_scene(height=32, width=40, scale=100.0)
    b = sc.mvs_batch(ref=0)
    torch.manual_seed(0)
    feats = nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)(b["images"].flatten(0, 1)).unflatten(0, (1, 5))
    oracle = lambda depth: oracle_outputs(depth, b["K"], sc.depth_min, sc.depth_max, features=feats)
    for name in UNSUP_PRESETS:
        loss_fn = build_unsup_loss(name, {"sup_views": 4})
        t_true, log = loss_fn(oracle(b["depth"]), b)
        t_far, _ = loss_fn(oracle(b["depth"] * 1.04), b)
        assert torch.isfinite(t_true) and t_true < t_far, name
        assert all(torch.isfinite(torch.as_tensor(v)) for v in log.values()), name

def test_feature_probability_synthesis_prefers_true_distribution(scene):
    from mvsnb.warp import depth_hypotheses
    b = scene.mvs_batch(ref=1, num_src=2)
    hyps = depth_hypotheses(b["depth_min"], b["depth_max"], 24, 64, 80)
    step = hyps[:, 1:2] - hyps[:, :1]
    sharp = lambda d: torch.softmax(-4 * ((hyps - d) / step) ** 2, 1)
    def loss(prob):
        synth, valid = synthesize_from_probability(b["images"], prob, hyps, b["K"], b["w2c"])
        return synthesis_loss(synth, valid, b["images"][:, 0], (prob * hyps).sum(1, keepdim=True))[0]
    l_true = loss(sharp(b["depth"]))
    assert l_true < loss(sharp(b["depth"] * 1.05)) and l_true < loss(torch.full_like(hyps, 1 / 24))

@pytest.mark.cuda
def test_cuda_presets_match_cpu():
    synthetic = pytest.importorskip("mvsnb.synthetic")
    sc = synthetic.make_scene(height=32, width=40, scale=100.0)
    b = sc.mvs_batch(ref=0)
    torch.manual_seed(0)
    feats = torch.rand(1, 5, 4, 32, 40)
    for name in UNSUP_PRESETS:
        res = {}
        for dev in ("cpu", "cuda"):
            torch.manual_seed(1)
            loss_fn = build_unsup_loss(name, {"sup_views": 4}).to(dev)
            bd = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in b.items()}
            out = oracle_outputs(bd["depth"], bd["K"], sc.depth_min, sc.depth_max, features=feats.to(dev))
            total, _ = loss_fn(out, bd)
            assert total.device.type == dev
            res[dev] = total.item()
        assert res["cuda"] == pytest.approx(res["cpu"], rel=1e-3, abs=1e-4), name

# ---------------------------------------------------------------------------------------- DIV occlusion on the warp loss
def test_feature_warp_occlusion_matches_brute_force_and_changes_only_occluded_pixels():
    "warp_occlusion (DIV Table 3 '+ occlusion' without synthesis): occluded views leave the per-pixel min-K, nothing else."
    from mvsnb.synthetic import make_scene
    from mvsnb.losses.unsup import warp_stage_loss, stage_visibility
    sc = make_scene(views=5, height=16, width=20, seed=0)
    b = sc.mvs_batch(ref=0)
    images, K, w2c, depth = b["images"].double(), b["K"].double(), b["w2c"].double(), b["depth"].double()
    div = dict(occ_tol=0.0, occ_tol_rel=0.004)
    off = unsup_config("khot", top_k=1, div=div)
    on = unsup_config("khot", top_k=1, div=div, warp_occlusion=True)
    _, t_off = warp_stage_loss(dict(depth=depth), images, K, w2c, off)
    _, t_on = warp_stage_loss(dict(depth=depth), images, K, w2c, on)
    visible = stage_visibility(depth, K, w2c, on)  # B,S,1,H,W
    warped, valid = warp_sources(images, depth, K, w2c)
    S, H, W = warped.shape[1], depth.shape[-2], depth.shape[-1]
    err = torch.stack([reconstruction_error(warped[:, s], images[:, 0], valid[:, s]) for s in range(S)], 1)

    def brute(use_visibility):  # per pixel: the smallest error among the candidate views; mean over pixels with one
        per_pixel = {}
        for i, j in itertools.product(range(H), range(W)):
            cands = [float(err[0, s, 0, i, j]) for s in range(S)
                     if valid[0, s, 0, i, j] and (not use_visibility or visible[0, s, 0, i, j])]
            if cands: per_pixel[(i, j)] = min(cands)
        return sum(per_pixel.values()) / len(per_pixel), per_pixel

    mean_off, px_off = brute(False)
    mean_on, px_on = brute(True)
    assert t_off["photo"].item() == pytest.approx(mean_off, rel=1e-9)
    assert t_on["photo"].item() == pytest.approx(mean_on, rel=1e-9)
    occluded = {(i, j) for i, j in itertools.product(range(H), range(W))
                if any(valid[0, s, 0, i, j] and not visible[0, s, 0, i, j] for s in range(S))}
    assert occluded, "the tiny scene must have occluded pixels for this test to mean anything"
    changed = {p for p in set(px_off) | set(px_on) if px_off.get(p) != px_on.get(p)}
    assert changed and changed <= occluded  # the loss changes, and only where some view is occluded
    for name in ("ssim", "smooth"): assert t_on[name].item() == t_off[name].item()
    assert "visible" in t_on and "visible" not in t_off


def test_exception_warp_occlusion_only_with_warp_synthesis():
    with pytest.raises(InputError, match="synthesis='warp' only"): unsup_config("div_paper", warp_occlusion=True)


def test_feature_loss_uses_sampled_supervision_views():
    "With sup_images in the batch the loss reconstructs the reference from them, not from the network's sources."
    from mvsnb.synthetic import make_scene
    from mvsnb.losses.unsup import supervision_views
    sc = make_scene(views=5, height=16, width=20, seed=0)
    b = sc.mvs_batch(ref=0)  # reference + 4 sources
    net = {k: b[k][:, :3] for k in ("images", "K", "w2c")}  # the network sees the reference + 2 sources
    sup = dict(sup_images=b["images"][:, 3:], sup_K=b["K"][:, 3:], sup_w2c=b["w2c"][:, 3:])  # the loss: the other 2
    batch = {**b, **net, **sup}
    imgs, Ks, w2cs = supervision_views(batch)
    assert torch.equal(imgs, torch.cat([b["images"][:, :1], b["images"][:, 3:]], 1))
    out = oracle_outputs(b["depth"], Ks, sc.depth_min, sc.depth_max, scales=(1.0,))
    loss = UnsupLoss(unsup_config("khot", top_k=1))
    got, _ = loss(out, batch)
    want, _ = unsup_loss(out, imgs, Ks, w2cs, unsup_config("khot", top_k=1))
    plain, _ = loss(out, {**b, **net})
    assert got.item() == pytest.approx(want.item(), rel=1e-6) and got.item() != pytest.approx(plain.item(), rel=1e-6)
    with pytest.raises(InputError, match="sup_K"): supervision_views({**batch, "sup_K": None})
