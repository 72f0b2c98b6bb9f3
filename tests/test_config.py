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
        ({"bottleneck": {"kind": "pq"}}, "bottleneck'.kind must be one of"),
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


# ---- size guards: exact element counts, checked before anything is allocated ---------------------------------------


def _elements(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mult=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    blocks=st.integers(1, 3),
    width=st.sampled_from([4, 8]),
    attn=st.booleans(),
    mid_attention=st.booleans(),
    bottleneck=st.sampled_from(["gaussian", "ema", "trained"]),
    output=st.sampled_from(["image", "bernoulli_logits", "logistic_mixture"]),
    channels=st.integers(1, 3),
    num_classes=st.sampled_from([0, 3]),
)
def test_an_autoencoders_element_count_is_exact(mult, blocks, width, attn, mid_attention, bottleneck, output,
                                                channels, num_classes):
    """`num_elements` (from the config alone) equals the parameters and buffers of the built model."""
    dims = {"gaussian": GaussianConfig(dim=3), "ema": VQConfig(codebook_size=5, dim=3),
            "trained": VQConfig(codebook_size=5, dim=3, ema=False, codebook_weight=1.0)}
    resolution = 2 ** (len(mult) - 1) * 4
    config = AutoencoderConfig(
        bottleneck=dims[bottleneck], in_channels=channels, resolution=resolution, base_channels=width,
        channel_mult=tuple(mult), num_res_blocks=blocks,
        attn_resolutions=(resolution // 2 ** (len(mult) - 1),) if attn else (),
        mid_attention=mid_attention, latent_channels=5, norm_groups=2, decoder_output=output,
        input_range="0,1" if output == "bernoulli_logits" else "-1,1",
        num_mixtures=2 if output == "logistic_mixture" else None, num_classes=num_classes,
    )
    assert config.num_elements == _elements(Autoencoder(config))


@pytest.mark.parametrize("positions, num_classes, mlp_ratio", [("learned", 3, 4), ("rotary", 0, 2)])
def test_a_priors_and_a_discriminators_element_counts_are_exact(positions, num_classes, mlp_ratio):
    from vqtok.config import DiscriminatorConfig, PriorConfig
    from vqtok.models import TransformerPrior
    from vqtok.models.discriminator import PatchDiscriminator

    config = PriorConfig(vocab_size=11, grid=(3, 5), num_classes=num_classes, n_layer=3, n_head=4, n_embd=16,
                         mlp_ratio=mlp_ratio, positions=positions)
    assert config.num_elements == _elements(TransformerPrior(config))
    for layers in range(1, 7):
        config = DiscriminatorConfig(in_channels=2, channels=3, layers=layers)
        assert config.num_elements == _elements(PatchDiscriminator(config)), layers


def test_the_size_limit_is_the_element_count(monkeypatch):
    """A model of exactly MAX_MODEL_ELEMENTS elements is accepted, one more is refused, naming the sizing keys."""
    import vqtok.config

    config = AutoencoderConfig(bottleneck=VQConfig(codebook_size=8, dim=4), base_channels=8, norm_groups=8,
                               channel_mult=(1, 2), resolution=8)
    monkeypatch.setattr(vqtok.config, "MAX_MODEL_ELEMENTS", config.num_elements)
    assert from_dict(AutoencoderConfig, to_dict(config)) == config
    monkeypatch.setattr(vqtok.config, "MAX_MODEL_ELEMENTS", config.num_elements - 1)
    with pytest.raises(ConfigError, match=r"c.yaml: base_channels 8 with channel_mult \[1, 2\], num_res_blocks 2 and "
                                          rf"latent_channels 64 give a model of {config.num_elements:,} parameters"):
        from_dict(AutoencoderConfig, to_dict(config), source="c.yaml")


@pytest.mark.parametrize("data, match", [
    ({"base_channels": 100_000}, r"'?base_channels 100000 .* more than vqtok's limit of 2,147,483,648"),
    ({"bottleneck": {"kind": "vq", "codebook_size": 10**9}}, r"bottleneck.codebook_size 1000000000 with dim 64 give a "
                                                            r"codebook of 130,000,000,006 parameters"),
    ({"bottleneck": {"kind": "vq", "codebook_size": 10**9, "dim": 1}}, "give a codebook of 4,000,000,006 parameters"),
    ({"num_res_blocks": 10**12}, "limit"),
])
def test_absurd_sizes_are_refused_by_the_config(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(AutoencoderConfig, data, source="c.yaml")


def test_absurd_prior_and_discriminator_sizes_are_refused():
    from vqtok.config import DiscriminatorConfig, PriorConfig

    with pytest.raises(ConfigError, match="prior.n_layer 8, n_embd 256, mlp_ratio 4, vocab_size 100000000"):
        from_dict(__import__("vqtok.config").config.PriorTrainConfig,
                  {"tokens": "t", "prior": {"vocab_size": 10**8, "grid": [16, 16], "num_classes": 0}}, source="p.yaml")
    PriorConfig(n_embd=10**6)  # unresolved: nothing to count yet
    with pytest.raises(ConfigError, match="channels 100000 with layers 3 give a discriminator"):
        DiscriminatorConfig(channels=100_000)
    with pytest.raises(ConfigError, match="limit"):
        DiscriminatorConfig(layers=10**9)


# ---- strict YAML ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n# and another\n", "---\n"])
def test_an_empty_or_comment_only_file_is_an_error(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"empty.yaml: holds no config keys .*write \{\} to take every default"):
        load_yaml(path, AutoencoderConfig)
    path.write_text("{}  # every default\n")
    assert load_yaml(path, AutoencoderConfig) == AutoencoderConfig()


@pytest.mark.parametrize("text, match", [
    ("base_channels: 64\nresolution: 16\nbase_channels: 32\n", r"key 'base_channels' is given twice \(lines 1 and 3\)"),
    ("bottleneck:\n  kind: vq\n  dim: 8\n  dim: 16\n", r"key 'dim' is given twice \(lines 3 and 4\)"),
    ("channel_mult: [1, 2]\nbottleneck: {kind: vq, kind: gaussian}\n", "key 'kind' is given twice"),
])
def test_a_duplicate_key_is_an_error(tmp_path, text, match):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="dup.yaml: " + match):
        load_yaml(path, AutoencoderConfig)


def test_merged_keys_may_be_overridden_and_set_values_are_strict(tmp_path):
    from vqtok.config import apply_overrides

    path = tmp_path / "merge.yaml"
    path.write_text("bottleneck:\n  <<: {kind: vq, dim: 8, codebook_size: 64}\n  dim: 16\n")
    assert load_yaml(path, AutoencoderConfig).bottleneck == VQConfig(dim=16, codebook_size=64)
    with pytest.raises(ConfigError, match=r"--set 'bottleneck=\{kind: vq, dim: 1, dim: 2\}': key 'dim' is given twice"):
        apply_overrides({}, ["bottleneck={kind: vq, dim: 1, dim: 2}"])


def test_deeply_nested_data_is_a_config_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("bottleneck: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml: nested too deeply"):
        load_yaml(path, AutoencoderConfig)
    deep: list = []
    for _ in range(5_000):
        deep = [deep]
    with pytest.raises(ConfigError, match=r"must be an integer, got \[\[\[\[\.\.\.\]\]\]\]"):
        from_dict(AutoencoderConfig, {"base_channels": deep})


# ---- YAML 1.2 numbers and booleans ----------------------------------------------------------------------------------


def test_numbers_with_an_exponent_are_floats_in_files_and_in_set(tmp_path):
    from vqtok.config import TrainConfig

    path = tmp_path / "lr.yaml"
    path.write_text("lr: 1e-4\nweight_decay: 5E-2\nmodel:\n  bottleneck: {kind: vq, eps: .5e-5}\n")
    config = load_yaml(path, TrainConfig)
    assert (config.lr, config.weight_decay, config.model.bottleneck.eps) == (1e-4, 5e-2, 5e-6)
    assert type(config.lr) is float
    assert load_yaml(path, TrainConfig, ["lr=3e-4", "min_lr_ratio=1E-1"]).lr == 3e-4
    assert load_yaml(path, TrainConfig, ["model.bottleneck.beta=+2.5e+1"]).model.bottleneck.beta == 25.0
    assert load_yaml(path, TrainConfig, ["max_steps=10", "seed=0x10"]).seed == 16  # integers stay integers
    with pytest.raises(ConfigError, match=r"'max_steps' must be an integer, got 10000\.0"):
        load_yaml(path, TrainConfig, ["max_steps=1e4"])


def test_yes_no_on_off_are_text_and_a_true_false_field_says_so(tmp_path):
    from vqtok.config import TrainConfig

    path = tmp_path / "mp.yaml"
    path.write_text("mixed_precision: no\nhflip: true\n")
    config = load_yaml(path, TrainConfig)
    assert config.mixed_precision == "no" and config.hflip is True
    assert load_yaml(path, TrainConfig, ["mixed_precision=bf16"]).mixed_precision == "bf16"
    assert load_yaml(path, TrainConfig, ["mixed_precision=no", "hflip=False"]).mixed_precision == "no"
    for override in ("hflip=no", "hflip=off", "hflip=Yes", "hflip=ON"):
        with pytest.raises(ConfigError, match=r"'hflip' must be true or false, got '\w+': vqtok reads YAML 1\.2, "
                                              r"where yes/no/on/off are text; write true or false"):
            load_yaml(path, TrainConfig, [override])
    path.write_text("mixed_precision: no\nhflip: no\n")
    with pytest.raises(ConfigError, match=r"mp\.yaml: 'hflip' must be true or false, got 'no'"):
        load_yaml(path, TrainConfig)


def test_text_that_looks_like_a_number_or_boolean_round_trips(tmp_path):
    import yaml

    from vqtok.config import DataConfig

    config = DataConfig(source="torchvision", name="1e-4", path="no")
    save_yaml(config, tmp_path / "d.yaml")
    assert load_yaml(tmp_path / "d.yaml", DataConfig) == config
    assert yaml.safe_load((tmp_path / "d.yaml").read_text())["path"] == "no"  # any YAML 1.1 reader agrees
    assert yaml.safe_load((tmp_path / "d.yaml").read_text())["name"] == "1e-4"


def test_mixed_precision_is_unset_by_default():
    from vqtok.config import PriorTrainConfig, TrainConfig

    assert TrainConfig().mixed_precision is None
    assert PriorTrainConfig(tokens="t").mixed_precision is None
    assert from_dict(TrainConfig, {"mixed_precision": None}).mixed_precision is None
