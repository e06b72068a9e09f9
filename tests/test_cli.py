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
