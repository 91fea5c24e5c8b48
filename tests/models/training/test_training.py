"""Training: tiny Stage I / Stage II runs, bit-for-bit resume, and a 2-process gloo (torchrun) job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dmfnet.cli import main
from models.images.imaging import encode_png
from models.images.phantoms import phantom_pair
from models.inference.pipeline import FusionPipeline
from models.inference.weights import load_weights
from models.nets.losses import LossWeights, hybrid_loss
from models.training.common import CsvLog, mean_parts
from models.training.config import DataConfig, Stage2Config, TeacherTerms
from models.training.data import CropSampler, DataError, check_tasks_present, load_split, task_sampling_weights
from models.training.stage2 import batch_loss, batch_teacher_terms
from models.training.teacher import teacher_terms

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """Harvard-like phantom pairs of three tasks, two cases each, and a split by case."""
    root = tmp_path_factory.mktemp("harvard")
    for modality, cases in (("ct", (1, 2)), ("pet", (3, 4)), ("spect", (5, 6))):
        d = root / f"MRI-{modality.upper()}"
        d.mkdir()
        for c in cases:
            for k in range(2):
                m, f = phantom_pair(modality, 48, 48, seed=c * 10 + k)
                (d / f"{c}00{k}_mri.png").write_bytes(encode_png(m))
                (d / f"{c}00{k}_{modality}.png").write_bytes(encode_png(f))
    split = root / "split.json"
    split.write_text(json.dumps({"val_cases": ["2", "4", "6"]}))
    return root, split


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _stage1_cfg(run: Path, dataset, **kw) -> dict:
    root, split = dataset
    cfg = {
        "run_dir": str(run), "model": "tiny", "batch_size": 2, "max_steps": 6, "warmup_steps": 100,
        "ckpt_every": 3, "val_every": 3, "log_every": 1, "threads": 1, "precision": "fp32",
        "data": {"root": str(root), "split_file": str(split), "crop": 32, "val_crops": 4},
    }
    cfg.update(kw)
    return cfg


def _stage2_after_stage1(tmp_path: Path, dataset, **kw) -> Path:
    """A two-step Stage I run in tmp_path/s1, then the config file of a Stage II run (tmp_path/s2) on it."""
    assert _train("stage1", _write(tmp_path / "s1.yaml", _stage1_cfg(tmp_path / "s1", dataset, max_steps=2))) == 0
    root, split = dataset
    return _write(tmp_path / "s2.yaml", {
        "run_dir": str(tmp_path / "s2"), "stage1_checkpoint": str(tmp_path / "s1" / "checkpoint.pt"),
        "batch_size": 2, "ckpt_every": 2, "val_every": 2, "log_every": 1, "threads": 1,
        "data": {"root": str(root), "split_file": str(split), "crop": 32}, **kw,
    })


def _train(stage: str, cfg_path: Path, *extra: str) -> int:
    return main(["train", stage, "--config", str(cfg_path), "--no-progress", *extra])


def _same_state(a: dict, b: dict) -> None:
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stage1_resume_is_bit_for_bit(dataset, tmp_path):
    straight = _write(tmp_path / "a.yaml", _stage1_cfg(tmp_path / "a", dataset))
    assert _train("stage1", straight) == 0
    # Same run interrupted at step 3 (a checkpoint), then resumed to step 6.
    first = _write(tmp_path / "b.yaml", _stage1_cfg(tmp_path / "b", dataset, max_steps=3))
    assert _train("stage1", first) == 0
    second = _write(tmp_path / "b.yaml", _stage1_cfg(tmp_path / "b", dataset))
    assert _train("stage1", second, "--resume") == 0
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    _same_state(a["unet"], b["unet"])
    _same_state(a["ema"], b["ema"])
    log = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in log[1:]] == [str(i) for i in range(1, 7)]  # no duplicated rows
    assert (tmp_path / "b" / "loss.png").stat().st_size > 0


def test_stage1_continues_from_an_earlier_unet(dataset, tmp_path):
    """init_unet: a longer Stage I starts from an earlier run's EMA UNet (logged at step 0), and resuming the
    continuation restores its own checkpoint, not the starting UNet."""
    from models.nets.configs import get_config

    v4_like = get_config("tiny").model_dump(mode="json")
    v4_like["fusion"]["reuse_timestep"] = 5  # a model config "tiny" alone does not name
    # ema_decay 0 and a large step: an EMA far from any random init
    moved = {"max_steps": 3, "lr": 1e-2, "warmup_steps": 1, "ema_decay": 0.0, "model": v4_like}
    assert _train("stage1", _write(tmp_path / "s.yaml", _stage1_cfg(tmp_path / "s", dataset, **moved))) == 0
    start = torch.load(tmp_path / "s" / "checkpoint.pt", weights_only=False)["ema"]
    tiny_steps = {"max_steps": 2, "ckpt_every": 2, "val_every": 100, "lr": 1e-7, "seed": 7, "ema_decay": 0.0}
    more = _stage1_cfg(tmp_path / "l", dataset, init_unet=str(tmp_path / "s" / "checkpoint.pt"), **tiny_steps)
    assert _train("stage1", _write(tmp_path / "l.yaml", more)) == 0
    rows = (tmp_path / "l" / "log.csv").read_text().splitlines()
    assert rows[1].startswith("0,") and rows[1].split(",")[2]  # the starting UNet's validation loss
    cont_state = torch.load(tmp_path / "l" / "checkpoint.pt", weights_only=False)
    assert cont_state["model_config"]["fusion"]["reuse_timestep"] == 5  # the start's config, not "tiny"
    cont = cont_state["ema"]
    fresh = _stage1_cfg(tmp_path / "f", dataset, **tiny_steps)  # the same run without init_unet
    assert _train("stage1", _write(tmp_path / "f.yaml", fresh)) == 0
    rand = torch.load(tmp_path / "f" / "checkpoint.pt", weights_only=False)["ema"]
    near = sum((cont[k].float() - start[k].float()).abs().sum() for k in start)
    far = sum((rand[k].float() - start[k].float()).abs().sum() for k in start)
    assert near < 0.01 * far
    assert _train("stage1", _write(tmp_path / "l.yaml", {**more, "max_steps": 4}), "--resume") == 0
    assert torch.load(tmp_path / "l" / "checkpoint.pt", weights_only=False)["step"] == 4


def test_stage1_refuses_to_overwrite_a_run(dataset, tmp_path, capsys):
    cfg = _write(tmp_path / "c.yaml", _stage1_cfg(tmp_path / "c", dataset, max_steps=1))
    assert _train("stage1", cfg) == 0
    assert _train("stage1", cfg) != 0
    assert "--resume" in capsys.readouterr().err


def test_bad_config_is_reported_clearly(dataset, tmp_path, capsys):
    cfg = _write(tmp_path / "bad.yaml", _stage1_cfg(tmp_path / "x", dataset, batch_sise=3))
    assert _train("stage1", cfg) == 2
    assert "batch_sise" in capsys.readouterr().err


def test_task_weights_shift_what_the_sampler_draws(dataset):
    root, split = dataset
    pairs = load_split(root, split)["train"]
    weights = task_sampling_weights(pairs, {"MRI-CT": 8.0})
    assert task_sampling_weights(pairs, {}) is None
    # Image i holds the constant i, so a crop tells which pair it came from.
    images = np.stack([np.full((1, 8, 8), i, np.float32) for i in range(len(pairs))])
    drawn = CropSampler(images, 4, weights).sample(4000, torch.Generator().manual_seed(0))[:, 0, 0, 0].long()
    ct_share = float(np.mean([pairs[i].task == "MRI-CT" for i in drawn.tolist()]))
    assert abs(ct_share - 8 / 10) < 0.03  # 2 CT pairs at weight 8 vs 2 + 2 others at weight 1
    with pytest.raises(DataError, match="MRI-XR"):
        task_sampling_weights(pairs, {"MRI-XR": 2.0})
    with pytest.raises(ValueError, match="> 0"):
        DataConfig(task_weights={"MRI-CT": 0.0})


def test_loss_by_task_scores_each_crop_with_its_tasks_weights(dataset):
    g = torch.Generator().manual_seed(0)
    fused, a, b = (torch.rand(4, 1, 16, 16, generator=g) for _ in range(3))
    tasks = ["MRI-CT", "MRI-PET", "MRI-CT", "MRI-SPECT"]
    ct_weights = {"intensity": 10.0, "intensity_target": {"softness": 4.0, "gain": 1.2}}
    cfg = Stage2Config(run_dir="r", stage1_checkpoint="c", loss_by_task={"MRI-CT": ct_weights})
    total, parts = batch_loss(fused, a, b, tasks, cfg)
    ct, _ = hybrid_loss(fused[[0, 2]], a[[0, 2]], b[[0, 2]], LossWeights(**ct_weights))
    rest, _ = hybrid_loss(fused[[1, 3]], a[[1, 3]], b[[1, 3]], cfg.loss)
    assert float(total) == pytest.approx(0.5 * float(ct) + 0.5 * float(rest), rel=1e-6)
    assert float(ct) != pytest.approx(float(hybrid_loss(fused[[0, 2]], a[[0, 2]], b[[0, 2]], cfg.loss)[0]))
    # Without per-task weights the batch loss is the plain hybrid loss, bit for bit.
    plain = Stage2Config(run_dir="r", stage1_checkpoint="c")
    assert torch.equal(batch_loss(fused, a, b, tasks, plain)[0], hybrid_loss(fused, a, b, plain.loss)[0])
    # A term of one task's loss is absent from a batch without that task's crops; the log averages what is there
    # (a run with the detail term on MRI-CT only crashed at its first log row before).
    only_ct = Stage2Config(run_dir="r", stage1_checkpoint="c", loss_by_task={"MRI-CT": {"detail": 5.0}})
    with_ct = batch_loss(fused, a, b, tasks, only_ct)[1]
    without_ct = batch_loss(fused, a, b, ["MRI-PET"] * 4, only_ct)[1]
    assert "detail" in with_ct and "detail" not in without_ct
    logged = mean_parts([with_ct, without_ct])
    assert logged["detail"] == with_ct["detail"]
    assert logged["ssim"] == pytest.approx((with_ct["ssim"] + without_ct["ssim"]) / 2)
    # The sampler reports where each crop came from, drawing exactly the crops that sample() draws.
    images = np.stack([np.full((1, 8, 8), i, np.float32) for i in range(5)])
    crops, idx = CropSampler(images, 4).sample_indexed(6, torch.Generator().manual_seed(1))
    assert idx == crops[:, 0, 0, 0].long().tolist()
    assert torch.equal(crops, CropSampler(images, 4).sample(6, torch.Generator().manual_seed(1)))
    with pytest.raises(DataError, match="loss_by_task names tasks"):
        check_tasks_present(load_split(*dataset)["train"], {"MRI-XR": None}, "loss_by_task")


def test_data_problems_are_reported_without_a_traceback(dataset, tmp_path, capsys):
    cfg = _stage1_cfg(tmp_path / "big", dataset)
    cfg["data"]["crop"] = 64  # the phantoms are 48 px
    assert _train("stage1", _write(tmp_path / "big.yaml", cfg)) == 2
    err = capsys.readouterr().err
    assert "crop 64 larger than images 48x48" in err and "Traceback" not in err


def test_stage2_exports_loadable_weights(dataset, tmp_path):
    # channels_last: the GroupNorm-backward workaround path
    s2 = _stage2_after_stage1(tmp_path, dataset, max_steps=4, val_pairs_per_task=2, channels_last=True)
    assert _train("stage2", s2) == 0
    best = json.loads((tmp_path / "s2" / "best.json").read_text())
    assert best["step"] in (2, 4) and set(best["summary"]) == {"model", "average", "max", "laplacian", "dwt"}
    cfg, unet, head, meta = load_weights(tmp_path / "s2" / "best_weights.pt")
    assert cfg.name == "tiny" and meta["stage2_steps"] == best["step"]
    # Stage II trained only the head: the UNet is the Stage I EMA.
    s1_state = torch.load(tmp_path / "s1" / "checkpoint.pt", weights_only=False)
    _same_state(s1_state["ema"], unet.state_dict())

    # Any saved step can be exported for scoring on the full split, not only the best by the run's criterion.
    assert _train("stage2", s2, "--export-head", str(tmp_path / "last.pt")) == 0
    _, last_unet, last_head, last_meta = load_weights(tmp_path / "last.pt")
    last = torch.load(tmp_path / "s2" / "checkpoint.pt", weights_only=False)
    _same_state(last["head"], last_head.state_dict())
    _same_state(s1_state["ema"], last_unet.state_dict())
    assert last_meta["stage2_steps"] == last["step"] == 4
    assert _train("stage2", s2, "--export-head", str(tmp_path / "x.pt"),
                  "--from-checkpoint", str(tmp_path / "s1" / "checkpoint.pt")) == 2  # a Stage I checkpoint: refused
    assert not (tmp_path / "x.pt").exists()

    # Fine-tuning from those weights with the signed gradient target: with lr 0 the head is unchanged.
    s2_cfg = yaml.safe_load(s2.read_text())
    s2_cfg.update(run_dir=str(tmp_path / "ft"), init_head=str(tmp_path / "s2" / "best_weights.pt"), lr=0.0,
                  max_steps=2, loss={"gradient": 5.0, "gradient_target": "signed"},
                  data={**s2_cfg["data"], "task_weights": {"MRI-CT": 3.0}},
                  loss_by_task={"MRI-CT": {"intensity_target": {"softness": 3.0, "gain": 1.1}}})
    assert _train("stage2", _write(tmp_path / "ft.yaml", s2_cfg)) == 0
    _, _, tuned, meta = load_weights(tmp_path / "ft" / "best_weights.pt")
    _same_state(head.state_dict(), tuned.state_dict())
    # The starting head was scored first (step 0): with lr 0 nothing later beats it.
    ft_log = (tmp_path / "ft" / "log.csv").read_text().splitlines()
    assert ft_log[1].startswith("0,") and meta["stage2_steps"] == 0
    assert meta["init_head"].endswith("best_weights.pt") and meta["loss_weights"]["gradient_target"] == "signed"
    assert meta["loss_by_task"]["MRI-CT"]["intensity_target"]["softness"] == 3.0
    # --resume on a run that has no checkpoint yet starts it, from init_head (it once started from a random head).
    s2_cfg["run_dir"] = str(tmp_path / "ft_resume")
    assert _train("stage2", _write(tmp_path / "ft_resume.yaml", s2_cfg), "--resume") == 0
    _, _, resumed, _ = load_weights(tmp_path / "ft_resume" / "best_weights.pt")
    _same_state(head.state_dict(), resumed.state_dict())


def test_stage2_turns_a_luma_head_into_a_mix_head(dataset, tmp_path):
    """head_output: mix from a "luma" init_head keeps every layer but the last, which starts as the sources'
    plain average; the exported weights carry the mix form and fuse as it says."""
    s2 = _stage2_after_stage1(tmp_path, dataset, max_steps=2, val_pairs_per_task=1)
    assert _train("stage2", s2) == 0
    s2_cfg = yaml.safe_load(s2.read_text())
    s2_cfg.update(run_dir=str(tmp_path / "mix"), init_head=str(tmp_path / "s2" / "best_weights.pt"), lr=0.0,
                  head_output="mix")
    assert _train("stage2", _write(tmp_path / "mix.yaml", s2_cfg)) == 0
    _, _, luma, _ = load_weights(tmp_path / "s2" / "best_weights.pt")
    cfg, unet, mix, _ = load_weights(tmp_path / "mix" / "best_weights.pt")
    assert cfg.fusion.output == "mix" and mix.out[2].weight.shape[0] == 2
    new = {k: v for k, v in luma.state_dict().items() if not k.startswith("out.2.")}
    _same_state(new, mix.state_dict())
    pipe = FusionPipeline(cfg, unet, mix)
    a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(pipe.fuse_luma(a, b), (a + b) / 2)


def test_stage2_turns_a_mix_head_into_a_mix_gain_head_with_the_same_output(dataset, tmp_path, capsys):
    """head_output: mix_gain from a "mix" init_head keeps its weight and residual outputs and starts the gain
    at zero: the new head fuses exactly as the old one until training moves k."""
    s2 = _stage2_after_stage1(tmp_path, dataset, max_steps=2, val_pairs_per_task=1)
    s2_cfg = yaml.safe_load(s2.read_text())
    s2_cfg.update(head_output="mix", lr=1e-3)
    assert _train("stage2", _write(tmp_path / "mix.yaml", s2_cfg)) == 0
    s2_cfg.update(run_dir=str(tmp_path / "gain"), init_head=str(tmp_path / "s2" / "best_weights.pt"), lr=0.0,
                  head_output="mix_gain", head_gain_sigma=1.0)
    assert _train("stage2", _write(tmp_path / "gain.yaml", s2_cfg)) == 0
    mix_cfg, mix_unet, mix, _ = load_weights(tmp_path / "s2" / "best_weights.pt")
    cfg, unet, gain, _ = load_weights(tmp_path / "gain" / "best_weights.pt")
    assert cfg.fusion.output == "mix_gain" and cfg.fusion.gain_sigma == 1.0
    assert not gain.gain_out.weight.any() and not gain.gain_out.bias.any()
    _same_state(mix.state_dict(), {k: v for k, v in gain.state_dict().items() if not k.startswith("gain_out.")})
    a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(FusionPipeline(cfg, unet, gain).fuse_luma(a, b),
                               FusionPipeline(mix_cfg, mix_unet, mix).fuse_luma(a, b))
    # train_only: gain moves the gain conv and nothing else; without a gain output there is nothing to train
    s2_cfg.update(run_dir=str(tmp_path / "only"), lr=1e-2, train_only="gain")
    assert _train("stage2", _write(tmp_path / "only.yaml", s2_cfg)) == 0
    only = torch.load(tmp_path / "only" / "checkpoint.pt", weights_only=False)["head"]
    _same_state(mix.state_dict(), {k: v for k, v in only.items() if not k.startswith("gain_out.")})
    assert only["gain_out.weight"].any()
    s2_cfg.update(run_dir=str(tmp_path / "none"), head_output="mix")
    capsys.readouterr()
    assert _train("stage2", _write(tmp_path / "none.yaml", s2_cfg)) != 0
    assert "train_only: gain needs head_output: mix_gain" in capsys.readouterr().err


def test_teacher_terms_vanish_on_the_teachers_image_and_grow_with_the_difference():
    target = torch.rand(2, 1, 24, 24, generator=torch.Generator().manual_seed(3))
    w = TeacherTerms(teacher=2.0, teacher_gradient=0.5)
    same, parts = teacher_terms(target.clone(), target, w)
    assert same.item() == 0.0 and parts == {"teacher_l1": 0.0, "teacher_grad": 0.0}
    off, parts = teacher_terms(target + 0.1, target, w)  # an offset: pixels differ, gradients do not
    assert parts["teacher_l1"] == pytest.approx(0.1, abs=1e-6) and parts["teacher_grad"] == pytest.approx(0, abs=1e-6)
    assert off.item() == pytest.approx(0.2, abs=1e-5)
    noisy, parts = teacher_terms(target + 0.1 * torch.rand(2, 1, 24, 24), target, w)
    assert parts["teacher_grad"] > 0 and noisy.item() > 0.5 * parts["teacher_grad"]


def test_teacher_by_task_replaces_the_teacher_weights_of_that_tasks_crops_only():
    g = torch.Generator().manual_seed(4)
    fused, target = torch.rand(4, 1, 16, 16, generator=g), torch.rand(4, 1, 16, 16, generator=g)
    tasks = ["MRI-CT", "MRI-PET", "MRI-CT", "MRI-SPECT"]
    w = {"teacher": 3.0, "teacher_gradient": 2.0}
    cfg = Stage2Config(run_dir="r", stage1_checkpoint="c", teacher_loss=w,
                       teacher_by_task={"MRI-CT": {"teacher": 0.0, "teacher_gradient": 0.0}})
    total, parts = batch_teacher_terms(fused, target, tasks, cfg)
    rest, rest_parts = teacher_terms(fused[[1, 3]], target[[1, 3]], TeacherTerms(**w))
    assert float(total) == pytest.approx(0.5 * float(rest), rel=1e-6)  # the CT half weighs nothing
    ct_l1 = teacher_terms(fused[[0, 2]], target[[0, 2]], TeacherTerms())[1]["teacher_l1"]
    assert parts["teacher_l1"] == pytest.approx(0.5 * ct_l1 + 0.5 * rest_parts["teacher_l1"])  # logged all the same
    plain = Stage2Config(run_dir="r", stage1_checkpoint="c", teacher_loss=w)
    assert float(batch_teacher_terms(fused, target, tasks, plain)[0]) == pytest.approx(
        float(teacher_terms(fused, target, TeacherTerms(**w))[0]), rel=1e-6)


def test_stage2_with_a_teacher_labels_the_training_pairs_and_logs_its_terms(dataset, tmp_path):
    s2 = _stage2_after_stage1(tmp_path, dataset, max_steps=2, val_pairs_per_task=1, teacher="random:tiny",
                              teacher_workers=1, teacher_loss={"teacher": 50.0, "teacher_gradient": 10.0})
    assert _train("stage2", s2) == 0
    caches = list((tmp_path / "s2").glob("teacher_*"))
    assert len(caches) == 1 and len(list(caches[0].rglob("*.npy"))) == 6  # the 6 training pairs, once each
    rows = (tmp_path / "s2" / "log.csv").read_text().splitlines()
    cols = rows[0].split(",")
    logged = [r.split(",") for r in rows[1:] if r.split(",")[cols.index("teacher_l1")]]
    assert logged and all(float(r[cols.index("teacher_l1")]) > 0 for r in logged)
    _, _, _, meta = load_weights(tmp_path / "s2" / "best_weights.pt")
    assert meta["teacher"]["weights"] == "random:tiny" and meta["teacher"]["teacher"] == 50.0
    recorded = json.loads((tmp_path / "s2" / "teacher.json").read_text())["sha256"]
    assert caches[0].name == f"teacher_{recorded[:12]}" and meta["teacher"]["sha256"] == recorded


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="this torch build has no gloo backend")
def test_two_process_gloo_torchrun(dataset, tmp_path):
    cfg = _write(tmp_path / "ddp.yaml", _stage1_cfg(tmp_path / "ddp", dataset, max_steps=3))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dmfnet", "train", "stage1", "--config", str(cfg), "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3
    assert (tmp_path / "ddp" / "rng_rank1.pt").exists()  # each rank keeps its own RNG stream


@pytest.mark.slow
def test_distill_trains_resumes_and_exports_a_fast_tier(dataset, tmp_path):
    root, split = dataset
    cfg = {
        "run_dir": str(tmp_path / "d"), "teacher": "random:tiny", "batch_size": 2, "max_steps": 4,
        "ckpt_every": 2, "val_every": 2, "log_every": 1, "threads": 1, "teacher_workers": 1, "warmup_steps": 1,
        "val_pairs_per_task": 1, "student": {"widths": [8, 8, 8], "blocks": [1, 1, 1]},
        "data": {"root": str(root), "split_file": str(split), "crop": 32},
    }
    assert _train("distill", _write(tmp_path / "d.yaml", cfg)) == 0
    # Teacher targets are the teacher pipeline's own output, cached per pair (12 pairs: train and val).
    cached = sorted((tmp_path / "d").glob("teacher_*/*/*.npy"))
    assert len(cached) == 12
    from models.evaluation.report import load_prepared
    from models.images.pairs import discover_pairs
    from models.inference.weights import load_fast_weights, open_pipeline

    pair = discover_pairs(root)[0]
    expected = open_pipeline("random:tiny", "cpu").fuse_lumas([load_prepared(pair)])[0]
    assert np.array_equal(np.load(tmp_path / "d" / next(p for p in cached if p.stem == pair.pair_id)), expected)
    best = json.loads((tmp_path / "d" / "best.json").read_text())
    assert best["step"] in (2, 4) and set(best["held"]) == {"MRI-CT", "MRI-PET", "MRI-SPECT"}
    fast_cfg, net, meta = load_fast_weights(tmp_path / "d" / "best_weights.pt")
    assert fast_cfg.widths == (8, 8, 8) and meta["steps"] == best["step"]

    # Stopping after 2 steps and resuming gives the same student as the straight run (bit for bit).
    cfg2 = {**cfg, "run_dir": str(tmp_path / "r"), "max_steps": 2}
    assert _train("distill", _write(tmp_path / "r.yaml", cfg2)) == 0
    assert _train("distill", _write(tmp_path / "r.yaml", {**cfg2, "max_steps": 4}), "--resume") == 0
    a = torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=False)["net"]
    b = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)["net"]
    _same_state(a, b)


def test_init_student_starts_distillation_from_a_fast_tier_file_of_the_same_shape(tmp_path):
    from models.inference.weights import save_fast_weights
    from models.nets.fast_net import FastConfig, FastFusionNet
    from models.training.config import DistillConfig
    from models.training.distill import _initial_student

    small = FastConfig(widths=(8, 8, 8), blocks=(1, 1, 1))
    torch.manual_seed(5)
    trained = FastFusionNet(small)
    save_fast_weights(tmp_path / "fast.pt", small, trained, {})
    cfg = DistillConfig(run_dir=str(tmp_path / "d"), student=small, init_student=tmp_path / "fast.pt")
    _same_state(_initial_student(cfg, resuming=False).state_dict(), trained.state_dict())
    # A resumed run takes its checkpoint instead (loaded later): the init file is not read again.
    fresh = _initial_student(cfg, resuming=True).state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in trained.state_dict().items())
    other = DistillConfig(run_dir=str(tmp_path / "d"), student={"widths": [8, 8, 16], "blocks": [1, 1, 1]},
                          init_student=tmp_path / "fast.pt")
    with pytest.raises(ValueError, match="init_student"):
        _initial_student(other, resuming=False)


def test_init_student_without_a_gain_starts_a_gain_student_at_its_own_output(tmp_path):
    """A student with ``gain_sigma`` from one without: weight and residual outputs kept, k = 0, so it fuses as
    the init student did; and with a gain it computes m + k (m - G * m) + r, |k| < 2."""
    from models.inference.weights import save_fast_weights
    from models.nets.fast_net import FastConfig, FastFusionNet
    from models.nets.losses import gaussian_blur
    from models.training.config import DistillConfig
    from models.training.distill import _initial_student

    small = FastConfig(widths=(8, 8, 8), blocks=(1, 1, 1))
    torch.manual_seed(6)
    trained = FastFusionNet(small)
    torch.nn.init.normal_(trained.out.weight, std=0.1)
    save_fast_weights(tmp_path / "fast.pt", small, trained, {})
    gain_cfg = small.model_copy(update={"gain_sigma": 1.0})
    cfg = DistillConfig(run_dir=str(tmp_path / "d"), student=gain_cfg, init_student=tmp_path / "fast.pt")
    net = _initial_student(cfg, resuming=False).eval()
    assert net.out.weight.shape[0] == 12 and not net.out.weight[8:].any()
    a, b = torch.rand(2, 1, 32, 40), torch.rand(2, 1, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(net(a, b), trained.eval()(a, b))
        net.out.weight.zero_()
        net.out.bias.zero_()  # w = 0.5, r = 0: the mix is the average
        net.out.bias[8:] = 1e4  # k = 2 at every pixel
        m = (a + b) / 2
        torch.testing.assert_close(net(a, b), m + 2 * (m - gaussian_blur(m, 1.0)), atol=1e-5, rtol=0)


def test_a_resumed_log_keeps_its_own_columns_when_the_code_logs_others(tmp_path):
    path = tmp_path / "log.csv"
    CsvLog(path, ["step", "loss", "MRI-CT_SSIM"]).write(step=1, loss=0.5, **{"MRI-CT_SSIM": 1.5})
    # A newer version logs one more metric, in the middle: its row still lands under the file's header.
    CsvLog(path, ["step", "loss", "MRI-CT_Speckle", "MRI-CT_SSIM"]).write(
        step=2, loss=0.25, **{"MRI-CT_Speckle": 3.0, "MRI-CT_SSIM": 1.25})
    assert path.read_text().splitlines() == ["step,loss,MRI-CT_SSIM", "1,0.5,1.5", "2,0.25,1.25"]
