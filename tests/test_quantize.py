"""EMA vector quantizer: EMA arithmetic, gradients, restarts, precision, eval and multi-process sync."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from vqgen.errors import ConfigError
from vqgen.models.quantize import EMAQuantizer, QuantizerConfig, laplace_smoothed


def _quantizer(**overrides) -> EMAQuantizer:
    torch.manual_seed(0)
    # Tests that place codes by hand turn the first-batch initialisation off.
    return EMAQuantizer(QuantizerConfig(**{"num_codes": 16, "code_dim": 4, "data_init": False, **overrides}))


def _set_codebook(vq: EMAQuantizer, codebook: torch.Tensor) -> None:
    vq.codebook.copy_(codebook)
    vq.ema_cluster_size.fill_(1.0)
    vq.ema_embed_sum.copy_(codebook)


def _buffers(vq: EMAQuantizer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in vq.state_dict().items()}


def test_ema_update_matches_hand_computation():
    eps = 1e-5
    vq = EMAQuantizer(QuantizerConfig(num_codes=3, code_dim=2, decay=0.5, eps=eps, dead_code_threshold=0, data_init=False))
    _set_codebook(vq, torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    # Four vectors in a 1x2x2 map, in (h, w) order: two near code 0, two near code 1, none near 2.
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 1.0], [11.0, -1.0]])
    z = rows.t().reshape(1, 2, 2, 2)

    out = vq(z)

    assert out.codes.tolist() == [[[0, 0], [1, 1]]]
    # counts n = [2, 2, 0], sums = [[1, 1], [20, 0], [0, 0]]; ema = 0.5 * old + 0.5 * new.
    sizes = torch.tensor([0.5 * 1 + 0.5 * 2, 0.5 * 1 + 0.5 * 2, 0.5 * 1 + 0.5 * 0])  # [1.5, 1.5, 0.5]
    sums = torch.tensor([[0.5 * 0 + 0.5 * 1, 0.5 * 0 + 0.5 * 1], [0.5 * 10 + 0.5 * 20, 0.0], [0.0, 0.5 * 10]])
    total = 3.5
    smoothed = torch.tensor([(s + eps) / (total + 3 * eps) * total for s in sizes.tolist()])
    torch.testing.assert_close(vq.ema_cluster_size, sizes, atol=1e-6, rtol=0)
    torch.testing.assert_close(vq.ema_embed_sum, sums, atol=1e-6, rtol=0)
    torch.testing.assert_close(vq.codebook, sums / smoothed[:, None], atol=1e-6, rtol=0)
    torch.testing.assert_close(laplace_smoothed(sizes, eps), smoothed, atol=1e-6, rtol=0)
    assert int(vq.step) == 1
    # The output uses the codebook the search compared against (before this step's update).
    assert out.quantized[0, :, 1, 1].tolist() == [10.0, 0.0]
    # Batch histogram [2, 2, 0]: perplexity exp(ln 2) = 2, usage 2 of 3 codes.
    assert out.perplexity.item() == pytest.approx(2.0, abs=1e-5)
    assert out.usage.item() == pytest.approx(2 / 3)
    expected_commit = 0.25 * (rows - torch.tensor([[0.0, 0], [0, 0], [10, 0], [10, 0]])).pow(2).mean()
    assert out.commitment_loss.item() == pytest.approx(expected_commit.item(), rel=1e-6)


def test_straight_through_and_commitment_gradients():
    vq = _quantizer(commitment_cost=0.25)
    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    codebook = vq.codebook.clone()  # training mode: the forward updates the codebook after the lookup
    out = vq(z)
    # Forward values are the codebook vectors of the chosen codes.
    expected = codebook[out.codes].permute(0, 3, 1, 2)
    torch.testing.assert_close(out.quantized, expected, atol=1e-6, rtol=0)

    upstream = torch.randn_like(z)
    (grad_q,) = torch.autograd.grad((out.quantized * upstream).sum(), z, retain_graph=True)
    torch.testing.assert_close(grad_q, upstream)  # identity

    (grad_c,) = torch.autograd.grad(out.commitment_loss, z)
    # d/dz beta * mean((z - sg(q))^2) = 2 beta (z - q) / numel: pulls z toward its code only.
    torch.testing.assert_close(grad_c, 2 * 0.25 * (z - expected).detach() / z.numel())
    # The codebook is trained by EMA, never by gradients.
    assert list(vq.parameters()) == []
    assert not vq.codebook.requires_grad


def test_dead_code_restart_revives_codes_onto_encoder_outputs():
    vq = _quantizer(num_codes=16, dead_code_threshold=1.0, restart_every=2)
    # Codebook far from the data: only the code closest to the data cloud is ever chosen.
    _set_codebook(vq, torch.randn(16, 4) + 50.0)
    torch.manual_seed(1)
    z = torch.randn(4, 4, 4, 4)
    rows = z.permute(0, 2, 3, 1).reshape(-1, 4)

    vq(z)  # step 1: no check yet
    used_before = vq(z, update=False).codes.unique().numel()
    dead = vq.ema_cluster_size < 1.0
    assert int(dead.sum()) >= 14

    vq(z)  # step 2: restart
    used_after = vq(z, update=False).codes.unique().numel()
    assert used_after > used_before + 8

    # Every revived code sits exactly on one of the encoder outputs, with reset statistics.
    revived = vq.codebook[dead]
    gap = (revived[:, None, :] - rows[None, :, :]).abs().amax(dim=2)  # [dead, N] max-norm distances
    assert gap.min(dim=1).values.max() == 0.0
    torch.testing.assert_close(vq.ema_cluster_size[dead], torch.ones(int(dead.sum())))
    torch.testing.assert_close(vq.ema_embed_sum[dead], revived)
    # Distinct picks (enough rows for all dead codes).
    assert revived.unique(dim=0).shape[0] == revived.shape[0]


def test_restart_disabled_with_zero_threshold():
    vq = _quantizer(dead_code_threshold=0.0, restart_every=1)
    _set_codebook(vq, torch.randn(16, 4) + 50.0)
    z = torch.randn(2, 4, 4, 4)
    for _ in range(3):
        vq(z)
    assert vq(z, update=False).codes.unique().numel() <= 2


@pytest.mark.parametrize("steps_before_load", [0, 2], ids=["fresh", "used"])
def test_state_dict_resume_reproduces_restarts(steps_before_load):
    """The restart schedule follows the loaded step count, also in a quantizer that has run
    steps of its own before the load (its next restart would otherwise fall elsewhere)."""
    gen = torch.Generator().manual_seed(3)
    data = [torch.randn(2, 4, 4, 4, generator=gen) for _ in range(6)]
    straight = _quantizer(restart_every=2)
    for z in data:
        straight(z)

    first = _quantizer(restart_every=2)
    for z in data[:3]:
        first(z)
    resumed = _quantizer(restart_every=2)
    for z in data[:steps_before_load]:
        resumed(z)
    resumed.load_state_dict(first.state_dict())
    assert int(resumed.step) == 3
    for z in data[3:]:
        resumed(z)
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


@pytest.mark.parametrize("data_init", [True, False])
def test_training_steps_read_nothing_back_from_the_device(data_init, host_reads):
    """Between restarts a training step makes no host read: on a GPU each would stall the CPU
    until the GPU caught up. (The first step, an initialisation or a restart may read.)"""
    vq = _quantizer(restart_every=4, data_init=data_init)
    z = torch.randn(2, 4, 4, 4)
    vq(z)  # step 1 (initialises from data when asked)
    with host_reads() as reads:
        vq(z)  # step 2
        vq(z)  # step 3
    assert reads.count == 0


def test_fp32_under_bf16_autocast():
    vq = _quantizer()
    reference = copy.deepcopy(vq)
    z = torch.randn(2, 4, 4, 4).bfloat16()  # what a conv under autocast would hand over
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
    expected = reference(z.float())
    assert vq.codebook.dtype == torch.float32 and vq.ema_embed_sum.dtype == torch.float32
    assert out.quantized.dtype == torch.float32 and out.commitment_loss.dtype == torch.float32
    assert torch.equal(out.codes, expected.codes)
    torch.testing.assert_close(vq.codebook, reference.codebook, atol=0, rtol=0)


def test_eval_and_update_false_leave_buffers_unchanged():
    vq = _quantizer(restart_every=1)
    before = _buffers(vq)
    vq.eval()
    for _ in range(3):
        vq(torch.randn(2, 4, 4, 4))
    vq.train()
    vq(torch.randn(2, 4, 4, 4), update=False)
    for key, value in vq.state_dict().items():
        assert torch.equal(value, before[key]), key
    vq(torch.randn(2, 4, 4, 4))
    assert not torch.equal(vq.codebook, before["codebook"])


def test_config_validation_names_field():
    with pytest.raises(ConfigError, match="^decay:"):
        QuantizerConfig(decay=1.0)
    with pytest.raises(ConfigError, match="^restart_every:"):
        QuantizerConfig(restart_every=0)
    with pytest.raises(ConfigError, match="^eps:"):
        QuantizerConfig(eps=0.0)


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)  # same initial codebook on both ranks
        vq = EMAQuantizer(QuantizerConfig(num_codes=16, code_dim=4, decay=0.5, restart_every=3, data_init=False))
        vq.codebook.add_(5.0)  # most codes go dead, so restarts happen
        vq.ema_embed_sum.add_(5.0)
        gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
        for _ in range(3):
            vq(torch.randn(2, 4, 4, 4, generator=gen))
        state = {k: v.contiguous() for k, v in vq.state_dict().items()}
        save_file(state, f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def _no_restart_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        vq = EMAQuantizer(QuantizerConfig(num_codes=16, code_dim=4, dead_code_threshold=0, data_init=False))
        z = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(7))
        vq(z[2 * rank : 2 * rank + 2])  # each rank sees half of the batch
        save_file({"codebook": vq.codebook}, f"{out_dir}/half{rank}.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_processes_keep_identical_codebooks(tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in range(2))
    assert int(rank0["step"]) == 3
    # A restart ran at step 3 (the last one): revived codes hold exactly the threshold size.
    assert (rank0["ema_cluster_size"] == 1.0).any()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key

    # Summed statistics: two half batches on two ranks give the single-process full-batch codebook.
    mp.spawn(_no_restart_worker, args=(2, str(tmp_path / "init2"), str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    single = EMAQuantizer(QuantizerConfig(num_codes=16, code_dim=4, dead_code_threshold=0, data_init=False))
    single(torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(7)))
    for r in range(2):
        half = load_file(tmp_path / f"half{r}.safetensors")["codebook"]
        torch.testing.assert_close(half, single.codebook, atol=1e-5, rtol=1e-5)


def test_first_training_batch_initialises_the_codebook():
    # Encoder outputs far from the random codebook: without the initialisation every vector would
    # map to one code.
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3)) * 0.01 + 0.5
    collapsed = _quantizer()(z)
    assert collapsed.codes.unique().numel() == 1
    vq = _quantizer(data_init=True, decay=0.5)
    init = _quantizer(data_init=True)
    init._init_from_data(z.permute(0, 2, 3, 1).reshape(-1, 4))
    # each initial code is one of the input vectors, and no two codes share one
    rows = z.permute(0, 2, 3, 1).reshape(-1, 4)
    assert all((rows == code).all(dim=1).any() for code in init.codebook)
    assert init.codebook.unique(dim=0).shape[0] == 16
    out = vq(z)
    # every code was a distinct input vector (32 vectors >= 16 codes), so many codes are used at once
    assert out.codes.unique().numel() > 8
    first_codebook = vq.codebook.clone()
    vq(z)  # later steps are ordinary EMA updates, never a second initialisation
    assert int(vq.step) == 2
    assert torch.cdist(vq.codebook, first_codebook).diagonal().max() < 0.05
    vq.eval()
    fresh = _quantizer(data_init=True).eval()
    fresh(z)
    assert int(fresh.step) == 0  # evaluation never initialises
