"""Configs: strict YAML/dict parsing, clear errors for bad keys and values (hypothesis), valid configs build."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqtok import Autoencoder, AutoencoderConfig, ConfigError, GaussianConfig, VQConfig, load_yaml
from vqtok.config import from_dict, save_yaml, to_dict


def test_yaml_roundtrip(tmp_path):
    config = AutoencoderConfig(bottleneck=GaussianConfig(dim=8, beta=0.5), channel_mult=(1, 2), attn_resolutions=(16,))
    save_yaml(config, tmp_path / "c.yaml")
    assert load_yaml(tmp_path / "c.yaml", AutoencoderConfig) == config


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("bottleneck:\n  kind: vq\n  codebook_sise: 512\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'bottleneck\.codebook_sise'"):
        load_yaml(path, AutoencoderConfig)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"base_channels": "wide"}, "'base_channels' must be an integer"),
        ({"base_channels": True}, "'base_channels' must be an integer"),
        ({"channel_mult": 4}, "'channel_mult' must be a list"),
        ({"input_range": "0,255"}, "'input_range' must be one of"),
        ({"bottleneck": {"kind": "fsq"}}, "bottleneck'.kind must be one of"),
        ({"bottleneck": {"dim": 4}}, "must be a mapping with a 'kind' key"),
        ({"bottleneck": {"kind": "vq", "decay": 1.5}}, "bottleneck.decay must be in"),
        ({"bottleneck": {"kind": "vq", "codebook_weight": 1.0}}, "codebook_weight is set but ema is true"),
        ({"bottleneck": {"kind": "vq", "ema": False}}, "set codebook_weight"),
        ({"resolution": 30, "channel_mult": [1, 2, 2]}, "multiple of the downsampling factor 4"),
        ({"attn_resolutions": [7]}, "not feature sizes"),
        ({"base_channels": 48, "norm_groups": 32}, "must divide every block width"),
    ],
)
def test_bad_values_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(AutoencoderConfig, data, source="test.yaml")


def test_malformed_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("bottleneck: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_yaml(path, AutoencoderConfig)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml", AutoencoderConfig)


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5), st.lists(st.integers(-3, 3), max_size=3),
)
vq_keys = st.sampled_from([f for f in VQConfig.__dataclass_fields__ if f != "kind"])
top_keys = st.sampled_from([f for f in AutoencoderConfig.__dataclass_fields__ if f != "bottleneck"])


@settings(max_examples=300, deadline=None)
@given(key=top_keys, value=scalars, vq_key=vq_keys, vq_value=scalars, nested=st.booleans())
def test_arbitrary_values_either_parse_or_raise_config_error(key, value, vq_key, vq_value, nested):
    """Whatever a user writes, the result is a valid config or a ConfigError - never another exception."""
    data = {"bottleneck": {"kind": "vq", vq_key: vq_value}} if nested else {key: value}
    try:
        config = from_dict(AutoencoderConfig, data)
    except ConfigError:
        return
    assert from_dict(AutoencoderConfig, to_dict(config)) == config  # what parses, round-trips


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    levels=st.integers(1, 3),
    blocks=st.integers(1, 2),
    width=st.sampled_from([8, 16]),
    gaussian=st.booleans(),
    dim=st.integers(1, 6),
    side=st.integers(1, 3),
)
def test_valid_configs_build_and_keep_their_shapes(levels, blocks, width, gaussian, dim, side):
    bottleneck = GaussianConfig(dim=dim) if gaussian else VQConfig(codebook_size=16, dim=dim, kmeans_init=False)
    config = AutoencoderConfig(
        bottleneck=bottleneck, base_channels=width, channel_mult=(1,) * levels, num_res_blocks=blocks,
        latent_channels=4, norm_groups=4, resolution=2 ** (levels - 1) * 2,
    )
    f = config.downsampling_factor
    x = torch.rand(1, 3, f * side, f * (side + 1)) * 2 - 1
    model = Autoencoder(config).eval()
    rep = model.encode(x)
    latent = rep.mode() if gaussian else rep
    assert latent.shape[-2:] == (side, side + 1)
    assert model.decode(latent).shape == x.shape
    assert math.isfinite(model(x).loss.item())


def test_every_shipped_config_parses():
    from pathlib import Path

    from vqtok.config import PriorTrainConfig, TrainConfig

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert any(p.name.endswith("_prior.yaml") for p in configs) and configs
    for path in configs:
        load_yaml(path, PriorTrainConfig if path.name.endswith("_prior.yaml") else TrainConfig)


def test_quickstart_yaml_mirrors_the_quickstart():
    from pathlib import Path

    from vqtok.config import TrainConfig
    from vqtok.train.quickstart import quickstart_config

    path = Path(__file__).resolve().parents[1] / "configs" / "digits_vq.yaml"
    assert to_dict(load_yaml(path, TrainConfig)) == to_dict(quickstart_config("runs/digits_vq"))


def test_quickstart_prior_yaml_mirrors_the_quickstart():
    from pathlib import Path

    from vqtok.config import PriorTrainConfig
    from vqtok.train.quickstart import quickstart_prior_config

    path = Path(__file__).resolve().parents[1] / "configs" / "digits_prior.yaml"
    assert to_dict(load_yaml(path, PriorTrainConfig)) == to_dict(quickstart_prior_config("runs/quickstart"))


train_keys = st.sampled_from([f for f in __import__("vqtok.config").config.TrainConfig.__dataclass_fields__
                              if f not in ("model", "data")])
data_keys = st.sampled_from(list(__import__("vqtok.config").config.DataConfig.__dataclass_fields__))


@settings(max_examples=300, deadline=None)
@given(key=train_keys, value=scalars, data_key=data_keys, data_value=scalars, nested=st.booleans())
def test_arbitrary_training_values_either_parse_or_raise_config_error(key, value, data_key, data_value, nested):
    from vqtok.config import TrainConfig

    data = {"data": {data_key: data_value}} if nested else {key: value}
    try:
        config = from_dict(TrainConfig, data)
    except ConfigError:
        return
    assert from_dict(TrainConfig, to_dict(config)) == config


def test_python_built_configs_and_odd_keys():
    config = AutoencoderConfig(channel_mult=[1, 2], attn_resolutions=[16])
    assert config.channel_mult == (1, 2) and hash(config) == hash(from_dict(AutoencoderConfig, to_dict(config)))
    with pytest.raises(ConfigError, match="keys must be strings"):
        from_dict(AutoencoderConfig, {1: 2, "zz": 3})


def test_gaussian_bottleneck_needs_a_likelihood_in_nats():
    from vqtok.config import TrainConfig

    with pytest.raises(ConfigError, match="would scale beta by the number of pixels"):
        TrainConfig(model=AutoencoderConfig(bottleneck=GaussianConfig()), loss="mse")
    TrainConfig(model=AutoencoderConfig(bottleneck=GaussianConfig()), loss="gaussian")
