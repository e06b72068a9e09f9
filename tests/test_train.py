"""mvsnb.train: checkpoints, resume equivalence, loss decrease, DDP on the CPU (gloo, 2 processes)."""
import dataclasses, json, os, socket
from pathlib import Path
import pytest
import torch
import torch.multiprocessing as mp
from mvsnb.core import InputError
from mvsnb import train as T
from mvsnb.train import (TrainConfig, train_config, train, save_checkpoint, load_checkpoint, read_checkpoint,
                         model_from_checkpoint, ToyMVSNet, ToyConfig, plane_pair_dataset, toy_photometric_loss,
                         collate_views, lr_factor, SeededSampler, depth_metrics, holdout_photometric_error)


def toy_cfg(run_dir, **kw):
    base = dict(model="toy", model_preset="", loss="toy_photo", steps=8, lr=1e-2, log_every=2, ckpt_every=4,
                val_every=4, run_dir=str(run_dir), progress=False)
    return train_config("tiny_cpu", **{**base, **kw})


def same_weights(a, b, atol=1e-6):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa: torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=atol, msg=k)


# ---------------------------------------------------------------- config and schedule
def test_exception_config_unknown_field_and_bad_values():
    with pytest.raises(InputError, match=r"unknown TrainConfig field\(s\) \['stepz'\]"): train_config("tiny_cpu", stepz=3)
    with pytest.raises(InputError, match=r"\[schedule\]"): TrainConfig(schedule="poly")
    with pytest.raises(InputError, match=r"\[milestones\]"): TrainConfig(milestones=[12, 10])


def test_feature_schedule_matches_per_step_reference():
    "lr_factor against a direct per-step implementation of CasMVSNet's warm-up + multi-step rule."
    cfg = train_config("casmvsnet", warmup_steps=10, milestones=[2, 3.5])
    spe = 7
    for s in range(40):
        ref = 0.5 ** ((s >= 14) + (s >= round(3.5 * 7)))
        if s < 10: ref *= (1 / 3) * (1 - s / 10) + s / 10
        assert abs(lr_factor(s, cfg, 40, spe) - ref) < 1e-12, s
    # the optimiser actually sees it
    run = train(toy_cfg("", steps=6, log_every=1, schedule="multistep", milestones=[1], gamma=0.5,
                        warmup_steps=0, lr=0.1, val_every=0), plane_pair_dataset(3))
    lrs = [r["lr"] for r in run.history if r["kind"] == "train"]
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05])  # 3 steps per epoch, halved after epoch 1


def test_feature_sampler_order_from_seed_and_epoch():
    a, b = SeededSampler(7, seed=3), SeededSampler(7, seed=3)
    a.set_epoch(2); b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3); assert list(a) != list(b)
    c = SeededSampler(7, seed=4); c.set_epoch(2); assert list(a) != list(c)


# ---------------------------------------------------------------- checkpoints
def test_smoke_checkpoint_round_trip_weights_only(tmp_path):
    torch.manual_seed(0)
    m = ToyMVSNet(ToyConfig(channels=6))
    cfg = toy_cfg(tmp_path, model_overrides={"channels": 6})
    opt = T.make_optimizer(m.parameters(), cfg)
    sched = T.make_scheduler(opt, cfg, 10, 2)
    batch = collate_views(plane_pair_dataset(1))
    out = m(batch["images"], batch["K"], batch["w2c"], batch["depth_min"], batch["depth_max"])
    toy_photometric_loss(out, batch)[0].backward(); opt.step(); sched.step()
    p = save_checkpoint(tmp_path / "c.pt", m, cfg, opt, sched, step=5, epoch=2, metrics={"holdout_photo": 0.1})
    ck = torch.load(p, weights_only=True)  # the point: no pickled classes
    assert ck["step"] == 5 and ck["epoch"] == 2 and ck["model_name"] == "toy"
    assert ck["model_config"] == {"channels": 6, "num_depth": 16, "dropout": 0.0}
    assert ck["config"] == json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert {"torch", "numpy", "python"} <= set(ck["rng"]) and ck["versions"]["format"] == T.CKPT_FORMAT
    assert not list(tmp_path.glob(".c.pt*"))  # no temp file left behind
    m2 = ToyMVSNet(ToyConfig(channels=6)); opt2 = T.make_optimizer(m2.parameters(), cfg); sched2 = T.make_scheduler(opt2, cfg, 10, 2)
    load_checkpoint(p, m2, opt2, sched2)
    same_weights(m, m2, atol=0)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert sched2.last_epoch == 1
    m3, ck3 = model_from_checkpoint(p)
    same_weights(m, m3, atol=0)


def test_exception_checkpoint_config_mismatch_names_fields(tmp_path):
    p = save_checkpoint(tmp_path / "c.pt", ToyMVSNet(ToyConfig(channels=6, num_depth=8)), toy_cfg(tmp_path))
    with pytest.raises(InputError) as e: load_checkpoint(p, ToyMVSNet(ToyConfig(channels=4, num_depth=8)))
    msg = str(e.value)
    assert "c.pt" in msg and "channels: 6 in the checkpoint, 4 in the model" in msg and "num_depth" not in msg


def test_feature_checkpoint_predating_a_config_field_loads_with_warning(tmp_path):
    "A checkpoint saved before a model-config field existed loads (with a warning naming it) if its weights fit; a changed value still fails."
    torch.manual_seed(0)
    m = ToyMVSNet(ToyConfig(channels=6))
    p = save_checkpoint(tmp_path / "c.pt", m, toy_cfg(tmp_path, model_overrides={"channels": 6}))
    ck = torch.load(p, weights_only=True)
    del ck["model_config"]["dropout"]  # as if `dropout` had been added to ToyConfig after this checkpoint was written
    old = tmp_path / "old.pt"; torch.save(ck, old)
    with pytest.warns(UserWarning, match=r"predates the model config fields dropout=0\.0"):
        m2, _ = model_from_checkpoint(old)
    same_weights(m, m2, atol=0)
    ck["model_config"]["channels"] = 4; torch.save(ck, old)  # a real difference is still refused
    with pytest.raises(InputError, match="channels: 4 in the checkpoint, 6 in the model"): load_checkpoint(old, ToyMVSNet(ToyConfig(channels=6)))


def test_exception_checkpoint_truncated_names_file(tmp_path):
    p = save_checkpoint(tmp_path / "full.pt", ToyMVSNet(), toy_cfg(tmp_path))
    data = p.read_bytes()
    for n in (0, 100, len(data) // 2, len(data) - 10):
        cut = tmp_path / f"cut{n}.pt"; cut.write_bytes(data[:n])
        with pytest.raises(InputError, match=f"cut{n}.pt"): load_checkpoint(cut, ToyMVSNet())
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(InputError, match="junk.pt"): read_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(InputError, match="not found"): read_checkpoint(tmp_path / "missing.pt")


# ---------------------------------------------------------------- the loop
def test_feature_resume_equals_uninterrupted(tmp_path):
    "Run N steps; run N/2, crash, resume to N: same weights, same log rows (CPU, deterministic)."
    data, val = plane_pair_dataset(3), plane_pair_dataset(2, views=3, seed=1)  # 3 items: epochs of 3 steps
    drop = {"dropout": 0.2}  # training draws from the global RNG: resume must restore it
    full = train(toy_cfg(tmp_path / "full", steps=10, ckpt_every=5, val_every=5, model_overrides=drop), data, val)

    class Crash(Exception): pass
    calls = [0]
    def crash_after_5(out, batch):
        calls[0] += 1
        if calls[0] > 5: raise Crash
        return toy_photometric_loss(out, batch)
    cfg = toy_cfg(tmp_path / "cut", steps=10, ckpt_every=5, val_every=5, model_overrides=drop)
    with pytest.raises(Crash): train(cfg, data, val, loss_fn=crash_after_5)  # dies mid-epoch (step 6 of 10)
    assert read_checkpoint(tmp_path / "cut/checkpoints/last.pt")["step"] == 5
    with pytest.raises(InputError, match="resume=True"): train(cfg, data, val)  # refuses to clobber
    resumed = train(dataclasses.replace(cfg, resume=True), data, val)
    assert resumed.step == 10
    same_weights(full.model, resumed.model)
    nosec = lambda rows: [{k: v for k, v in r.items() if k != "sec"} for r in rows]
    assert nosec(resumed.history) == nosec(full.history)
    logged = [json.loads(l) for l in (tmp_path / "cut/log.jsonl").read_text().splitlines()]
    assert nosec(logged) == nosec(full.history)  # the rows of the crashed tail were not duplicated
    # a different seed gives different weights (the comparison above can fail)
    other = train(toy_cfg(tmp_path / "other", steps=10, seed=1, ckpt_every=5, val_every=0, model_overrides=drop), data)
    with pytest.raises(AssertionError): same_weights(full.model, other.model)


def test_smoke_run_folder_contents(tmp_path):
    res = train(toy_cfg(tmp_path, steps=8, ckpt_every=2, keep_checkpoints=2), plane_pair_dataset(2),
                plane_pair_dataset(2, views=3, seed=1))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.pt", "last.pt", "step_00000006.pt", "step_00000008.pt"]
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 8
    train_rows = (tmp_path / "train_log.csv").read_text().splitlines()
    assert train_rows[0].startswith("step,epoch,lr,loss,photo") and len(train_rows) == 1 + 4
    assert len((tmp_path / "val_log.csv").read_text().splitlines()) == 1 + 2
    best = read_checkpoint(tmp_path / "checkpoints/best.pt")
    vals = [r["holdout_photo"] for r in res.history if r["kind"] == "val"]
    assert best["metrics"]["holdout_photo"] == pytest.approx(min(vals))


def test_feature_validation_metrics_against_loop_reference():
    "depth_metrics and the held-out error against per-pixel Python loops on an 8x10 image."
    g = torch.Generator().manual_seed(0)
    gt = 2 + torch.rand(2, 1, 8, 10, generator=g); gt[0, 0, 0, 0] = 0
    pred = gt + 0.1 * torch.randn(2, 1, 8, 10, generator=g)
    mask = torch.rand(2, 1, 8, 10, generator=g) > 0.3
    rng = torch.tensor([4.0, 2.0])
    dm = depth_metrics(pred, gt, mask, rng, thresholds=[0.05], rel_thresholds=[0.02])
    errs, rels, in5, inr = [], [], 0, 0
    for b in range(2):
        for i in range(8):
            for j in range(10):
                if mask[b, 0, i, j] and gt[b, 0, i, j] > 0:
                    e = abs(float(pred[b, 0, i, j] - gt[b, 0, i, j])); errs.append(e); rels.append(e / float(rng[b]))
                    in5 += e <= 0.05; inr += e <= 0.02 * float(rng[b])
    assert dm["n_px"] == len(errs)
    assert dm["mae"] == pytest.approx(sum(errs) / len(errs), rel=1e-5)
    assert dm["mae_rel"] == pytest.approx(sum(rels) / len(rels), rel=1e-5)
    assert dm["within_0.05"] == pytest.approx(100 * in5 / len(errs), rel=1e-5)
    assert dm["within_rel_0.02"] == pytest.approx(100 * inr / len(errs), rel=1e-5)
    assert dm["median_ae"] == pytest.approx(float(torch.tensor(errs).median()), rel=1e-5)
    # held-out error: loop over pixels, projecting by hand
    b = collate_views(plane_pair_dataset(1, H=8, W=10, views=3))
    depth = b["depth_gt"] * 1.1
    h = holdout_photometric_error(depth, b, 2)
    K, w2c, img = b["K"][0], b["w2c"][0], b["images"][0]
    T_ = w2c[2] @ torch.linalg.inv(w2c[0])
    tot, n = 0.0, 0
    for i in range(8):
        for j in range(10):
            x = torch.linalg.inv(K[0]) @ torch.tensor([j, i, 1.0]) * depth[0, 0, i, j]
            p = K[2] @ (T_[:3, :3] @ x + T_[:3, 3]); u, v = float(p[0] / p[2]), float(p[1] / p[2])
            if -1e-3 <= u <= 9 + 1e-3 and -1e-3 <= v <= 7 + 1e-3:  # round-off at the border counts as inside
                u, v = min(max(u, 0), 9), min(max(v, 0), 7)
                u0, v0 = min(int(u), 8), min(int(v), 6); a, c = u - u0, v - v0
                s = (img[2, :, v0, u0] * (1 - a) * (1 - c) + img[2, :, v0, u0 + 1] * a * (1 - c)
                     + img[2, :, v0 + 1, u0] * (1 - a) * c + img[2, :, v0 + 1, u0 + 1] * a * c)
                tot += float((s - img[0, :, i, j]).abs().mean()); n += 1
    assert h["holdout_valid"] == pytest.approx(n / 80)
    assert h["holdout_photo"] == pytest.approx(tot / n, rel=1e-4)


def test_feature_validate_holdout_switch():
    "validate holds out the last view by default (V >= 3) and none with val_holdout_view=0."
    val = plane_pair_dataset(2, views=3)
    seen = []
    class Spy(ToyMVSNet):
        def forward(self, images, *a):
            seen.append(images.shape[1]); return super().forward(images, *a)
    m = Spy()
    with_hold = T.validate(m, val, train_config("tiny_cpu"))
    no_hold = T.validate(m, val, train_config("tiny_cpu", val_holdout_view=0))
    assert "holdout_photo" in with_hold and "holdout_photo" not in no_hold and "mae" in no_hold
    assert seen == [2, 2, 3, 3]  # two samples: the network saw V-1 views, then all V


@pytest.mark.cuda
def test_smoke_cuda_amp(tmp_path):
    "AMP (float16 + GradScaler, and bfloat16) on a GPU: finite losses, checkpoint with the scaler state."
    for dt in ("float16", "bfloat16"):
        res = train(toy_cfg(tmp_path / dt, device="cuda", amp=True, amp_dtype=dt, steps=4, val_every=0), plane_pair_dataset(2))
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in res.history if r["kind"] == "train")
        ck = read_checkpoint(tmp_path / dt / "checkpoints/last.pt")
        assert ("scaler" in ck) == (dt == "float16")


# ---------------------------------------------------------------- a real model and loss on the synthetic scene
def _scene_data(num_views=3, H=32, W=40):
    synthetic = pytest.importorskip("mvsnb.synthetic")
    data = pytest.importorskip("mvsnb.data")
    scene = synthetic.make_scene(views=4, height=H, width=W, seed=0)
    return (data.SceneDataset(scene, num_views=num_views, num_depth=48),
            data.SceneDataset(scene, num_views=num_views + 1, num_depth=48))


@pytest.mark.parametrize("model", ["cascade", "cvp"])
def test_feature_loss_decreases_on_synthetic_scene(tmp_path, model):
    "~20 steps of the unsupervised teacher on a tiny synthetic scene lower the photometric loss."
    if model not in T.model_names() or "khot" not in T.loss_names(): pytest.skip(f"{model} / khot not registered yet")
    tr, _ = _scene_data()
    cfg = train_config("tiny_cpu", model=model, model_preset="tiny", loss="khot", steps=20, lr=3e-3, log_every=1,
                       ckpt_every=20, run_dir=str(tmp_path), progress=False)
    res = train(cfg, tr)
    losses = [r["loss"] for r in res.history if r["kind"] == "train"]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.9 * first, (first, last)


# ---------------------------------------------------------------- DDP on the CPU
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _ddp_worker(rank, world, port, run_dir, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import mvsnb.train as TT
    if rank != 0:  # any write from a non-zero rank fails the run
        def forbidden(*a, **k): raise AssertionError(f"rank {rank} wrote to the run folder")
        TT.save_checkpoint = forbidden; TT._append_log = forbidden; TT._write_tables = forbidden
    cfg = toy_cfg(run_dir, steps=6, ckpt_every=3, val_every=3, log_every=1)
    res = TT.train(cfg, TT.plane_pair_dataset(4), TT.plane_pair_dataset(2, views=3, seed=1))
    torch.save({k: v.clone() for k, v in res.model.state_dict().items()}, Path(out_dir) / f"rank{rank}.pt")


def test_feature_ddp_gloo_two_processes(tmp_path):
    "2 CPU processes (gloo): identical final weights; only rank 0 writes; it differs from one-process training."
    run_dir, out = tmp_path / "run", tmp_path / "out"; out.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(run_dir), str(out)), nprocs=2, join=True)
    w0, w1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in w0: torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0, msg=k)
    assert (run_dir / "checkpoints/last.pt").exists()
    rows = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]  # one writer, no duplicates
    ck = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    for k in w0: torch.testing.assert_close(ck["model"][k], w0[k], rtol=0, atol=0)
    # each rank saw half of every epoch: the result differs from a single process on the same data
    single = train(toy_cfg(tmp_path / "single", steps=6, ckpt_every=3, val_every=0, log_every=1), plane_pair_dataset(4))
    assert any(not torch.equal(single.model.state_dict()[k], w0[k]) for k in w0)


def test_feature_kd_teacher_loss_trains_with_features_and_log_variance(tmp_path):
    "The KD-MVS teacher loss needs the model's features and log-variance head; the loop must supply them."
    from mvsnb.synthetic import make_scene
    from mvsnb.data import SceneDataset
    from mvsnb.train import train_config, train
    scene = make_scene(views=4, height=32, width=40)
    cfg = train_config("tiny_cpu", model="cascade", loss="kd_teacher", steps=2, run_dir=str(tmp_path / "run"),
                       model_overrides={"uncertainty": True})
    res = train(cfg, SceneDataset(scene, num_views=4))
    rows = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any("feat" in k for r in rows for k in r), rows[:1]
