"""The `mvsnb` console command, run as users run it: in a subprocess."""
import json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest

MVSNB = [str(Path(sys.executable).with_name("mvsnb"))]  # the installed console script

def run(*args, cwd=None):
    return subprocess.run(MVSNB + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=300)

def test_smoke_help_has_example():
    for cmd in ("synth", "data"):
        r = run(cmd, "--help")
        assert r.returncode == 0 and "example:" in r.stdout, r.stdout + r.stderr
    r = run("data", "import", "--help"); assert r.returncode == 0 and "example:" in r.stdout

def test_feature_synth_writes_dtu_layout(tmp_path):
    out = tmp_path / "scene"
    r = run("synth", "--out", out, "--views", 3, "--height", 32, "--width", 40, "--seed", 1)
    assert r.returncode == 0, r.stderr
    assert "3 views 32x40" in r.stdout
    names = sorted(p.name for p in out.iterdir())
    for want in ("cams", "images", "pair.txt", "gt"): assert want in names
    assert len(list((out / "images").iterdir())) == 3 and len(list((out / "cams").iterdir())) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"

@pytest.mark.parametrize("args,needle", [
    (["--views", "1"], "--views must be at least 2"),
    (["--views", "x"], "expected a whole number"),
    (["--height", "4"], "at least 8"),
])
def test_exception_synth_bad_args_one_line(tmp_path, args, needle):
    r = run("synth", "--out", tmp_path / "s", *args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not (tmp_path / "s").exists()

def test_exception_synth_refuses_existing_folder(tmp_path):
    out = tmp_path / "s"; out.mkdir(); (out / "keep.txt").write_text("mine")
    r = run("synth", "--out", out, "--views", 2, "--height", 16, "--width", 20)
    assert r.returncode == 1 and "output folder exists" in r.stderr and "Traceback" not in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    r = run("synth", "--out", out, "--views", 2, "--height", 16, "--width", 20, "--overwrite")
    assert r.returncode == 0 and not (out / "keep.txt").exists()

def test_feature_debug_shows_traceback(tmp_path):
    out = tmp_path / "s"; out.mkdir()
    r = run("synth", "--out", out, "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr

def test_feature_data_check_synthetic(tmp_path):
    out = tmp_path / "scene"
    assert run("synth", "--out", out, "--views", 3, "--height", 16, "--width", 20).returncode == 0
    r = run("data", "check", "synthetic", out)
    assert r.returncode == 0, r.stdout + r.stderr
    (out / "images" / "00000001.png").unlink()
    r = run("data", "check", "synthetic", out)
    assert r.returncode == 1 and "00000001.png" in r.stdout, r.stdout + r.stderr

def test_feature_import_stereo_pair_from_skimage(tmp_path):
    out = tmp_path / "moto"
    r = run("data", "import", "stereo-pair", "--out", out)
    assert r.returncode == 0, r.stderr
    assert (out / "pair.txt").exists() and len(list((out / "cams").iterdir())) == 2

def test_feature_import_middlebury(tmp_path, realdata):
    out = tmp_path / "temple"
    r = run("data", "import", "middlebury-ring", realdata / "middlebury_sparse_ring" / "templeSparseRing", "--out", out, "--downscale", 4)
    assert r.returncode == 0, r.stderr
    assert len(list((out / "images").iterdir())) == 16

def test_exception_import_missing_source(tmp_path):
    r = run("data", "import", "strecha", tmp_path / "nope", "--out", tmp_path / "o")
    assert r.returncode == 1 and "source folder not found" in r.stderr and not (tmp_path / "o").exists()

@pytest.fixture(scope="module")
def scene_with_outputs(tmp_path_factory):
    "A synthetic scene plus 'network outputs' = GT depth with 1 % noise, in the MVSNet output layout."
    from mvsnb.io import read_pfm, write_pfm
    root = tmp_path_factory.mktemp("cli")
    scene = root / "scene"
    assert run("synth", "--out", scene, "--views", 4, "--height", 48, "--width", 64).returncode == 0
    rng = np.random.default_rng(0)
    for p in sorted((scene / "gt" / "depth").glob("*.pfm")):
        d = read_pfm(p); noisy = d * (1 + 0.01 * rng.standard_normal(d.shape)).astype(np.float32)
        write_pfm(root / "out" / "depth_est" / p.name, np.where(d > 0, noisy, 0).astype(np.float32))
        write_pfm(root / "out" / "confidence" / p.name, np.full_like(d, 0.9))
    return root, scene, root / "out"

def test_feature_check_fuse_labels_eval_chain(scene_with_outputs):
    root, scene, out = scene_with_outputs
    r = run("check", "--scene", scene, "--depth-dir", out, "--out", root / "checked", "--min-views", 1)
    assert r.returncode == 0, r.stderr
    summary = json.loads((root / "checked" / "summary.json").read_text())
    assert len(list((root / "checked" / "checked_depth").glob("*.pfm"))) == 4 and summary
    r = run("fuse", "--scene", scene, "--depth-dir", out, "--out", root / "cloud.ply", "--min-views", 1)
    assert r.returncode == 0, r.stderr
    r = run("eval", "--pred", root / "cloud.ply", "--scene", scene)
    assert r.returncode == 0, r.stderr
    m = json.loads((root / "cloud.metrics.json").read_text())
    assert 0 <= m["accuracy"] < 0.2 * (m.get("max_dist") or 1e9)
    for method in ("kd", "spsr"):
        r = run("labels", "--scene", scene, "--depth-dir", out, "--out", root / f"labels_{method}", "--method", method, "--min-views", 1)
        assert r.returncode == 0, r.stderr
        assert (root / f"labels_{method}" / "manifest.json").exists()
        assert len(list((root / f"labels_{method}" / "depth").glob("*.pfm"))) == 4

def test_exception_run_rejects_unknown_parameter(tmp_path):
    nb = Path(__file__).resolve().parents[1] / "nbs" / "pipelines" / "00_synthetic_scene.ipynb"
    r = run("run", nb, "--run-dir", tmp_path / "r", "-p", "veiws", "3")
    assert r.returncode == 1 and "veiws" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

def test_exception_eval_missing_prediction(tmp_path):
    r = run("eval", "--pred", tmp_path / "none.ply", "--scene", tmp_path)
    assert r.returncode == 1 and "prediction not found" in r.stderr
