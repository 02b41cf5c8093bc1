"""torch.compile over the models (``train.compile``), traced on a CPU with the ``aot_eager`` backend.

``aot_eager`` runs dynamo and AOTAutograd (where graph breaks and tracing failures show) without
generating code, so these tests need no compiler and check what the GPU path depends on: the
priors trace into one graph, forward and backward, and the VQ-VAE (whose codebook updates make
host-side decisions, hence graph breaks) trains exactly as in eager mode.
"""

from __future__ import annotations

import copy

import pytest
import torch

from test_sampling import BOTTOM, TOP, build
from vqgen.models.vqvae2 import VQVAE2, VQVAEConfig


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("settings", [TOP, BOTTOM], ids=["top", "bottom"])
def test_prior_compiles_to_one_graph_with_eager_results(settings):
    prior, labels, condition = build(settings, batch=3)
    prior.train()
    codes = torch.randint(0, prior.config.num_codes, (3, *prior.config.shape), generator=torch.Generator().manual_seed(7))
    compiled = torch.compile(prior, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break is an error

    eager_logits = prior(codes, labels, condition)
    eager_logits.square().mean().backward()
    eager_grads = [p.grad.clone() for p in prior.parameters()]
    prior.zero_grad(set_to_none=True)

    compiled_logits = compiled(codes, labels, condition)
    compiled_logits.square().mean().backward()
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-5, atol=1e-5)
    for p, expected in zip(prior.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6)


def test_vqvae_trains_the_same_compiled_and_eager():
    torch.manual_seed(0)
    eager = VQVAE2(VQVAEConfig(hidden_channels=16, res_channels=8, num_res_blocks=1, num_codes=32, code_dim=8))
    other = copy.deepcopy(eager)
    compiled = torch.compile(other, backend="aot_eager")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, other)]
    images = torch.rand(3, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for batch in images:  # the first step initialises the codebooks from the data
        for model, optimizer in zip((eager, compiled), optimizers):
            optimizer.zero_grad()
            model(batch).loss.backward()
            optimizer.step()
    expected = eager.state_dict()
    for name, value in other.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
