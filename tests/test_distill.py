"""Distilled students (sdm.distill): the guidance and progressive targets against closed forms and the samplers' own
steps, the student's starting point, its config's refusals, and the runner sampling it in one pass per step."""

import dataclasses
import re

import numpy as np
import pytest
import torch

from sdm.checkpoint import load_model, model_id, save_model
from sdm.config import SDMConfig
from sdm.diffusion import GaussianDiffusion
from sdm.distill import (GuidanceDistillation, ProgressiveDistillation, ddim_step, halving_grids, init_student, round_config,
                         student_config)
from sdm.errors import InvalidInputError
from sdm.labels import label_input
from sdm.pipeline import SDMPipeline
from sdm.samplers import DDIM, make_denoiser
from sdm.unet import SDMUNet
from conftest import perturbed


def _inputs(cfg, b=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, cfg.model.num_classes, (b, 32, 32), generator=g)
    return scale * torch.randn(b, 3, 32, 32, generator=g), label_input(label, cfg.model, label)


def _diffusion(cfg):
    return GaussianDiffusion.from_config(cfg.diffusion, cfg.model.learn_sigma)


def _guidance_student(teacher_net, teacher_cfg, seed=1):
    cfg = student_config(teacher_cfg, "guidance", "tiny-teacher", "/teacher")
    return perturbed(init_student(teacher_net, cfg), seed=seed).eval(), cfg


def _step_student_cfg(teacher_cfg, from_steps=8, target=4):
    grid = halving_grids(teacher_cfg.diffusion.num_timesteps, from_steps, target)[-1]
    return student_config(teacher_cfg, "progressive", "tiny-teacher", "/teacher", timesteps=grid, from_steps=from_steps)


def test_the_guidance_target_is_the_teachers_guided_prediction(random_tiny_net, tiny_cfg):
    x, y = _inputs(tiny_cfg)
    t = torch.tensor([0.0, 250.0, 600.0, 999.0])
    w = torch.tensor([1.0, 1.5, 2.0, 3.0])
    target = GuidanceDistillation(random_tiny_net, _diffusion(tiny_cfg), (1.0, 3.0)).target(x, t, y, w)
    with torch.no_grad():
        cond, null = random_tiny_net(x, t, y), random_tiny_net(x, t, torch.zeros_like(y))
    eps = null[:, :3] + w.view(-1, 1, 1, 1) * (cond[:, :3] - null[:, :3])
    torch.testing.assert_close(target[:, :3], eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target[:, 3:], cond[:, 3:], rtol=1e-5, atol=1e-5)  # the variance: the conditional branch's


@pytest.mark.parametrize("w", [0.0, 1.0, 1.5, 3.0, 7.5])
def test_a_fresh_guidance_student_is_its_teachers_conditional_branch_at_any_scale(random_tiny_net, tiny_cfg, w):
    cfg = student_config(tiny_cfg, "guidance", "tiny-teacher", "/teacher")
    student = init_student(random_tiny_net, cfg).eval()
    x, y = _inputs(tiny_cfg)
    t = torch.tensor([3.0, 300.0, 700.0, 990.0])
    with torch.no_grad():
        assert torch.equal(student(x, t, y, guidance=torch.full((4,), w)), random_tiny_net(x, t, y))


def test_the_guidance_student_loss_trains_it_towards_the_teacher(random_tiny_net, tiny_cfg, one_thread):
    """A few steps on a fixed batch bring the student's output nearer the guided teacher's (measured 0.054 -> 0.032;
    a loss that could not move the student, or moved it elsewhere, fails)."""
    from sdm.training import make_optimizer, train_step

    cfg = student_config(tiny_cfg, "guidance", "tiny-teacher", "/teacher")
    student = init_student(random_tiny_net, cfg).train()
    objective = GuidanceDistillation(random_tiny_net, _diffusion(cfg), (2.0, 2.0))
    x0, y = _inputs(tiny_cfg, scale=0.5)
    x0 = x0.clamp(-1, 1)
    opt = make_optimizer(student, 1e-4, 0.0)
    losses = [train_step(student, opt, _diffusion(cfg), [(x0, y)], cfg, 0.0, torch.Generator().manual_seed(0), loss=objective).loss
              for _ in range(12)]  # the same draws (t, noise, w) every step
    assert losses[-1] < 0.7 * losses[0]


def test_grids_halve_by_taking_every_other_step_and_keep_the_top_one():
    grids = halving_grids(1000, 32, 4)
    assert [len(g) for g in grids] == [32, 16, 8, 4]
    for coarse, fine in zip(grids[1:], grids):
        assert np.array_equal(coarse, fine[1::2]) and coarse[-1] == 999
    assert grids[-1].tolist() == [226, 483, 741, 999]
    for bad in [(12, 4), (4, 4), (8, 0), (6, 4)]:
        with pytest.raises(ValueError, match="must be target_steps"):
            halving_grids(1000, *bad)


def test_the_progressive_target_of_a_zero_teacher_is_the_closed_form(tiny_cfg):
    """A fresh network predicts eps = 0 (its output layer starts at zero): while x_0 = x_t / sqrt(abar) stays
    unclipped, each DDIM step scales x by sqrt(abar_to / abar_from), so two steps land at sqrt(abar_land / abar) x."""
    cfg = _step_student_cfg(tiny_cfg)
    teacher = init_student(SDMUNet(tiny_cfg.model).eval(), cfg).eval()
    d = _diffusion(cfg)
    grids = halving_grids(1000, 8, 4)
    objective = ProgressiveDistillation(teacher, d, grids, (1.0, 3.0))
    x, y = _inputs(tiny_cfg, scale=1e-3)
    i = torch.tensor([0, 1, 2, 3])
    target = objective.target(x, i, y, torch.full((4,), 2.0))
    abar = np.append(1.0, d.alphas_cumprod)  # abar[t + 1] of timestep t; abar[0] = 1: the clean image
    student_grid = grids[1]
    for row in range(4):
        land = abar[0] if row == 0 else abar[student_grid[row - 1] + 1]
        expected = np.sqrt(land / abar[student_grid[row] + 1]) * x[row].double()
        torch.testing.assert_close(target[row].double(), expected, rtol=1e-4, atol=1e-7)


def test_the_progressive_target_is_two_of_the_samplers_own_ddim_steps_landed_in_one(random_tiny_net, tiny_cfg):
    teacher, _ = _guidance_student(random_tiny_net, tiny_cfg)
    d = _diffusion(tiny_cfg)
    grids = halving_grids(1000, 16, 4)
    objective = ProgressiveDistillation(teacher, d, grids, (1.0, 3.0))
    objective.round = 1  # 8 -> 4 steps: the teacher's grid is grids[1]
    x, y = _inputs(tiny_cfg)
    i, w = torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 1.5, 2.0, 3.0])
    target = objective.target(x, i, y, w)
    dt, ds = d.respaced(grids[1]), d.respaced(grids[2])
    for row in range(4):
        xr = x[row : row + 1]
        denoise = make_denoiser(teacher, dt, y[row : row + 1], w[row : row + 1])
        for j in (2 * row + 1, 2 * row):  # the sampler's loop body, twice: prediction, clipped x_0, DDIM eta 0
            tj = torch.tensor([j])
            x0 = dt.predict_x0(xr, tj, denoise(xr, tj).eps).clamp(-1, 1)
            xr = DDIM(0.0).step(dt, j, xr, x0, None, None)
        torch.testing.assert_close(target[row : row + 1], xr, rtol=1e-4, atol=1e-5)
    # and one student step lands there from the x_0 it implies, solved in closed form
    a, a_prev = (torch.tensor(v[[0, 1, 2, 3]], dtype=torch.float32).view(-1, 1, 1, 1) for v in (ds.alphas_cumprod, ds.alphas_cumprod_prev))
    c = ((1 - a_prev) / (1 - a)).sqrt()
    x0_star = (target - c * x) / (a_prev.sqrt() - c * a.sqrt())
    torch.testing.assert_close(ddim_step(ds, i, x, x0_star), target, rtol=1e-4, atol=1e-5)


def test_the_stochastic_progressive_target_is_two_ancestral_ddim_steps_with_the_same_noise(random_tiny_net, tiny_cfg):
    """With eta 1 the teacher's two steps are the sampler's DDIM eta 1 steps, each adding its own fresh noise; and
    the mean of the student's one step is the DDIM formula without its noise."""
    teacher, _ = _guidance_student(random_tiny_net, tiny_cfg)
    d = _diffusion(tiny_cfg)
    objective = ProgressiveDistillation(teacher, d, halving_grids(1000, 8, 4), (1.0, 3.0), eta=1.0)
    x, y = _inputs(tiny_cfg)
    i, w = torch.tensor([0, 1, 2, 3]), torch.full((4,), 1.5)
    target = objective.target(x, i, y, w, generator=torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    draws = [torch.randn(x.shape, generator=replay) for _ in range(2)]  # the target's two steps' noise, in its order
    dt = d.respaced(halving_grids(1000, 8, 4)[0])
    for row in range(4):
        xr = x[row : row + 1]
        denoise = make_denoiser(teacher, dt, y[row : row + 1], 1.5)
        for k, j in enumerate((2 * row + 1, 2 * row)):
            tj = torch.tensor([j])
            x0 = dt.predict_x0(xr, tj, denoise(xr, tj).eps).clamp(-1, 1)
            xr = DDIM(1.0).step(dt, j, xr, x0, None, lambda: draws[k][row : row + 1])
        torch.testing.assert_close(target[row : row + 1], xr, rtol=1e-4, atol=1e-5)
    x0 = torch.rand(x.shape) * 2 - 1
    no_noise = DDIM(1.0).step(dt, 3, x[:1], x0[:1], None, lambda: torch.zeros(1, 3, 32, 32))
    torch.testing.assert_close(ddim_step(dt, torch.tensor([3]), x[:1], x0[:1], 1.0), no_noise, rtol=1e-5, atol=1e-6)


def test_a_students_config_says_what_it_is_and_round_trips(tiny_cfg):
    cfg = _step_student_cfg(tiny_cfg, from_steps=32)
    back = SDMConfig.from_json(cfg.to_json())
    assert back == cfg
    assert back.model.guidance_input and back.student.method == "progressive" and back.student.teacher == "tiny-teacher"
    assert back.student.timesteps == (226, 483, 741, 999) and back.student.from_steps == 32
    assert (back.sampling.sampler, back.sampling.num_inference_steps, back.sampling.eta) == ("ddim", 4, 0.0)
    assert "student" not in tiny_cfg.identity_json() and "guidance_input" not in tiny_cfg.identity_json()  # old ids stay
    assert "student" in cfg.identity_json()


@pytest.mark.parametrize("overrides, field", [
    ({"num_inference_steps": 25}, "num_inference_steps must be 4 for this student"),
    ({"sampler": "dpm++"}, "sampler must be 'ddim' for this student"),
    ({"guidance_scale": 3.5}, r"guidance_scale must lie in \[1, 3\] for this student"),
    ({"guidance_scale": 0.5}, r"guidance_scale must lie in \[1, 3\] for this student"),
    ({"cache_interval": 2}, "cache_interval must be 1 for this student"),
])
def test_a_request_a_student_cannot_serve_is_refused_naming_the_field(tiny_cfg, overrides, field):
    cfg = _step_student_cfg(tiny_cfg)
    with pytest.raises(InvalidInputError, match=field):
        cfg.resolve_sampling(**overrides)
    assert cfg.resolve_sampling(guidance_scale=3.0, eta=1.0).eta == 1.0  # within its range, with noise: served


def test_a_round_of_progressive_distillation_samples_on_its_own_grid(tiny_cfg):
    cfg = _step_student_cfg(tiny_cfg, from_steps=16)
    grid = halving_grids(1000, 16, 4)[1]
    during = round_config(cfg, grid)
    assert during.student.timesteps == tuple(grid) and during.resolve_sampling().num_inference_steps == 8
    with pytest.raises(InvalidInputError, match="num_inference_steps must be 8"):
        during.resolve_sampling(num_inference_steps=4)


def test_a_guidance_student_samples_any_steps_and_sampler_within_its_scales(tiny_cfg):
    cfg = student_config(tiny_cfg, "guidance", "tiny-teacher", "/teacher", guidance_range=(1.0, 2.0))
    assert cfg.resolve_sampling(num_inference_steps=7, sampler="dpm++").num_inference_steps == 7
    with pytest.raises(InvalidInputError, match=r"guidance_scale must lie in \[1, 2\]"):
        cfg.resolve_sampling(guidance_scale=2.5)
    # a step student of it keeps within its teacher's scales
    assert _step_student_cfg(cfg).student.guidance_range == (1.0, 2.0)


def test_a_step_student_runs_one_network_row_per_image_at_its_own_timesteps(random_tiny_net, tiny_cfg, tmp_path):
    """Exported and loaded back, the student draws the same bytes, and the network sees each of its 4 timesteps once,
    top first, with one row per image (guidance runs inside the student)."""
    cfg = _step_student_cfg(tiny_cfg)
    student = perturbed(init_student(random_tiny_net, cfg), seed=3).eval()
    save_model(str(tmp_path / "student"), student, cfg)
    net, loaded = load_model(str(tmp_path / "student"))
    assert loaded == cfg and model_id(str(tmp_path / "student")).startswith("tiny-")
    pipe = SDMPipeline(net, loaded, device="cpu", micro_batch=4)
    seen = []
    pipe.net.register_forward_hook(lambda m, args, kwargs, out: seen.append((args[1].tolist(), args[0].shape[0], kwargs["guidance"].tolist())),
                                   with_kwargs=True)
    _, y = _inputs(tiny_cfg, b=3)
    labels = [np.random.default_rng(i).integers(0, 6, (32, 32)) for i in range(3)]
    images = pipe(labels, guidance_scale=2.5, seed=4)
    assert [ts[0] for ts, _, _ in seen] == [999.0, 714.0, 428.0, 143.0]  # halving_grids(1000, 8, 4)[-1], top first
    assert all(rows == 4 and g == [2.5] * 4 for _, rows, g in seen)  # the micro-batch, unpadded by a null branch
    again = SDMPipeline.from_pretrained(str(tmp_path / "student"), device="cpu", micro_batch=4)(labels, guidance_scale=2.5, seed=4)
    assert np.array_equal(images, again)
    fresh = SDMPipeline(init_student(random_tiny_net, cfg).eval(), cfg, device="cpu", micro_batch=4)
    assert not np.array_equal(images, fresh(labels, guidance_scale=2.5, seed=4))  # the student's own weights draw them


def test_only_a_guidance_student_takes_the_guidance_input(random_tiny_net, tiny_cfg):
    x, y = _inputs(tiny_cfg)
    t = torch.tensor([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="only a guidance student"):
        random_tiny_net(x, t, y, guidance=torch.ones(4))
    student, _ = _guidance_student(random_tiny_net, tiny_cfg)
    with pytest.raises(ValueError, match="only a guidance student"):
        student(x, t, y)


def test_init_refuses_a_teacher_of_another_shape(random_tiny_net, tiny_cfg):
    other = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, model_channels=64, num_head_channels=64))
    cfg = student_config(other, "guidance", "x", "/x")
    with pytest.raises(RuntimeError):
        init_student(random_tiny_net, cfg)


@pytest.mark.parametrize("argv, message", [
    (["--stage", "distill-steps"], "--stage distill-steps needs --teacher: the model to distil"),
    (["--stage", "pretrain", "--teacher", "{teacher}"], r"--stage pretrain needs --preset or --config \(--teacher is for distillation\)"),
    (["--stage", "distill-steps", "--teacher", "{teacher}", "--from-steps", "12"],
     r"--from-steps, --target-steps: from_steps \(12\) must be target_steps \(8\) times 2, 4, 8"),
    (["--stage", "distill-guidance", "--teacher", "{teacher}", "--guidance-range", "3", "1"],
     "--guidance-range must satisfy 0 <= LOW <= HIGH <= 100, got 3 1"),
    (["--stage", "distill-guidance", "--teacher", "{missing}"], "no model at"),
])
def test_the_job_refuses_a_distillation_it_cannot_run_before_any_worker_starts(tmp_path, capsys, argv, message):
    from jobs.train import main
    from sdm.data.toy import write_toy_dataset
    from sdm.errors import EXIT_REFUSED
    from sdm.testing import save_random_model

    save_random_model(str(tmp_path / "teacher"))
    write_toy_dataset(str(tmp_path / "data"), n=8, size=32, seed=0)
    argv = [a.format(teacher=tmp_path / "teacher", missing=tmp_path / "nothing") for a in argv]
    assert main([*argv, "--data", str(tmp_path / "data"), "--run", str(tmp_path / "run"), "--steps", "10"]) == EXIT_REFUSED
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()
