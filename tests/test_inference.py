"""The inference fast path (sdm.inference): channels_last, bf16-held weights and torch.compile, against the eager
contiguous network, with the determinism promises kept; and the opt-in feature cache (sdm.unet.FeatureCache)."""

import numpy as np
import pytest
import torch
from torch import nn

from sdm.config import get_preset
from sdm.errors import InvalidInputError
from sdm.pipeline import SDMPipeline
from sdm.samplers import guided_output
from sdm.seeds import derive_seed
from sdm.testing import perturbed
from sdm.unet import SPADE, FeatureCache, GroupNorm32, SDMUNet


def _labels(b: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 6, (b, 32, 32))


def _output(pipe: SDMPipeline, label: torch.Tensor) -> torch.Tensor:
    """One guided network output in the pipeline's precision, as the runner evaluates it."""
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(label.shape[0], 3, 32, 32, generator=g), torch.tensor([30.0, 700.0])
    with torch.no_grad(), torch.autocast("cpu", dtype=pipe.dtype or torch.float32, enabled=pipe.dtype is not None):
        return pipe.net(x, t, label).float()


def test_fast_path_holds_conv_and_linear_weights_in_bf16_channels_last_and_leaves_the_callers_net(random_tiny_net, tiny_cfg):
    pipe = SDMPipeline(random_tiny_net, tiny_cfg, device="cpu", precision="bf16")
    convs = [m for m in pipe.net.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.weight.dtype == torch.bfloat16 and m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert all(m.weight.dtype == torch.bfloat16 for m in pipe.net.modules() if isinstance(m, (nn.Linear, nn.Conv1d)))
    norms = [m for m in pipe.net.modules() if isinstance(m, GroupNorm32) and m.affine]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)  # GroupNorm32 computes in fp32
    # the caller's network is untouched: a trainer may go on training it
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in random_tiny_net.parameters())
    fp32 = SDMPipeline(random_tiny_net, tiny_cfg, device="cpu", precision="fp32")
    assert all(p.dtype == torch.float32 for p in fp32.net.parameters())
    assert SDMPipeline(random_tiny_net, tiny_cfg, device="cpu", precision="bf16", fast_path=False).net is random_tiny_net


def test_fast_path_network_output_matches_the_eager_network(random_tiny_net, tiny_cfg):
    """fp32: only the summation order changes; bf16: the same bf16 weight values autocast would make, other kernels."""
    eager32, fast32, eager16, fast16 = (
        SDMPipeline(random_tiny_net, tiny_cfg, device="cpu", precision=p, fast_path=f)
        for p, f in (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))
    )
    label = eager32.prepare_labels(_labels(2))
    ref = _output(eager32, label)
    scale = ref.abs().mean().item()
    assert (_output(fast32, label) - ref).abs().max().item() < 1e-4 * max(scale, 1.0)
    eager_bf16, fast_bf16 = _output(eager16, label), _output(fast16, label)
    bf16_error = (eager_bf16 - ref).abs().mean().item()
    assert bf16_error > 0  # bf16 really ran
    # the fast path is no further from fp32 than bf16 autocast on the eager network (within 25%)
    assert (fast_bf16 - ref).abs().mean().item() < 1.25 * bf16_error


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fast_path_images_are_close_to_the_eager_fp32_images(random_tiny_net, tiny_cfg, precision):
    labels = _labels(2)
    eager = SDMPipeline(random_tiny_net, tiny_cfg, device="cpu", precision="fp32", fast_path=False)(labels, num_inference_steps=5, seed=3)
    fast = SDMPipeline(random_tiny_net, tiny_cfg, device="cpu", precision=precision)(labels, num_inference_steps=5, seed=3)
    diff = np.abs(eager.astype(int) - fast.astype(int))
    if precision == "fp32":
        assert diff.max() <= 2  # another summation order: a level or two at most
    else:  # as for bf16 autocast on the eager network (tests/test_pipeline.py): a chaotic random model, so mean and tail
        assert diff.mean() < 3.0 and (diff > 16).mean() < 0.02


def test_warm_up_refuses_a_model_whose_output_is_not_finite(random_tiny_net, tiny_cfg):
    with torch.no_grad():
        random_tiny_net.out_conv.bias.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="not finite"):
        SDMPipeline(random_tiny_net, tiny_cfg, device="cpu", precision="bf16").warm_up()


@pytest.mark.slow
def test_compiled_sampling_is_compiled_once_keeps_batch_independence_and_matches_eager():
    """Compilation happens in warm_up, for the two micro-batch shapes; sampling then compiles nothing. Rows stay
    independent of their batch (fixed shapes), and pixels match the eager fast path up to fused rounding."""
    cfg = get_preset("tiny").with_overrides(["model.channel_mult=[1, 2]", "model.attention_resolutions=[16]"])
    torch.manual_seed(0)
    net = perturbed(SDMUNet(cfg.model)).eval()
    compiled = SDMPipeline(net, cfg, device="cpu", precision="bf16", micro_batch=4, compile=True)
    compiled.warm_up()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    labels = _labels(3)
    together = compiled(labels, num_inference_steps=4, num_samples=2, seed=7, guidance_scale=2.0)
    unguided = compiled(labels[:1], num_inference_steps=2, seed=1, guidance_scale=1.0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no compilation after warm-up
    alone = compiled(labels[1], num_inference_steps=4, seed=[derive_seed(7, 2), derive_seed(7, 3)], num_samples=2, guidance_scale=2.0)
    assert np.array_equal(alone, together[2:4])
    assert unguided.shape == (1, 32, 32, 3)
    # compiled bf16 is about as far from fp32 as eager bf16 is: fusion rounds differently, no worse
    fp32, eager = (SDMPipeline(net, cfg, device="cpu", precision=p, micro_batch=4)(
        labels, num_inference_steps=4, num_samples=2, seed=7, guidance_scale=2.0).astype(int) for p in ("fp32", "bf16"))
    eager_error, compiled_error = np.abs(eager - fp32).mean(), np.abs(together.astype(int) - fp32).mean()
    print(f"mean |pixel - fp32|: eager bf16 {eager_error:.3f}, compiled bf16 {compiled_error:.3f}")
    assert 0 < compiled_error < 1.5 * eager_error


def _forward(net: SDMUNet, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
    with torch.no_grad():
        return net(x, t, label, cache) if cache is not None else net(x, t, label)


def test_feature_cache_full_and_shallow_steps_on_the_same_input_give_the_network_output_exactly(random_tiny_net, tiny_cfg):
    """A shallow step recomputes the first encoder stage and reuses the decoder's input to its last stage: on the
    input of the full step it must give the full network's output bit for bit; on another input it differs."""
    g = torch.Generator().manual_seed(1)
    x, x2 = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    t, label = torch.tensor([40.0, 900.0]), SDMPipeline(random_tiny_net, tiny_cfg, "cpu", "fp32").prepare_labels(_labels(2))
    ref = _forward(random_tiny_net, x, t, label)
    cache = FeatureCache(depth=1)
    assert torch.equal(_forward(random_tiny_net, x, t, label, cache), ref) and cache.deep is not None
    cache.full = False
    assert torch.equal(_forward(random_tiny_net, x, t, label, cache), ref)
    shallow = _forward(random_tiny_net, x2, t, label, cache)
    assert not torch.allclose(shallow, _forward(random_tiny_net, x2, t, label), atol=1e-3)
    with pytest.raises(ValueError, match="batched guidance"):
        guided_output(random_tiny_net, x, t, label, 2.0, batched=False, cache=cache)


@pytest.mark.parametrize("interval,steps,full", [(1, 10, 10), (2, 10, 5), (3, 10, 4), (10, 10, 1)])
def test_cache_interval_k_runs_the_deep_path_on_every_kth_step(random_tiny_net, tiny_cfg, interval, steps, full):
    pipe = SDMPipeline(random_tiny_net, tiny_cfg, device="cpu", precision="fp32", micro_batch=2)
    calls = []
    pipe.net.middle_block.register_forward_hook(lambda *_: calls.append(1))
    pipe(_labels(2), num_inference_steps=steps, seed=0, cache_interval=interval, sampler="ddim")
    assert len(calls) == full


def test_cached_sampling_keeps_batch_independence_and_interval_1_is_the_uncached_path(random_tiny_net, tiny_cfg):
    pipe = SDMPipeline(random_tiny_net, tiny_cfg, device="cpu", precision="bf16", micro_batch=4)
    labels = _labels(3)
    together = pipe(labels, num_inference_steps=6, num_samples=2, seed=7, cache_interval=3)
    alone = pipe(labels[1], num_inference_steps=6, seed=[derive_seed(7, 2), derive_seed(7, 3)], num_samples=2, cache_interval=3)
    assert np.array_equal(alone, together[2:4])
    assert np.array_equal(pipe(labels, num_inference_steps=6, num_samples=2, seed=7, cache_interval=1),
                          pipe(labels, num_inference_steps=6, num_samples=2, seed=7))
    assert not np.array_equal(together, pipe(labels, num_inference_steps=6, num_samples=2, seed=7))


@pytest.mark.parametrize("bad", [0, 11, 2.5, True, "2"])
def test_a_bad_cache_interval_is_refused_by_name(random_tiny_net, tiny_cfg, bad):
    pipe = SDMPipeline(random_tiny_net, tiny_cfg, device="cpu", precision="fp32")
    with pytest.raises(InvalidInputError, match=r"cache_interval must be an integer in \[1, 10\]"):
        pipe(_labels(1), num_inference_steps=2, cache_interval=bad)


def test_precomputed_modulations_give_the_networks_output_exactly(random_tiny_net, tiny_cfg):
    """Every SPADE's (gamma, beta) at its own resolution, computed once from the label input: the same numbers."""
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([10.0, 500.0])
    label = SDMPipeline(random_tiny_net, tiny_cfg, "cpu", "fp32").prepare_labels(_labels(2))
    with torch.no_grad():
        mods = random_tiny_net.modulations(label)
        assert torch.equal(random_tiny_net(x, t, label, mods=mods), random_tiny_net(x, t, label))
    assert len(mods) == sum(isinstance(m, SPADE) for m in random_tiny_net.modules())


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_the_label_cache_computes_the_label_path_once_per_run_and_changes_no_pixel(random_tiny_net, tiny_cfg, guidance):
    fast = SDMPipeline(random_tiny_net, tiny_cfg, device="cpu", precision="bf16", micro_batch=4)
    assert fast.runner.label_cache
    calls = []
    spade = next(m for m in fast.net.modules() if isinstance(m, SPADE))
    spade.mlp_shared.register_forward_hook(lambda *_: calls.append(1))
    labels = _labels(3)
    cached = fast(labels, num_inference_steps=5, seed=4, guidance_scale=guidance)
    assert len(calls) == 1  # one micro-batch of 4 rows: once, not once per step
    fast.runner.label_cache = False
    assert np.array_equal(fast(labels, num_inference_steps=5, seed=4, guidance_scale=guidance), cached)
    assert len(calls) == 1 + 5
