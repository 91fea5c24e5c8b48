import json

import pytest

from dmfnet.cli import main
from models.images.imaging import decode_image, encode_png
from models.images.phantoms import phantom_pair


@pytest.fixture
def pet_files(tmp_path):
    m, f = phantom_pair("pet", 48, 40, seed=1)
    (tmp_path / "m.png").write_bytes(encode_png(m))
    (tmp_path / "p.png").write_bytes(encode_png(f))
    return tmp_path


def test_fuse_single_pair_warns_about_random_model(pet_files, capsys):
    out = pet_files / "fused.png"
    rc = main(["fuse", str(pet_files / "m.png"), str(pet_files / "p.png"), "-o", str(out), "--weights", "random:tiny"])
    assert rc == 0
    assert "RANDOM-INITIALISED" in capsys.readouterr().err
    img = decode_image(out.read_bytes())
    assert img.size == (48, 40) and img.is_color


def test_fuse_pairs_directory(pair_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["fuse", "--pairs", str(pair_dir), "--out", str(out), "--weights", "random:tiny"]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == [
        "MRI-CT/1001.png",
        "MRI-CT/2001.png",
        "MRI-PET/3001.png",
        "MRI-PET/4001.png",
        "MRI-SPECT/5001.png",
    ]


def test_fuse_errors(pet_files, capsys):
    (pet_files / "bad.png").write_bytes(b"garbage")
    rc = main(
        [
            "fuse",
            str(pet_files / "m.png"),
            str(pet_files / "bad.png"),
            "-o",
            str(pet_files / "o.png"),
            "--weights",
            "random:tiny",
        ]
    )
    assert rc == 1 and "not a recognised image" in capsys.readouterr().err
    assert main(["fuse", "--weights", "random:tiny"]) == 2
    rc = main(["fuse", str(pet_files / "m.png"), str(pet_files / "p.png"), "-o", "x.png", "--weights", "/no/such.pt"])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_info_reports_device_and_checksum(capsys):
    assert main(["info", "--weights", "random:tiny"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device"] == "cpu" and info["random_init"] is True and info["config"] == "tiny"


def test_eval_baselines_json_and_report(pair_dir, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["eval", "--pairs", str(pair_dir), "--method", "average,max", "--out", str(out), "--json",
               "--workers", "1"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"average", "max"}
    assert doc["max"]["MRI-CT"]["n"] == 2 and doc["max"]["MRI-SPECT"]["n"] == 1
    assert doc["max"]["MRI-PET"]["SD"] > doc["average"]["MRI-PET"]["SD"]  # max keeps more contrast
    for name in ("per_image.csv", "summary.csv", "summary.json", "report.md", "contact_sheet.png"):
        assert (out / name).stat().st_size > 0
    assert len((out / "per_image.csv").read_text().splitlines()) == 1 + 5 * 2


def test_eval_scores_already_fused_directory(pair_dir, tmp_path, capsys):
    fused = tmp_path / "fused"
    assert main(["fuse", "--pairs", str(pair_dir), "--out", str(fused), "--weights", "random:tiny"]) == 0
    capsys.readouterr()
    rc = main(["eval", "--pairs", str(pair_dir), "--fused", str(fused), "--out", str(tmp_path / "r"), "--json",
               "--workers", "2"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert {t: s["n"] for t, s in doc.items()} == {"MRI-CT": 2, "MRI-PET": 2, "MRI-SPECT": 1}


def test_eval_compares_other_methods_folders_in_tables_and_a_plot(pair_dir, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["fuse", "--pairs", str(pair_dir), "--out", str(other), "--weights", "random:tiny"]) == 0
    capsys.readouterr()
    out = tmp_path / "r"
    rc = main(["eval", "--pairs", str(pair_dir), "--method", "average,max", "--compare", f"PeerNet={other}",
               "--out", str(out), "--json", "--workers", "1"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc) == ["average", "max", "PeerNet"] and doc["PeerNet"]["MRI-PET"]["n"] == 2
    assert doc["PeerNet"]["MRI-CT"]["SSIM"] != doc["average"]["MRI-CT"]["SSIM"]  # its own images were scored
    plot = decode_image((out / "metrics.png").read_bytes())
    assert plot.pixels.shape[1] > 1000 and "metrics.png" in (out / "report.md").read_text()


@pytest.mark.parametrize("bad", ["PeerNet", "model=DIR", "=DIR", "missing"])
def test_eval_compare_refuses_a_bad_folder_with_one_line(pair_dir, tmp_path, capsys, bad):
    arg = f"X={tmp_path / 'nowhere'}" if bad == "missing" else bad
    assert main(["eval", "--pairs", str(pair_dir), "--method", "average", "--compare", arg,
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "report.md").exists()


def test_eval_rejects_unknown_method(pair_dir, tmp_path, capsys):
    assert main(["eval", "--pairs", str(pair_dir), "--method", "magic", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_sample_pairs_fuse_through_the_documented_path(tmp_path):
    assert main(["sample", str(tmp_path), "--size", "64"]) == 0
    out = tmp_path / "fused.png"
    rc = main(["fuse", str(tmp_path / "sample_pet_mri.png"), str(tmp_path / "sample_pet_pet.png"), "-o", str(out),
               "--weights", "random:tiny"])
    assert rc == 0 and decode_image(out.read_bytes()).is_color


def test_fuse_from_the_shell_ends_without_teardown_and_loses_nothing(tmp_path):
    """``python -m dmfnet fuse`` on volumes exits through os._exit once everything is written: the NIfTI, its
    sidecar and the printed line are all there, and the exit code is the command's (0, then 1 for a refusal)."""
    import subprocess
    import sys
    from pathlib import Path

    import nibabel as nib

    from models.volumes import phantom as pv
    from models.volumes.nifti import save_nifti

    save_nifti(tmp_path / "t1.nii.gz", pv.sample("MR", 32, 2.0, 4, 3.0))
    save_nifti(tmp_path / "pet.nii.gz", pv.sample("PT", 16, 4.0, 3, 4.0))
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "dmfnet", "fuse", str(tmp_path / "t1.nii.gz"), str(tmp_path / "pet.nii.gz"),
           "--modality", "pet", "--weights", "fast", "-o", str(tmp_path / "out.nii.gz")]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wrote" in done.stdout and "out.nii.gz" in done.stdout
    assert nib.load(tmp_path / "out.nii.gz").shape[:3] == (32, 32, 4)  # RGB24, the whole MR grid
    assert json.loads((tmp_path / "out.json").read_text())["modality"] == "pet"
    cmd[5] = str(tmp_path / "missing.nii.gz")
    refused = subprocess.run([*cmd[:-1], str(tmp_path / "out2.nii.gz")], cwd=root, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode != 0 and refused.stderr.strip() and not (tmp_path / "out2.nii.gz").exists()


def test_teardown_is_kept_while_a_thread_or_child_still_works():
    import threading

    from dmfnet.cli import _nothing_left_to_finish

    assert _nothing_left_to_finish()
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        assert not _nothing_left_to_finish()
    finally:
        stop.set()
        worker.join()


BRK_PROBE = """
import ctypes, sys
libc = ctypes.CDLL("libc.so.6"); libc.sbrk.restype = ctypes.c_void_p
if sys.argv[1] == "keep":
    from models.inference.hardware import keep_freed_memory
    assert keep_freed_memory()
import numpy as np
start = libc.sbrk(0); a = np.ones(64 << 20, np.uint8); grown = libc.sbrk(0); del a; kept = libc.sbrk(0)
print((grown - start) >> 20, (kept - start) >> 20)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's mallopt")
def test_batch_commands_take_big_tensors_from_a_heap_they_keep(tmp_path):
    """keep_freed_memory: a 64 MB array comes from the heap (the program break moves) and stays there after it is
    freed, for the next tensor; without it glibc maps and unmaps it (the break does not move)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    def probe(mode: str) -> list[int]:
        done = subprocess.run([sys.executable, "-c", BRK_PROBE, mode], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, check=True)
        return [int(v) for v in done.stdout.split()]

    assert probe("default") == [0, 0]
    grown, kept = probe("keep")
    assert grown >= 64 and kept >= 64


@pytest.mark.parametrize(("argv", "expected"), [
    (["fuse", "a.png", "b.png", "-o", "f.png"], True), (["eval", "--pairs", "d"], True), (["train", "stage2"], True),
    (["pacs", "--config", "c.yaml", "fuse-study", "--study", "1.2"], True),
    (["serve"], False), (["pacs", "listen"], False), (["pacs", "watch"], False), (["info"], False), ([], False),
])
def test_only_commands_that_end_when_done_keep_freed_memory(argv, expected):
    from dmfnet.cli import ends_when_done

    assert ends_when_done(argv) is expected
