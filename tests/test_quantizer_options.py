"""models.QuantizerOptions, the quantizer's settings by name only: nothing is passed by position, each option reaches
the quantizer it builds (through make_quantizer, VQVAE and both levels of hierarchy.VQVAE2), and a run's Config
gives every option but eps. The expected quantizers are written out by hand below, not read from the code."""
from dataclasses import FrozenInstanceError, fields, replace

import pytest
import torch

from checkpoint import MODEL_FIELDS, Config, build_model, quantizer_options
from hierarchy import VQVAE2
from models import FSQ, VQVAE, QuantizerOptions, VectorQuantizerEMA, make_quantizer

SMALL = dict(hidden_channels=8, residual_channels=4, num_residual_blocks=1)
BASE = dict(num_embeddings=16, embedding_dim=8)   # every other option at its default


def reading(q: torch.nn.Module) -> dict:
    """What a built quantizer holds of each option."""
    if isinstance(q, FSQ):
        return dict(kind="FSQ", num_embeddings=q.num_embeddings, embedding_dim=q.project_in.in_features,
                    levels=q.levels)
    r = dict(kind=type(q).__name__, num_embeddings=q.num_embeddings, embedding_dim=q.embedding_dim,
             codebook=tuple(q.embedding.shape), beta=q.beta, kmeans_init=not bool(q.initialized),
             restart_threshold=q.restart_threshold, cosine=q.cosine, lookup_dim=q.lookup_dim)
    if q.lookup_dim:
        r["projection"] = (q.project_in.in_features, q.project_in.out_features)
    if isinstance(q, VectorQuantizerEMA):
        return dict(r, decay=q.decay, eps=q.eps)
    return dict(r, rotation_trick=q.rotation_trick)


# BASE's quantizer of each kind: K codes searched in lookup_dim 4 (cosine, k-means start, restarts below 1 use);
# FSQ's levels for a target of 16 codes are the paper's for 2^8 (the nearest size it lists): 8 x 6 x 5 = 240
VECTOR = dict(num_embeddings=16, embedding_dim=8, codebook=(16, 4), beta=0.25, kmeans_init=True,
              restart_threshold=1.0, cosine=True, lookup_dim=4, projection=(8, 4))
EXPECTED = {"ema": dict(VECTOR, kind="VectorQuantizerEMA", decay=0.99, eps=1e-5),
            "vq": dict(VECTOR, kind="VectorQuantizer", rotation_trick=False),
            "fsq": dict(kind="FSQ", num_embeddings=240, embedding_dim=8, levels=(8, 6, 5))}

# each option away from its default, and what that changes in each kind's quantizer (nothing where the kind has no
# such option); 1024 codes give FSQ the paper's levels for 2^10, 8 x 5 x 5 x 5 = 1000
CHANGES = {
    "num_embeddings": (1024, {"ema": dict(num_embeddings=1024, codebook=(1024, 4)),
                              "vq": dict(num_embeddings=1024, codebook=(1024, 4)),
                              "fsq": dict(num_embeddings=1000, levels=(8, 5, 5, 5))}),
    "embedding_dim": (6, {"ema": dict(embedding_dim=6, projection=(6, 4)),
                          "vq": dict(embedding_dim=6, projection=(6, 4)), "fsq": dict(embedding_dim=6)}),
    "beta": (0.7, {"ema": dict(beta=0.7), "vq": dict(beta=0.7)}),
    "decay": (0.5, {"ema": dict(decay=0.5)}),
    "eps": (0.01, {"ema": dict(eps=0.01)}),
    "kmeans_init": (False, {"ema": dict(kmeans_init=False), "vq": dict(kmeans_init=False)}),
    "restart_threshold": (2.5, {"ema": dict(restart_threshold=2.5), "vq": dict(restart_threshold=2.5)}),
    "cosine": (False, {"ema": dict(cosine=False), "vq": dict(cosine=False)}),
    "lookup_dim": (3, {"ema": dict(lookup_dim=3, codebook=(16, 3), projection=(8, 3)),
                       "vq": dict(lookup_dim=3, codebook=(16, 3), projection=(8, 3))}),
    "rotation_trick": (True, {"vq": dict(rotation_trick=True)}),
    "fsq_levels": ((3, 4), {"fsq": dict(levels=(3, 4), num_embeddings=12)}),
}
KINDS = ("ema", "vq", "fsq")


def expected(kind: str, field: str) -> dict:
    return {**EXPECTED[kind], **CHANGES[field][1].get(kind, {})}


def test_every_option_is_changed_below_and_away_from_its_default():
    assert {f.name for f in fields(QuantizerOptions)} == {"quantizer", *CHANGES}
    for name, (value, _) in CHANGES.items():
        assert getattr(QuantizerOptions(), name) != value, name


def test_nothing_is_passed_by_position():
    with pytest.raises(TypeError):
        QuantizerOptions("vq", 512)
    with pytest.raises(TypeError):
        make_quantizer("vq", 512, 64)                 # the former signature
    with pytest.raises(TypeError, match="QuantizerOptions"):
        make_quantizer("vq")
    with pytest.raises(TypeError):
        VQVAE(8, 4, 1)
    with pytest.raises(TypeError):
        VQVAE2(8, 4, 1)
    with pytest.raises(TypeError):
        VQVAE(**SMALL, num_embedings=16)              # a misspelt option is refused, not ignored
    with pytest.raises(FrozenInstanceError):
        QuantizerOptions().cosine = False
    assert QuantizerOptions(fsq_levels=[3, 4]).fsq_levels == (3, 4)   # kept as a tuple, so options compare equal


@pytest.mark.parametrize("kind", KINDS)
def test_the_defaults_build_each_kind_as_written(kind):
    assert reading(make_quantizer(QuantizerOptions(quantizer=kind, **BASE))) == EXPECTED[kind]


@pytest.mark.parametrize("field", CHANGES)
@pytest.mark.parametrize("kind", KINDS)
def test_each_option_reaches_the_quantizer_it_builds(kind, field):
    value = CHANGES[field][0]
    options = QuantizerOptions(quantizer=kind, **{**BASE, field: value})
    assert reading(make_quantizer(options)) == expected(kind, field)
    # VQVAE: the options whole, or their fields by name; D is also the encoder's output and the decoder's input
    for model in (VQVAE(**SMALL, options=options), VQVAE(**SMALL, quantizer=kind, **{**BASE, field: value})):
        assert model.options == options
        assert reading(model.quantizer) == expected(kind, field)
        assert model.encoder.to_embedding.out_channels == model.decoder.conv1.in_channels == options.embedding_dim


@pytest.mark.parametrize("field", CHANGES)
@pytest.mark.parametrize("kind", KINDS)
def test_each_option_reaches_both_levels_of_the_2_level_model(kind, field):
    """The top has the bottom's options but its own K: 4096 codes (FSQ: the paper's levels for 2^12, 7 x 5^4 =
    4375), unless explicit FSQ levels serve both levels."""
    value = CHANGES[field][0]
    options = QuantizerOptions(quantizer=kind, **{**BASE, field: value})
    model = VQVAE2(**SMALL, top_num_embeddings=4096, options=options)
    bottom = expected(kind, field)
    if kind == "fsq":
        top = bottom if field == "fsq_levels" else dict(bottom, num_embeddings=4375, levels=(7, 5, 5, 5, 5))
    else:
        top = dict(bottom, num_embeddings=4096, codebook=(4096, bottom["codebook"][1]))
    assert [reading(q) for q in model.quantizers] == [top, bottom]
    assert model.options == options


# each option a run can set, as a flag value and as the option it gives
CONFIG_VALUES = dict(quantizer=("vq", "vq"), num_embeddings=(24, 24), embedding_dim=(6, 6), beta=(0.7, 0.7),
                     decay=(0.5, 0.5), kmeans_init=(False, False), restart_threshold=(2.5, 2.5),
                     cosine=(False, False), lookup_dim=(3, 3), rotation_trick=(True, True),
                     fsq_levels=("3,4", (3, 4)))


@pytest.mark.parametrize("levels", [1, 2])
def test_a_config_gives_every_option_but_eps_to_the_model_it_builds(levels):
    assert {*CONFIG_VALUES, "eps"} == {f.name for f in fields(QuantizerOptions)}
    assert quantizer_options(Config()) == QuantizerOptions()     # the options' defaults are a run's
    for name, (flag, option) in CONFIG_VALUES.items():
        config = Config(levels=levels, **SMALL, **{name: flag})
        options = quantizer_options(config)
        assert options == replace(QuantizerOptions(), **{name: option}), name
        assert build_model(config).options == options, name


def test_the_model_fields_are_the_constructors_and_the_options_a_config_holds():
    config = {f.name for f in fields(Config)}
    assert set(MODEL_FIELDS) <= config and len(set(MODEL_FIELDS)) == len(MODEL_FIELDS)
    assert set(MODEL_FIELDS) == {"levels", "hidden_channels", "residual_channels", "num_residual_blocks", "block",
                                 "attention", "downsample", "top_residual_blocks", "top_num_embeddings",
                                 *CONFIG_VALUES}
