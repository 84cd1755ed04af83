"""A training step with no host synchronisation: after the one-time k-means initialisation, forward + loss (and so
their backward, traced by AOTAutograd) compile into one graph (torch.compile(fullgraph=True)) in which no tensor
has a size that depends on data (what torch.bincount or a boolean mask would give) and no value is read back to
Python (Tensor.item()): each of those makes the host wait for the GPU on every step.

The check runs on the CPU with a backend that only inspects the traced graph (no code generation, so it is fast and
needs no compiler), and the compiled step gives the eager step's numbers."""
import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from models import VQVAE

VARIANTS = {
    "ema": dict(quantizer="ema"),
    "ema cosine lookup": dict(quantizer="ema", cosine=True, lookup_dim=4),
    "vq": dict(quantizer="vq"),
    "vq rotation trick": dict(quantizer="vq", rotation_trick=True),
    "fsq": dict(quantizer="fsq"),
}


def host_syncs(gm: torch.fx.GraphModule) -> list[str]:
    """The nodes of a traced graph that would wait for the device: data-dependent sizes, reads to Python."""
    found = []
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor) and free_unbacked_symbols(value.shape):
            found.append(f"{node.target} has a data-dependent size {tuple(value.shape)}")
        if (node.op == "call_method" and node.target in ("item", "tolist", "nonzero")) or \
                "_local_scalar_dense" in str(node.target):
            found.append(f"{node.target} reads a value back to the host")
    return found


@pytest.mark.parametrize("name", VARIANTS)
def test_the_training_step_compiles_into_one_graph_without_host_syncs(name):
    torch.manual_seed(0)
    model = VQVAE(hidden_channels=16, residual_channels=8, num_residual_blocks=1, embedding_dim=8,
                  num_embeddings=32, kmeans_init=True, restart_threshold=1.0, **VARIANTS[name]).train()
    x = torch.rand(4, 3, 16, 16) - 0.5

    def step(x):
        out = model(x)
        return F.mse_loss(out.reconstruction, x) + out.vq.loss, out.vq.perplexity

    step(x)[0].backward()                           # the first step: k-means initialisation, eagerly
    graphs = []

    def inspect(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(step, fullgraph=True, backend=inspect)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    loss, perplexity = compiled(x)
    loss.backward()
    assert len(graphs) == 1
    assert host_syncs(graphs[0]) == []
    # the same numbers as the eager step from the same state and random stream
    compiled_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    torch.manual_seed(1)
    eager_loss, eager_perplexity = step(x)
    assert torch.equal(loss, eager_loss) and torch.equal(perplexity, eager_perplexity)
    for k, v in model.state_dict().items():
        assert torch.equal(v, compiled_state[k]), k


def test_the_check_sees_a_data_dependent_size():
    """The inspector itself: torch.bincount's output size depends on the largest index."""
    graphs = []

    def inspect(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch.compile(lambda i: torch.bincount(i, minlength=4).float().sum(), fullgraph=True,
                  backend=inspect)(torch.tensor([0, 1, 1]))
    assert any("data-dependent" in s for s in host_syncs(graphs[0]))
