"""Ancestral sampling: cached and full paths agree; temperature, top-k and top-p behave."""

from __future__ import annotations

import pytest
import torch

from prior_settings import tiny_prior

from vqgen.errors import ConfigError, DataError
from vqgen.sampling import (
    IncrementalPrior,
    SamplerConfig,
    choose_codes,
    draw_uniforms,
    filter_logits,
    prior_for_sampling,
    sample,
)

pytestmark = pytest.mark.usefixtures("single_thread")


TOP = dict(
    num_codes=16, shape=(8, 8), channels=32, num_layers=4, kernel_size=5, attention_every=2,
    num_heads=4, dropout=0.0, num_classes=3,
)
BOTTOM = dict(
    num_codes=16, shape=(8, 8), channels=32, num_layers=4, kernel_size=3, dropout=0.0, num_classes=2,
    condition_num_codes=8, condition_shape=(4, 4), condition_channels=16, condition_res_blocks=1,
)
# The bottom of three levels: conditioned on the middle map (4x4) and the top map (2x2).
BOTTOM_OF_THREE = dict(BOTTOM, upper_num_codes=(5,), upper_shapes=((2, 2),))
# Non-square map, attention after every layer, k=7 (window wider than the map's first columns).
ODD = dict(
    num_codes=10, shape=(5, 7), channels=16, num_layers=3, kernel_size=7, attention_every=1,
    num_heads=2, dropout=0.0, condition_num_codes=6, condition_shape=(5, 7),
)


def build(settings: dict, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    prior = tiny_prior(settings).eval()
    cfg = prior.layout
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.num_classes else None
    maps = tuple(torch.randint(0, k, (batch, *shape), generator=g) for k, shape in cfg.conditions)
    condition = None if not maps else maps[0] if len(maps) == 1 else maps
    return prior, labels, condition


@pytest.mark.parametrize("settings", [TOP, BOTTOM, BOTTOM_OF_THREE, ODD], ids=["top", "bottom", "bottom-of-three", "odd"])
def test_cached_logits_match_full_logits_at_every_position(settings):
    batch = 3
    prior, labels, condition = build(settings, batch)
    height, width = prior.layout.shape
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, prior.layout.num_codes, (batch, height, width), generator=g)
    with torch.no_grad():
        full = prior(codes, labels, condition)  # [B, K, H, W]
    state = IncrementalPrior(prior, batch, labels=labels, condition=condition)
    for i in range(height):
        for j in range(width):
            step = state.step_logits()
            torch.testing.assert_close(step, full[:, :, i, j], atol=1e-4, rtol=0, msg=f"position {(i, j)}")
            state.commit(codes[:, i, j])
    assert state.done
    with pytest.raises(IndexError):
        state.step_logits()


@pytest.mark.parametrize("settings", [TOP, BOTTOM, BOTTOM_OF_THREE], ids=["top", "bottom", "bottom-of-three"])
def test_cached_and_full_sampling_give_the_same_codes(settings):
    prior, labels, condition = build(settings, batch=2)
    config = SamplerConfig(temperature=1.0, top_k=8)
    kwargs = dict(labels=labels, condition=condition, config=config)
    cached = sample(prior, 2, generator=torch.Generator().manual_seed(7), cached=True, **kwargs)
    full = sample(prior, 2, generator=torch.Generator().manual_seed(7), cached=False, **kwargs)
    assert cached.shape == (2, *prior.layout.shape) and cached.dtype == torch.int64
    assert torch.equal(cached, full)
    # A different seed gives different samples (the generator really drives the draws).
    other = sample(prior, 2, generator=torch.Generator().manual_seed(8), **kwargs)
    assert not torch.equal(cached, other)


def test_generate_restarts_from_a_clean_state_in_the_same_buffers():
    # CUDA-graph replay relies on reset() restoring every cache in place: a second map drawn with
    # the same uniforms, after a half-finished manual run, must be identical, with no buffer moved.
    prior, labels, condition = build(ODD, batch=2)
    state = IncrementalPrior(prior, 2, labels=labels, condition=condition)
    height, width = prior.layout.shape
    uniforms = torch.rand(height * width, 2, generator=torch.Generator().manual_seed(11))
    config = SamplerConfig(top_k=6)
    first = state.generate(config, uniforms)
    addresses = [t.data_ptr() for t in (*state.cache.tensors(), state.codes)]
    assert state.done
    state.reset()
    for _ in range(width + 2):  # leave it mid-row, caches full of other codes
        state.step_logits()
        state.commit(torch.randint(0, prior.layout.num_codes, (2,)))
    again = state.generate(config, uniforms)
    assert torch.equal(first, again)
    assert addresses == [t.data_ptr() for t in (*state.cache.tensors(), state.codes)]
    reference = sample(prior, 2, labels=labels, condition=condition, config=config, cached=False,
                       generator=torch.Generator().manual_seed(11))
    assert torch.equal(first, reference)


@pytest.mark.parametrize("settings", [TOP, BOTTOM, ODD], ids=["top", "bottom", "odd"])
@pytest.mark.parametrize("config", [SamplerConfig(), SamplerConfig(top_k=5, temperature=0.7), SamplerConfig(top_p=0.9)],
                         ids=["plain", "top-k", "top-p"])
def test_generating_a_map_reads_nothing_back_from_the_device(settings, config, host_reads):
    """A host read inside a step would stall eager GPU sampling at every position and cannot be
    recorded in a CUDA graph; the whole map is drawn without one."""
    prior, labels, condition = build(settings, batch=2)
    state = IncrementalPrior(prior, 2, labels=labels, condition=condition)
    height, width = prior.layout.shape
    uniforms = torch.rand(height * width, 2, generator=torch.Generator().manual_seed(5))
    with host_reads() as reads:
        state.generate(config, uniforms)
    assert reads.count == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("settings", [TOP, BOTTOM], ids=["top", "bottom"])
def test_cuda_graph_replay_draws_the_same_codes_as_eager_steps(settings):
    prior, labels, condition = build(settings, batch=4)
    prior = prior.cuda()
    labels = None if labels is None else labels.cuda()
    condition = None if condition is None else condition.cuda()
    kwargs = dict(labels=labels, condition=condition, config=SamplerConfig(top_p=0.9))
    eager = sample(prior, 4, generator=torch.Generator().manual_seed(2), **kwargs)
    graphed = sample(prior, 4, generator=torch.Generator().manual_seed(2), cuda_graphs=True, **kwargs)
    assert torch.equal(eager, graphed)


def test_temperature_zero_is_argmax_of_full_logits():
    prior, labels, _ = build(TOP, batch=2)
    config = SamplerConfig(temperature=0.0)
    first = sample(prior, 2, labels=labels, config=config)
    second = sample(prior, 2, labels=labels, config=config, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    with torch.no_grad():
        logits = prior(first, labels)
    assert torch.equal(first, logits.argmax(dim=1))


def test_top_k_samples_stay_in_the_top_k_of_the_full_logits():
    prior, _, condition = build(BOTTOM, batch=4)
    labels = torch.tensor([0, 1, 0, 1])
    top_k = 3
    codes = sample(
        prior, 4, labels=labels, condition=condition, config=SamplerConfig(temperature=2.0, top_k=top_k),
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        logits = prior(codes, labels, condition)
    allowed = logits.topk(top_k, dim=1).indices  # [B, k, H, W]
    assert torch.all((allowed == codes[:, None]).any(dim=1))
    # At temperature 2 with 16 codes, plain sampling would leave the top-3 often; check it is used.
    assert len(torch.unique(codes)) > 3


def test_full_sampling_restores_training_mode_and_checks_inputs():
    prior, labels, condition = build(BOTTOM, batch=1)
    prior.train()
    codes = sample(prior, 1, labels=labels, condition=condition, config=SamplerConfig(temperature=0.0), cached=False)
    assert prior.training
    assert codes.shape == (1, 8, 8)
    with pytest.raises(ValueError, match="eval"):
        IncrementalPrior(prior, 1, labels=labels, condition=condition)


def test_filter_logits_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()  # noqa: E731
    assert kept(0.4) == [False, True, False, False]
    assert kept(0.75) == [False, True, False, True]
    assert kept(0.85) == [False, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    # top-k then top-p compose; the most likely code always survives.
    both = filter_logits(logits, top_k=2, top_p=0.99)
    assert torch.isfinite(both)[0].tolist() == [False, True, False, True]
    assert torch.isfinite(filter_logits(logits, top_k=1))[0].tolist() == [False, True, False, False]


def test_tiny_top_p_sampling_equals_argmax():
    torch.manual_seed(0)
    logits = torch.randn(64, 16)
    chosen = choose_codes(logits, SamplerConfig(top_p=1e-6), torch.rand(64))
    assert torch.equal(chosen, logits.argmax(dim=-1))
    # Probabilities 0.4, 0.3, 0.2, 0.1: a 0.65 nucleus is the first two codes, and both get drawn.
    peaked = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().expand(200, 4)
    drawn = choose_codes(peaked, SamplerConfig(top_p=0.65), torch.rand(200))
    assert set(drawn.tolist()) == {0, 1}


def test_drawn_codes_follow_the_softmax_probabilities():
    # Inverse-CDF draws on uniforms: frequencies match softmax(logits / T), and a code outside the
    # top-k set is never drawn, even for uniforms at the very ends of [0, 1).
    probs = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.05])
    logits = probs.clamp_min(1e-30).log().expand(200_000, 5)
    drawn = choose_codes(logits, SamplerConfig(), torch.rand(200_000, generator=torch.Generator().manual_seed(3)))
    frequencies = torch.bincount(drawn, minlength=5).double() / drawn.numel()
    assert torch.allclose(frequencies, probs.double(), atol=4e-3)
    assert frequencies[1] == 0
    edges = torch.tensor([0.0, 1e-9, 0.5, 0.9999999, 0.99999994])  # the last: the largest float32 below 1
    topk = choose_codes(logits[:5], SamplerConfig(top_k=2), edges)
    assert set(topk.tolist()) <= {0, 3}
    assert topk[0] == 0 and topk[-1] == 3
    # Temperature sharpens: at T = 0.5 the probabilities are proportional to p^2.
    sharp = choose_codes(logits, SamplerConfig(temperature=0.5), torch.rand(200_000, generator=torch.Generator().manual_seed(4)))
    squared = probs.double() ** 2 / (probs.double() ** 2).sum()
    assert torch.allclose(torch.bincount(sharp, minlength=5).double() / sharp.numel(), squared, atol=4e-3)


def test_uniforms_come_from_the_generator_device_and_are_moved():
    first = draw_uniforms(6, 3, torch.Generator().manual_seed(5), torch.device("cpu"))
    again = draw_uniforms(6, 3, torch.Generator().manual_seed(5), torch.device("meta"))
    assert first.shape == (6, 3) and again.device.type == "meta"
    assert torch.equal(first, draw_uniforms(6, 3, torch.Generator().manual_seed(5), torch.device("cpu")))
    assert ((first >= 0) & (first < 1)).all()


@pytest.mark.parametrize(
    "settings, key",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(precision="fp16"), "precision"),
    ],
)
def test_sampler_config_rejects_bad_values(settings, key):
    with pytest.raises(ConfigError) as err:
        SamplerConfig(**settings)
    assert err.value.key == key


def test_a_prior_below_two_levels_reads_both_maps():
    """Changing either level above changes the logits; one map alone is refused by name."""
    prior, labels, (top, middle) = build(BOTTOM_OF_THREE, batch=2)
    codes = torch.randint(0, 16, (2, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = prior(codes, labels, (top, middle))
        assert not torch.allclose(base, prior(codes, labels, ((top + 1) % 5, middle)))
        assert not torch.allclose(base, prior(codes, labels, (top, (middle + 1) % 8)))
    with pytest.raises(DataError, match="conditioned on 2 code map"):
        prior(codes, labels, middle)
    with pytest.raises(DataError, match=r"condition\[0\]: expected shape \[B, 2, 2\]"):
        prior(codes, labels, (middle, middle))


@pytest.mark.parametrize("settings", [TOP, BOTTOM], ids=["top", "bottom"])
def test_bf16_cached_steps_follow_the_fp32_distribution(settings):
    """Teacher-forced on the same codes, the bf16 copy's step log-probabilities stay within bf16
    rounding of the fp32 full pass; the caller's prior is left in fp32."""
    batch = 4
    prior, labels, condition = build(settings, batch)
    height, width = prior.layout.shape
    codes = torch.randint(0, prior.layout.num_codes, (batch, height, width), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = prior(codes, labels, condition).log_softmax(1)
    low = prior_for_sampling(prior, "bf16")
    assert low.embed.weight.dtype == torch.bfloat16 and prior.embed.weight.dtype == torch.float32
    assert prior_for_sampling(prior, "fp32") is prior
    state = IncrementalPrior(low, batch, labels=labels, condition=condition)
    for i in range(height):
        for j in range(width):
            logp = state.step_logits().float().log_softmax(-1)
            ref = reference[:, :, i, j]
            assert (logp - ref).abs().max() < 0.05, f"position {(i, j)}"
            assert (ref.exp() * (ref - logp)).sum(-1).mean() < 1e-3, f"position {(i, j)}"
            state.commit(codes[:, i, j])


def test_bf16_sampling_is_seeded_and_draws_valid_codes():
    prior, labels, condition = build(BOTTOM, batch=3)
    config = SamplerConfig(precision="bf16")
    draw = lambda seed: sample(prior, 3, labels=labels, condition=condition, config=config,  # noqa: E731
                               generator=torch.Generator().manual_seed(seed))
    first = draw(7)
    assert first.dtype == torch.int64 and first.shape == (3, *prior.layout.shape)
    assert 0 <= first.min() and first.max() < prior.layout.num_codes
    assert torch.equal(first, draw(7)) and not torch.equal(first, draw(8))
    assert prior.embed.weight.dtype == torch.float32
