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
from test_vqvae2 import tiny_config
from vqgen.models.vqvae2 import VQVAE2


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("settings", [TOP, BOTTOM], ids=["top", "bottom"])
def test_prior_compiles_to_one_graph_with_eager_results(settings):
    prior, labels, condition = build(settings, batch=3)
    prior.train()
    codes = torch.randint(0, prior.layout.num_codes, (3, *prior.layout.shape), generator=torch.Generator().manual_seed(7))
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
    eager = VQVAE2(tiny_config())
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


@pytest.fixture
def traced_as_on_a_gpu(monkeypatch):
    """Dynamo's view of a GPU machine, on a CPU: tensors are fake CUDA tensors (nothing runs), and
    dynamo is told Triton works, so it traces the Triton kernels the dispatch picks for CUDA
    inputs as it would there. Yields a counter of the fused-kernel calls traced."""
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode
    import torch.utils._triton

    from vqgen.kernels import gated, vq_search

    if not hasattr(torch.utils._triton, "has_triton"):
        pytest.skip("this torch decides Triton support elsewhere")
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    calls = {"gated": 0, "nearest_code": 0}

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(gated, "gated_residual_triton", counted("gated", gated.gated_residual_triton))
    monkeypatch.setattr(vq_search, "nearest_code_triton", counted("nearest_code", vq_search.nearest_code_triton))
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
        yield calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_prior_with_fused_kernels_traces_to_one_graph(traced_as_on_a_gpu, dtype):
    """The fused gated epilogue (an autograd.Function around a Triton kernel) stays inside the
    graph: building the kernel object or reading torch's fp32 matmul setting at launch would
    split the graph at every layer."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters in dtype (autocast is off without a real GPU)
    try:
        prior, _, _ = build(TOP, batch=2)  # built on the fake CUDA device
    finally:
        torch.set_default_dtype(default)
    codes = torch.randint(0, prior.layout.num_codes, (2, *prior.layout.shape))
    labels = torch.randint(0, prior.layout.num_classes, (2,))
    explanation = torch._dynamo.explain(prior.train())(codes, labels)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    assert traced_as_on_a_gpu["gated"] == prior.config.num_layers


def test_vqvae_with_fused_search_breaks_only_at_the_codebook_decisions(traced_as_on_a_gpu):
    model = VQVAE2(tiny_config()).train()
    for quantizer in (model.quantizer_top, model.quantizer_bottom):
        quantizer._host_step = 1  # past the first step (its count cannot be read from a fake tensor)
    images = torch.rand(2, 3, 32, 32)
    explanation = torch._dynamo.explain(lambda x: model(x).loss)(images)
    assert traced_as_on_a_gpu["nearest_code"] == 2
    assert explanation.break_reasons, "the host-side codebook decisions are expected to break the graph"
    assert all("disable" in str(reason.reason) for reason in explanation.break_reasons), explanation.break_reasons
