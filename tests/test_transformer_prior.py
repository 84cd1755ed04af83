"""The transformer prior (transformer_prior.py) against independent references: causality by the Jacobian of the
logits with respect to one-hot inputs, the KV-cached sampler against recomputing the whole prefix, classifier-free
guidance at scales 1 and 0 against the conditional and the unconditional forward pass, and top-k / top-p filtering
against probabilities worked by hand."""
import pytest
import torch
import torch.nn.functional as F

from transformer_prior import TransformerPrior, filtered_probs


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread (conftest.py)


def tiny(num_classes: int = 3, **kw) -> TransformerPrior:
    torch.manual_seed(0)
    return TransformerPrior(16, num_classes=num_classes, shape=(4, 5), width=32, num_layers=2, heads=4, **kw).eval()


@pytest.mark.parametrize("num_classes", [0, 3])
def test_each_position_depends_on_exactly_the_codes_before_it(num_classes):
    model = tiny(num_classes).double()
    codes = torch.randint(16, (1, 4, 5), generator=torch.Generator().manual_seed(1))
    one_hot = F.one_hot(codes, 16).permute(0, 3, 1, 2).double()               # (1, K, H, W)
    labels = torch.tensor([1]) if num_classes else None

    def logits(x):
        embedded = torch.einsum("bkhw,kc->bchw", x, model.code.weight)
        return model.forward_embedded(embedded, labels)

    jacobian = torch.autograd.functional.jacobian(logits, one_hot)             # (1, K, H, W, 1, K, H, W)
    depends = jacobian.abs().sum(dim=(0, 1, 4, 5)).reshape(20, 20) > 0          # [output t, input s]
    assert torch.equal(depends, torch.ones(20, 20, dtype=torch.bool).tril(-1))  # s < t in raster order, no other


def test_the_class_reaches_every_position_and_unconditional_means_the_no_class_token():
    model = tiny()
    codes = torch.randint(16, (2, 4, 5), generator=torch.Generator().manual_seed(2))
    a, b = model(codes, torch.tensor([0, 0])), model(codes, torch.tensor([1, 1]))
    assert ((a - b).abs().amax(dim=1) > 0).all()
    with torch.no_grad():
        model.start.weight[1] = model.start.weight[3]                           # class 1 := the "no class" token
    assert torch.equal(model(codes, torch.tensor([1, 1])), model(codes))


def test_class_dropout_replaces_the_class_in_training_only():
    model = tiny(class_dropout=1.0, dropout=0.0)
    codes = torch.randint(16, (2, 4, 5), generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 2])
    model.train()
    assert torch.equal(model(codes, labels), model(codes))
    model.eval()
    assert not torch.equal(model(codes, labels), model(codes))


def recorded(model, codes, labels, guidance):
    """The (B, K, H, W) logits in_raster_order hands to `choose` when it is told the codes of `codes`."""
    seen = torch.zeros(codes.shape[0], 16, *codes.shape[1:])

    def choose(i, j, logits):
        seen[:, :, i, j] = logits
        return codes[:, i, j]

    model.in_raster_order(codes.shape[0], tuple(codes.shape[1:]), choose, labels, guidance=guidance)
    return seen


@pytest.mark.parametrize("cache", [True, False])
def test_guidance_1_is_the_conditional_prior_and_0_the_unconditional(cache):
    model = tiny()
    codes = torch.randint(16, (3, 4, 5), generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        conditional, unconditional = model(codes, labels), model(codes)
    torch.testing.assert_close(recorded(model, codes, labels, 1.0), conditional, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(recorded(model, codes, labels, 0.0), unconditional, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(recorded(model, codes, labels, None), conditional, rtol=1e-4, atol=1e-5)
    guided = recorded(model, codes, labels, 3.0)
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("guidance", [None, 2.0])
def test_the_cached_sampler_draws_what_recomputation_draws(guidance):
    model = tiny()
    labels = torch.tensor([0, 1, 2, 1])
    draws = [model.sample(4, (4, 5), labels=labels, generator=torch.Generator().manual_seed(5), guidance=guidance,
                          cache=cache, top_k=8, top_p=0.9) for cache in (True, False)]
    assert torch.equal(*draws)
    assert draws[0].shape == (4, 4, 5) and 0 <= int(draws[0].min()) and int(draws[0].max()) < 16


def test_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.allclose(filtered_probs(logits), torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.allclose(filtered_probs(logits, top_k=2), torch.tensor([[0.5, 0.2, 0, 0, 0]]) / 0.7)
    # top_p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 joins (0.85 >= 0.8) and the rest go
    assert torch.allclose(filtered_probs(logits, top_p=0.8), torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    assert torch.allclose(filtered_probs(logits, top_p=0.3), torch.tensor([[1.0, 0, 0, 0, 0]]))
    # temperature first: logits / 0.5 squares the odds
    squared = torch.tensor([0.25, 0.04, 0.0225, 0.01, 0.0025])
    assert torch.allclose(filtered_probs(logits, temperature=0.5), (squared / squared.sum())[None])
    shuffled = logits[:, [3, 0, 4, 2, 1]]                                        # the order of the codes is no matter
    assert torch.allclose(filtered_probs(shuffled, top_k=2, top_p=0.9), torch.tensor([[0, 0.5, 0, 0, 0.2]]) / 0.7)


def test_bad_conditioning_is_refused():
    model = tiny(num_classes=0)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.zeros(1, 4, 5, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match="4x5"):
        model(torch.zeros(1, 3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="guidance needs class labels"):
        model.sample(1, (4, 5), guidance=2.0)
