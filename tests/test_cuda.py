"""The CUDA paths: bf16 autocast inference and training, the inference fast path with the label cache, torch.compile
with CUDA graphs and its warm-up, the feature cache, fused AdamW, channels_last training, the distillation losses
and a step student, determinism across batches, CPU agreement.

Skipped where no GPU is present (CI); run on a GPU machine with `pytest tests/test_cuda.py` (`make gpu-check` runs
it with the GPU figures).
"""

import numpy as np
import pytest
import torch

from sdm.diffusion import GaussianDiffusion
from sdm.pipeline import SDMPipeline
from sdm.seeds import derive_seed
from sdm.testing import blocky_batches
from sdm.training import make_optimizer, train_step, weights_layout
from sdm.unet import SPADE, FeatureCache, SDMUNet
from tests.conftest import train_losses

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _labels(b: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 6, (b, 32, 32))


def _pixel_gap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    diff = np.abs(a.astype(int) - b.astype(int))
    return float(diff.mean()), float((diff > 16).mean())


def test_auto_precision_on_cuda_is_bf16_and_close_to_fp32(random_tiny_net, tiny_cfg):
    auto = SDMPipeline(random_tiny_net, tiny_cfg, device="cuda", precision="auto")
    assert auto.dtype == torch.bfloat16
    bf16 = auto(_labels(), num_inference_steps=5, seed=3)
    fp32 = SDMPipeline(random_tiny_net, tiny_cfg, device="cuda", precision="fp32")(_labels(), num_inference_steps=5, seed=3)
    mean, tail = _pixel_gap(bf16, fp32)
    # a randomly initialised model is chaotic where clipping flips, so bound the mean and the tail
    assert mean < 3.0 and tail < 0.02
    assert not np.array_equal(bf16, fp32)  # autocast really ran


def test_cuda_fp32_agrees_with_cpu_for_the_same_seed(random_tiny_net, tiny_cfg):
    cpu = SDMPipeline(random_tiny_net, tiny_cfg, device="cpu", precision="fp32")(_labels(), num_inference_steps=5, seed=3)
    cuda = SDMPipeline(random_tiny_net, tiny_cfg, device="cuda", precision="fp32")(_labels(), num_inference_steps=5, seed=3)
    mean, tail = _pixel_gap(cpu, cuda)
    assert mean < 1.0 and tail < 0.005  # noise is drawn on the CPU, so only kernel rounding differs


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fast path"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_seed_same_images_whatever_the_batch_on_cuda(random_tiny_net, tiny_cfg, precision, fast):
    """Other micro-batch sizes run other kernels, so pixels may differ by rounding only; a row run alone in a
    micro-batch of the same size is the same row bit for bit."""
    pipe = SDMPipeline(random_tiny_net, tiny_cfg, "cuda", precision, micro_batch=6, fast_path=fast)
    together = pipe(_labels(), num_inference_steps=4, num_samples=2, seed=7)
    apart = SDMPipeline(random_tiny_net, tiny_cfg, "cuda", precision, micro_batch=1, fast_path=fast)(_labels(), num_inference_steps=4, num_samples=2, seed=7)
    mean, tail = _pixel_gap(together, apart)
    print(f"{precision}: micro-batch 6 vs 1: identical={np.array_equal(together, apart)} mean gap {mean:.4f}, tail {tail:.5f}")
    assert mean < 0.5 and tail < 0.002
    alone = pipe(_labels()[1], num_inference_steps=4, num_samples=2, seed=[derive_seed(7, 2), derive_seed(7, 3)])
    assert np.array_equal(alone, together[2:4])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda_fits_a_batch(tiny_cfg, precision):
    torch.manual_seed(0)
    net = SDMUNet(tiny_cfg.model).cuda().train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    diffusion = GaussianDiffusion.from_config(tiny_cfg.diffusion, tiny_cfg.model.learn_sigma)
    g = torch.Generator().manual_seed(0)
    x0, label = (t.cuda() for t in blocky_batches(tiny_cfg.model, 8, 1)[0])
    losses, skipped = [], 0
    for _ in range(60):
        r = train_step(net, opt, diffusion, [(x0, label)], tiny_cfg, 0.0, g, dtype, scaler)
        losses.append(r.loss)
        skipped += not r.finite
    assert all(p.dtype == torch.float32 for p in net.parameters())  # fp32 master weights under autocast
    assert skipped <= 2
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])


def _fp32_and_eager_bf16(net, cfg) -> tuple[np.ndarray, np.ndarray]:
    return tuple(SDMPipeline(net, cfg, device="cuda", precision=p, fast_path=False)(_labels(), num_inference_steps=5, seed=3)
                 for p in ("fp32", "bf16"))


def test_the_fast_path_on_cuda_holds_bf16_channels_last_weights_and_is_as_close_to_fp32_as_eager_bf16(random_tiny_net, tiny_cfg):
    pipe = SDMPipeline(random_tiny_net, tiny_cfg, device="cuda", precision="bf16", micro_batch=4)
    convs = [m for m in pipe.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.weight.is_cuda and m.weight.dtype == torch.bfloat16 for m in convs)
    assert weights_layout(pipe.net) == "channels_last"
    fp32, eager = _fp32_and_eager_bf16(random_tiny_net, tiny_cfg)
    fast = pipe(_labels(), num_inference_steps=5, seed=3)
    assert np.array_equal(pipe(_labels(), num_inference_steps=5, seed=3), fast)
    assert _pixel_gap(fast, fp32)[0] < 1.5 * max(_pixel_gap(eager, fp32)[0], 0.5)


@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_the_label_cache_on_cuda_computes_the_label_path_once_per_run_and_changes_no_pixel(random_tiny_net, tiny_cfg, guidance):
    pipe = SDMPipeline(random_tiny_net, tiny_cfg, device="cuda", precision="bf16", micro_batch=4)
    assert pipe.runner.label_cache
    calls = []
    next(m for m in pipe.net.modules() if isinstance(m, SPADE)).mlp_shared.register_forward_hook(lambda *_: calls.append(1))
    cached = pipe(_labels(), num_inference_steps=5, seed=4, guidance_scale=guidance)
    assert len(calls) == 1  # one micro-batch: once, not once per step
    pipe.runner.label_cache = False
    assert np.array_equal(pipe(_labels(), num_inference_steps=5, seed=4, guidance_scale=guidance), cached)
    assert len(calls) == 1 + 5


def test_compiled_with_cuda_graphs_compiles_in_warm_up_only_and_replays_the_same_numbers(random_tiny_net, tiny_cfg):
    """warm_up compiles both micro-batch shapes (guided, unguided); sampling afterwards compiles nothing and runs
    CUDA graphs (none skipped), replays give the same pixels, rows stay independent of their batch, and compiled
    bf16 is about as close to fp32 as eager bf16 (fused kernels round differently)."""
    counters = torch._dynamo.utils.counters
    pipe = SDMPipeline(random_tiny_net, tiny_cfg, device="cuda", precision="bf16", micro_batch=4, compile=True)
    skips = counters["inductor"]["cudagraph_skips"]
    pipe.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2
    fast = pipe(_labels(), num_inference_steps=5, seed=3)
    unguided = pipe(_labels()[:1], num_inference_steps=2, seed=1, guidance_scale=1.0)
    assert counters["stats"]["unique_graphs"] == graphs  # no compilation after the warm-up
    assert counters["inductor"]["cudagraph_skips"] == skips  # "reduce-overhead" really ran CUDA graphs
    assert np.array_equal(pipe(_labels(), num_inference_steps=5, seed=3), fast)  # graph replays give the same numbers
    alone = pipe(_labels()[1], num_inference_steps=5, seed=[derive_seed(3, 1)])
    assert np.array_equal(alone, fast[1:2]) and unguided.shape == (1, 32, 32, 3)
    fp32, eager = _fp32_and_eager_bf16(random_tiny_net, tiny_cfg)
    assert _pixel_gap(fast, fp32)[0] < 1.5 * max(_pixel_gap(eager, fp32)[0], 0.5)


def test_the_feature_cache_on_cuda_reuses_the_deep_features_exactly_and_keeps_rows_independent(random_tiny_net, tiny_cfg):
    net = random_tiny_net.cuda()
    g = torch.Generator().manual_seed(1)
    x, x2 = (torch.randn(2, 3, 32, 32, generator=g).cuda() for _ in range(2))
    t = torch.tensor([40.0, 900.0], device="cuda")
    label = SDMPipeline(net, tiny_cfg, "cuda", "fp32").prepare_labels(_labels(2)).cuda()
    with torch.no_grad():
        ref, cache = net(x, t, label), FeatureCache(depth=1)
        assert torch.equal(net(x, t, label, cache), ref)
        cache.full = False
        assert torch.equal(net(x, t, label, cache), ref)  # a shallow step on the full step's input: its output
        assert not torch.allclose(net(x2, t, label, cache), net(x2, t, label), atol=1e-3)
    pipe = SDMPipeline(random_tiny_net, tiny_cfg, device="cuda", precision="bf16", micro_batch=4)
    together = pipe(_labels(), num_inference_steps=6, num_samples=2, seed=7, cache_interval=3)
    alone = pipe(_labels()[1], num_inference_steps=6, seed=[derive_seed(7, 2), derive_seed(7, 3)], num_samples=2, cache_interval=3)
    assert np.array_equal(alone, together[2:4])
    assert not np.array_equal(together, pipe(_labels(), num_inference_steps=6, num_samples=2, seed=7))


def test_fused_adamw_on_cuda_is_one_kernel_and_the_same_update_as_the_loop(tiny_cfg):
    torch.manual_seed(0)
    fused_net, loop_net = SDMUNet(tiny_cfg.model).cuda(), SDMUNet(tiny_cfg.model).cuda()
    loop_net.load_state_dict(fused_net.state_dict())
    start = [p.detach().clone() for p in fused_net.parameters()]
    fused = make_optimizer(fused_net, 1e-3, 0.01)
    assert fused.param_groups[0]["fused"] is True
    loop = torch.optim.AdamW(loop_net.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(fused_net.parameters(), loop_net.parameters()):
            a.grad = torch.randn(a.shape, generator=g).cuda()
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    for a, b, a0 in zip(fused_net.parameters(), loop_net.parameters(), start):
        assert (a - a0).abs().max().item() > 1e-3  # three steps of about lr each moved every weight
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_channels_last_training_on_cuda_follows_the_contiguous_run_and_keeps_its_layout(tiny_cfg, monkeypatch):
    """Without TF32 the layout changes only the kernels' summation order: the same losses step for step and the
    same weights after 8 fp32 steps, up to rounding; the weights stay channels_last through fused AdamW; bf16
    channels_last trains too."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    batches = blocky_batches(tiny_cfg.model, 4, 2)
    contiguous, net_a = train_losses(tiny_cfg, batches, False, 8, "cuda")
    channels_last, net_b = train_losses(tiny_cfg, batches, True, 8, "cuda")
    assert contiguous[-1] < 0.8 * contiguous[0]
    assert np.allclose(channels_last, contiguous, rtol=1e-4, atol=0)
    for (name, a), b in zip(net_a.named_parameters(), net_b.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-3), name
    assert weights_layout(net_a) == "contiguous" and weights_layout(net_b) == "channels_last"
    bf16, net_c = train_losses(tiny_cfg, batches, True, 8, "cuda", torch.bfloat16)
    assert weights_layout(net_c) == "channels_last" and bf16[-1] < 0.8 * bf16[0]


def test_distillation_losses_and_a_step_student_on_cuda_in_bf16_follow_the_cpu(random_tiny_net, tiny_cfg):
    """Both distillation losses train on CUDA under bf16 autocast with finite gradients and the CPU's fp32 loss within
    bf16 rounding; a step student samples on CUDA in one row per image, each image independent of its batch."""
    from sdm.distill import GuidanceDistillation, ProgressiveDistillation, halving_grids, init_student, student_config

    grids = halving_grids(1000, 8, 4)
    cfg = student_config(tiny_cfg, "progressive", "tiny-teacher", "/teacher", timesteps=grids[-1], from_steps=8)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion, True)
    x0, label = blocky_batches(cfg.model, batch=8, count=1, seed=0)[0]
    for make in (lambda t: GuidanceDistillation(t, diffusion, (1.0, 3.0)),
                 lambda t: ProgressiveDistillation(t, diffusion, grids, (1.0, 3.0))):
        losses = {}
        for device, dtype in (("cpu", None), ("cuda", torch.bfloat16)):
            teacher = random_tiny_net.to(device)
            student = init_student(teacher, cfg).to(device).train()
            terms = make(teacher)(student, x0.to(device), label.to(device), torch.Generator().manual_seed(0), dtype)
            terms["loss"].mean().backward()
            assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
            losses[device] = terms["loss"].mean().item()
        assert losses["cuda"] == pytest.approx(losses["cpu"], rel=0.1)
    student = SDMPipeline(init_student(random_tiny_net.cpu(), cfg).eval(), cfg, device="cuda")
    together = student(_labels(3), guidance_scale=2.0, seed=5)
    alone = student(_labels(3)[1:2], guidance_scale=2.0, seed=[derive_seed(5, 1)])
    assert np.array_equal(together[1], alone[0])
