"""Class-conditional autoencoders (CVAEs; `AutoencoderConfig.num_classes`): the label reaches the encoder and the
decoder, the null label is exactly the unconditional network, save/load, old checkpoints, label errors, training with
class dropout (one batch = micro-batches, exact resume), evaluation, the token store and per-class sampling."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vqtok
from tests.conftest import tiny_config
from tests.scripts.common import tiny_train_config
from vqtok import Autoencoder
from vqtok.cli import main
from vqtok.config import ConfigError, DataConfig, GaussianConfig, PreprocessConfig, PriorConfig, TrainConfig, VQConfig
from vqtok.data import TokenDataset, build_dataset, encode_dataset
from vqtok.images import uint8_to_range
from vqtok.metrics import psnr_from_mse
from vqtok.models import TransformerPrior
from vqtok.models.prior import decode_labels, tokenizer_ref
from vqtok.seeds import keyed_seed
from vqtok.train import loop, train
from vqtok.train.evaluate import evaluate, iwae_bound, save_image_grid
from vqtok.train.user_data import UserImages

GAUSSIAN = GaussianConfig(dim=2)
VQ = VQConfig(codebook_size=16, dim=4, kmeans_init=False)


def cvae_config(bottleneck=GAUSSIAN, num_classes: int = 3, **overrides) -> vqtok.AutoencoderConfig:
    """A tiny grey 16x16 autoencoder (f = 2, no attention) with `num_classes` classes."""
    settings = dict(in_channels=1, base_channels=8, norm_groups=4, attn_resolutions=(), mid_attention=False,
                    num_classes=num_classes, preprocess=PreprocessConfig(resize=16))
    settings.update(overrides)
    return tiny_config(bottleneck, **settings)


def cvae(bottleneck=GAUSSIAN, num_classes: int = 3, seed: int = 0, **overrides) -> Autoencoder:
    torch.manual_seed(seed)
    return Autoencoder(cvae_config(bottleneck, num_classes, **overrides)).eval()


def images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def cvae_train_config(output_dir, **overrides) -> TrainConfig:
    """A few steps of a tiny CVAE on the digits (labels 0-9), Gaussian likelihood, no attention (so no weight whose
    true gradient is zero: runs that should agree are compared on every weight)."""
    settings = dict(model=cvae_config(num_classes=10), loss="gaussian", max_steps=4, eval_every=4, checkpoint_every=4,
                    eval_images=16)
    settings.update(overrides)
    return tiny_train_config(str(output_dir), **settings)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# ---- the model --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bottleneck", [GAUSSIAN, VQ], ids=["gaussian", "vq"])
def test_changing_only_the_label_changes_the_decoded_image(bottleneck):
    model, x = cvae(bottleneck), images()
    with torch.no_grad():
        encoded = model.encode(x, labels=0, return_dict=True)
        z = encoded.posterior.mode() if model.is_gaussian else encoded.codes
        zero, again, one = model.decode(z, labels=0), model.decode(z, labels=0), model.decode(z, labels=[1, 1, 1, 1])
        assert torch.equal(zero, again)
        assert (zero - one).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every image changes with its label alone
        # the encoder's features change with the label too (the same image, another label)
        assert not torch.allclose(encoded.latents, model.encode(x, labels=1, return_dict=True).latents)


def test_the_label_reaches_both_networks():
    """The gradient of each embedding row is the sum, over the images of that label and over positions, of the loss's
    gradient at the conv_in output it is added to (read by hooks); the unused class and the null label get none."""
    model = cvae(num_classes=3).train()
    grads = {}

    def keep(name):
        def hook(module, inputs, output):
            output.register_hook(lambda g: grads.__setitem__(name, g))
        return hook

    model.encoder.conv_in.register_forward_hook(keep("encoder"))
    model.decoder.conv_in.register_forward_hook(keep("decoder"))
    labels = torch.tensor([0, 1, 0, 3])  # classes 0 and 1 and the null label (3); class 2 unused
    out = model(images(), labels=labels, generator=torch.Generator().manual_seed(0))
    (out.reconstruction.pow(2).sum() + out.loss).backward()
    for name in ("encoder", "decoder"):
        grad = getattr(model, name).label_embedding.table.weight.grad
        per_image = grads[name].sum(dim=(2, 3))
        expected = torch.stack([per_image[labels == c].sum(0) for c in range(4)])
        expected[3] = 0  # the null row: no gradient
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
        assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0, name
        assert not grad[2].any() and not grad[3].any(), name


@pytest.mark.parametrize("bottleneck", [GAUSSIAN, VQ], ids=["gaussian", "vq"])
def test_the_null_label_is_exactly_the_unconditional_network(bottleneck):
    """A CVAE's weights but its label embeddings, copied into an unconditional autoencoder (strictly: no other tensor
    differs), give bit for bit what the CVAE gives with the null label, and labels=None is the null label."""
    mixture = dict(decoder_output="logistic_mixture", num_mixtures=1) if bottleneck is GAUSSIAN else {}
    model = cvae(bottleneck, **mixture)
    plain = Autoencoder(replace(model.config, num_classes=0)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "label_embedding" not in k})
    x = images()
    with torch.no_grad():
        reference = plain(x).reconstruction
        gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731  (a Gaussian's latents are a posterior sample)
        encoded = plain.encode(x, return_dict=True, generator=gen())
        z = encoded.posterior.mode() if plain.is_gaussian else encoded.codes
        for labels in (None, model.null_class, torch.full((4,), model.null_class)):
            assert torch.equal(model(x, labels=labels).reconstruction, reference)
            assert torch.equal(model.encode(x, labels=labels, return_dict=True, generator=gen()).latents,
                               encoded.latents)
            assert torch.equal(model.decode(z, labels=labels), plain.decode(z))
            if model.is_gaussian:
                assert torch.equal(model.sample(4, labels=labels, seed=5), plain.sample(4, seed=5))
                for key, value in model.code_length(x, gen(), labels=labels).items():
                    assert torch.equal(value, plain.code_length(x, gen())[key]), key
                assert torch.equal(model.log_weights(x, 3, gen(), labels=labels), plain.log_weights(x, 3, gen()))
        # and a class's label is not the null label
        assert not torch.equal(model(x, labels=0).reconstruction, reference)


def test_an_unconditional_model_has_no_label_tensors():
    model = Autoencoder(replace(cvae_config(), num_classes=0))
    assert not any("label" in name for name in model.state_dict())
    assert not model.is_conditional and model.null_class == 0
    assert model.config.num_elements == sum(t.numel() for t in model.state_dict().values())


@pytest.mark.parametrize("labels, match", [
    (1.0, "labels must be integers, got torch.float32"),
    (torch.tensor([0.0, 1.0, 2.0, 0.0]), "labels must be integers, got torch.float32"),
    (torch.tensor([True, False, True, False]), "labels must be integers, got torch.bool"),
    ([0, 1, 2], r"labels must be one integer or 4 \(one per image\), got shape \[3\]"),
    (torch.zeros(4, 1, dtype=torch.long), r"got shape \[4, 1\]"),
    ([0, 1, 4, 0], r"labels must be in \[0, 3\] \(3 classes; 3 is the null label\), got values in \[0, 4\]"),
    (-1, r"got values in \[-1, -1\]"),
    ("a", "labels must be integers"),
])
def test_bad_labels_are_refused_with_one_line(labels, match):
    model = cvae()
    for call in (lambda: model(images(), labels=labels), lambda: model.encode(images(), labels=labels),
                 lambda: model.decode(torch.zeros(4, 2, 8, 8), labels=labels)):
        with pytest.raises(ValueError, match=match) as error:
            call()
        assert "\n" not in str(error.value)


def test_labels_given_to_an_unconditional_model_are_refused():
    model = Autoencoder(replace(cvae_config(), num_classes=0)).eval()
    for call in (lambda: model(images(), labels=0), lambda: model.encode(images(), labels=[0, 1, 0, 1]),
                 lambda: model.decode(torch.zeros(4, 2, 8, 8), labels=0), lambda: model.sample(2, labels=0)):
        with pytest.raises(ValueError, match=r"labels given to an unconditional model \(num_classes 0\)"):
            call()
    with pytest.raises(ConfigError, match="num_classes must be >= 0"):
        cvae_config(num_classes=-1)


@pytest.mark.parametrize("bottleneck", [GAUSSIAN, VQ], ids=["gaussian", "vq"])
def test_save_and_load_are_exact(bottleneck, tmp_path):
    model = cvae(bottleneck)
    model.save_pretrained(tmp_path / "cvae")
    assert json.loads((tmp_path / "cvae" / "config.json").read_text())["num_classes"] == 3
    loaded = vqtok.load(tmp_path / "cvae").eval()
    assert loaded.config == model.config and loaded.is_conditional and loaded.null_class == 3
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        assert torch.equal(loaded(images(), labels=labels).reconstruction, model(images(), labels=labels).reconstruction)
    card = (tmp_path / "cvae" / "README.md").read_text()
    assert "labels=y" in card and "class-conditional" in card and "null label" in card


def test_an_unconditional_checkpoint_from_before_num_classes_loads_unchanged(tmp_path):
    """config.json written before num_classes existed (the key absent) loads as num_classes 0: the same config,
    weights (hash) and outputs."""
    model = Autoencoder(replace(cvae_config(), num_classes=0)).eval()
    model.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    config = json.loads(path.read_text())
    del config["num_classes"]
    path.write_text(json.dumps(config))
    loaded = vqtok.load(tmp_path / "old").eval()
    assert loaded.config == model.config and loaded.config.num_classes == 0 and not loaded.is_conditional
    assert vqtok.hub.weights_sha256(loaded) == vqtok.hub.weights_sha256(model)
    with torch.no_grad():
        assert torch.equal(loaded(images()).reconstruction, model(images()).reconstruction)


# ---- training ---------------------------------------------------------------------------------------------------


def test_a_cvae_trains_on_the_digits_labels_with_class_dropout(tmp_path):
    config = cvae_train_config(tmp_path / "run", class_dropout=0.3, max_steps=3, eval_every=3, checkpoint_every=3)
    folder = train(config)
    model = vqtok.load(folder)
    assert model.is_conditional and model.config.num_classes == 10
    # the class-conditional grid: 10 rows (one per digit) of 8 samples; 16x16 tiles enlarged to 64, 2 pixels apart
    grid = Image.open(tmp_path / "run" / "samples" / "prior_step_000003.png")
    assert grid.size == (8 * 66 + 2, 10 * 66 + 2)
    assert "labels=y" in (folder / "README.md").read_text()
    assert {"psnr", "kl_nats_per_image"} <= set(json.loads((tmp_path / "run" / "final_metrics.json").read_text()))


def test_class_dropout_is_the_same_for_one_batch_two_micro_batches_and_a_resumed_run(tmp_path):
    """The coins are keyed by (seed, step, image): two micro-batches of 8 give the weights one batch of 16 gives, a
    run stopped and resumed gives the same losses bit for bit, and the coins do drop labels (without them the weights
    differ)."""
    whole = train(cvae_train_config(tmp_path / "whole", class_dropout=0.5))
    micro = train(cvae_train_config(tmp_path / "micro", class_dropout=0.5, grad_accum=2))
    weights, accumulated = load_file(whole / "model.safetensors"), load_file(micro / "model.safetensors")
    # (float32 rounding differs with the batch: AdamW magnifies it in weights of tiny gradient, to about 1e-5)
    assert max_difference(weights, accumulated) < 5e-5
    embeddings = lambda w: {k: v for k, v in w.items() if "label_embedding" in k}  # noqa: E731
    assert max_difference(embeddings(weights), embeddings(accumulated)) < 1e-6
    split = cvae_train_config(tmp_path / "split", class_dropout=0.5)
    assert train(split, stop_at=2) is None
    resumed = train(split, resume=True)
    losses = lambda run: [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text(  # noqa: E731
        ).splitlines()) if r["split"] == "train"]
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert max_difference(weights, load_file(resumed / "model.safetensors")) == 0
    kept = train(cvae_train_config(tmp_path / "kept", class_dropout=0.0))
    assert max_difference(embeddings(weights), embeddings(load_file(kept / "model.safetensors"))) > 1e-3


def test_the_class_dropout_coin_is_keyed_and_has_its_probability():
    coins = [loop._label_dropped(0, 5, i, 0.3) for i in range(4000)]
    assert coins == [loop._label_dropped(0, 5, i, 0.3) for i in range(4000)]
    assert abs(np.mean(coins) - 0.3) < 5 * np.sqrt(0.3 * 0.7 / 4000)
    assert coins != [loop._label_dropped(0, 6, i, 0.3) for i in range(4000)]  # another step, other coins
    flips = [bool(loop._coin(0, 5, i)) for i in range(4000)]
    assert np.corrcoef(coins, flips)[0, 1] < 0.1  # not the flips' stream


def test_conditional_configs_without_labels_are_refused():
    cond = cvae_config(num_classes=10)
    with pytest.raises(ConfigError, match=r"data gives no labels: set data.labels to the IDX labels file"):
        tiny_train_config("unused", model=cond, loss="gaussian", data=DataConfig(source="idx", path="x.gz"))
    with pytest.raises(ConfigError, match=r"eval_data.source 'amat' .* has no labels"):
        tiny_train_config("unused", model=cond, loss="gaussian", eval_data=DataConfig(source="amat", path="x.amat"))
    with pytest.raises(ConfigError, match=r"class_dropout \(0.1\) drops labels, but the model is unconditional"):
        tiny_train_config("unused", model=replace(cond, num_classes=0), loss="gaussian", class_dropout=0.1)
    with pytest.raises(ConfigError, match=r"class_dropout must be in \[0, 1\), got 1.0"):
        tiny_train_config("unused", model=cond, loss="gaussian", class_dropout=1.0)


def test_data_without_labels_or_beyond_num_classes_fail_at_the_start(tmp_path):
    with pytest.raises(ValueError, match=r"^data: digits image \d+ has label 9 \(like \d+ other images\), but the "
                                         r"model's num_classes is 5 \(labels 0 to 4\): set model.num_classes to at "
                                         r"least 10$"):
        train(cvae_train_config(tmp_path / "few", model=cvae_config(num_classes=5)))
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    with pytest.raises(ValueError, match=r"0.png has no class label \(like 2 other images\), but a class-conditional "
                                         r"model \(num_classes 10\) needs one for every image: use labelled data"):
        train(cvae_train_config(tmp_path / "flat_run", data=DataConfig(source="folder", path=str(folder))))
    assert not (tmp_path / "flat_run" / "checkpoints").exists()


def test_a_users_dataset_gives_labels_to_a_conditional_model(tmp_path):
    pictures = [torch.full((1, 16, 16), 10 * i, dtype=torch.uint8) for i in range(4)]
    labelled = UserImages([(p, np.int64(i % 3)) for i, p in enumerate(pictures)], channels=1, size=16, labels=True)
    assert [labelled[i][1] for i in range(4)] == [0, 1, 2, 0] and torch.equal(labelled[3][0], pictures[3])
    assert UserImages(pictures, channels=1, size=16)[2][1] == -1  # an unconditional model needs none
    with pytest.raises(TypeError, match=r"dataset item 0: a class-conditional model trains on \(image, label\) items, "
                                        r"got an image alone"):
        UserImages(pictures, channels=1, size=16, labels=True)
    with pytest.raises(TypeError, match=r"dataset item 0: the label must be an integer \(a class index\), got float"):
        UserImages([(p, 1.0) for p in pictures], channels=1, size=16, labels=True)
    config = cvae_train_config(tmp_path / "run", data=DataConfig())
    with pytest.raises(ValueError, match=r"data: item \d+ has no class label, but a class-conditional model"):
        train(config, dataset=[(p, -1) for p in pictures * 8])


def test_evaluate_uses_each_images_label(tmp_path):
    """evaluate's PSNR of a CVAE is that of the reconstructions given each image's label (computed here by hand), and
    the IWAE bound splits the labels with the images; unlabelled data is refused."""
    model = cvae(num_classes=10, decoder_output="logistic_mixture", num_mixtures=1)
    dataset = build_dataset(DataConfig(limit=6), channels=1, preprocess=model.config.preprocess, size=16)
    pictures = torch.stack([dataset[i][0] for i in range(6)])
    labels = torch.tensor([dataset[i][1] for i in range(6)])
    x = uint8_to_range(pictures, model.config.value_range)
    with torch.no_grad():
        recon = model.postprocess(model.to_image(model(x, labels=labels).reconstruction)).double()
    expected = psnr_from_mse(((recon - pictures.double()) ** 2).mean().item(), 255.0)
    assert evaluate(model, dataset, batch_size=6)["psnr"] == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():
        split = iwae_bound(model, x, 3, torch.Generator().manual_seed(0), batch=4, labels=labels)
        gen = torch.Generator().manual_seed(0)
        parts = [model.log_weights(x[:4], 1, gen, labels=labels[:4]), model.log_weights(x[:4], 1, gen, labels=labels[:4]),
                 model.log_weights(x[:4], 1, gen, labels=labels[:4])]
        whole = -(torch.logsumexp(torch.cat(parts, 1).double(), 1) - np.log(3))
    torch.testing.assert_close(split[:4], whole)
    unlabelled = [(p, -1) for p in pictures]
    with pytest.raises(ValueError, match=r"evaluate: image 0 of the dataset has no class label"):
        evaluate(model, unlabelled)


# ---- token stores and sampling ----------------------------------------------------------------------------------


def test_a_conditional_tokenizers_store_holds_the_codes_given_each_images_label(tmp_path):
    tok = cvae(VQ, num_classes=10, preprocess=PreprocessConfig(resize=16, crop=None))
    tok.save_pretrained(tmp_path / "tok")
    store = encode_dataset(str(tmp_path / "tok"), DataConfig(limit=40), tmp_path / "store", batch_size=16,
                           shard_size=24, num_workers=0, progress=False)
    dataset = build_dataset(DataConfig(limit=40), channels=1, preprocess=tok.config.preprocess, size=None)
    x = uint8_to_range(torch.stack([dataset[i][0] for i in range(40)]), tok.config.value_range)
    labels = torch.tensor(dataset.labels)
    codes, stored_labels = TokenDataset(store).gather(range(40))
    with torch.no_grad():
        assert torch.equal(stored_labels, labels)
        assert torch.equal(codes, tok.encode(x, labels=labels))
        assert not torch.equal(codes, tok.encode(x))  # the labels were used
        expected = tok.postprocess(tok.decode(codes[:8], labels=labels[:8]))
    # vqtok decode decodes a store's codes with the store's labels
    assert main(["decode", str(store), "--out", str(tmp_path / "grid.png"), "--n", "8"]) == 0
    save_image_grid(expected, tmp_path / "expected.png")
    pixels = lambda name: np.asarray(Image.open(tmp_path / name))  # noqa: E731
    assert np.array_equal(pixels("grid.png"), pixels("expected.png"))
    with pytest.raises(ValueError, match=r"item 0 of the dataset has no class label"):
        encode_dataset(tok, [(dataset[i][0], -1) for i in range(4)], tmp_path / "unlabelled", num_workers=0,
                       progress=False)


def test_sample_model_draws_a_per_class_grid(tmp_path, capsys):
    """--class all with a CVAE of 3 classes and --n 6: 2 samples of each class in turn (batches of 4, batch j seeded
    by (--seed, j)), a grid of one row per class."""
    model = cvae(num_classes=3)
    model.save_pretrained(tmp_path / "cvae")
    out, pngs = tmp_path / "grid.png", tmp_path / "pngs"
    assert main(["sample", "--model", str(tmp_path / "cvae"), "--class", "all", "--n", "6", "--batch-size", "4",
                 "--seed", "2", "--device", "cpu", "--out", str(out), "--images-dir", str(pngs)]) == 0
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    expected = torch.cat([model.postprocess(model.sample(4, labels=labels[:4], seed=keyed_seed(2, 0))),
                          model.postprocess(model.sample(2, labels=labels[4:], seed=keyed_seed(2, 1)))])
    for i in range(6):
        assert np.array_equal(np.asarray(Image.open(pngs / f"{i:05d}.png")), expected[i, 0].numpy())
    save_image_grid(expected, tmp_path / "expected.png", nrow=2)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "expected.png")))
    assert main(["sample", "--model", str(tmp_path / "cvae"), "--class", "1", "--n", "3", "--seed", "2",
                 "--out", str(tmp_path / "ones.png"), "--images-dir", str(tmp_path / "ones")]) == 0
    ones = model.postprocess(model.sample(3, labels=1, seed=keyed_seed(2, 0)))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ones" / "00002.png")), ones[2, 0].numpy())
    capsys.readouterr()
    plain = tmp_path / "plain"
    Autoencoder(replace(cvae_config(), num_classes=0)).save_pretrained(plain)
    for argv, message in [
        (["--model", str(plain), "--class", "0"],
         f"--class: {plain} is unconditional (num_classes 0); leave --class out"),
        (["--model", str(tmp_path / "cvae"), "--class", "0,3"], f"--class 3: {tmp_path / 'cvae'} has 3 classes, 0 to 2"),
        (["--model", str(tmp_path / "cvae"), "--class", "all", "--n", "5"],
         "--n 5: --class gives 3 classes, one grid row each, so --n must be a multiple of 3"),
    ]:
        assert main(["sample", *argv, "--out", str(tmp_path / "refused.png")]) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"vqtok sample: error: {message}"
    assert not (tmp_path / "refused.png").exists()


def test_a_conditional_tokenizer_decodes_a_priors_samples_with_their_labels(tmp_path):
    """With a prior of as many classes, `vqtok sample --prior` decodes each sample with its class; a prior of another
    number of classes (or none) gets the null label."""
    tok = cvae(VQ, num_classes=3)
    tiny = dict(n_layer=1, n_head=2, n_embd=16)
    prior = TransformerPrior(PriorConfig(vocab_size=16, grid=(8, 8), num_classes=3, tokenizer=tokenizer_ref(tok), **tiny))
    prior.attach_tokenizer(tok)
    prior.eval().save_pretrained(tmp_path / "prior")
    assert main(["sample", "--prior", str(tmp_path / "prior"), "--class", "0,1,2", "--n", "3", "--device", "cpu",
                 "--seed", "4", "--out", str(tmp_path / "grid.png"), "--images-dir", str(tmp_path / "pngs")]) == 0
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        codes = prior.generate(3, labels=labels, seed=4, batch_size=64)
        expected = tok.postprocess(tok.decode(codes, labels=labels))
        null = tok.postprocess(tok.decode(codes))
    assert not torch.equal(expected, null)
    for i in range(3):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "pngs" / f"{i:05d}.png")), expected[i, 0].numpy())
    assert decode_labels(prior, tok, labels) == {"labels": labels}
    other = TransformerPrior(replace(prior.config, num_classes=2))
    assert decode_labels(other, tok, 1) == {"labels": None}
    assert decode_labels(prior, Autoencoder(replace(tok.config, num_classes=0)), labels) == {}


def test_the_other_uses_of_a_vae_take_a_cvaes_labels():
    """Anomaly scores given each image's label average to evaluate's negative ELBO (which reads the labels from the
    dataset), and an interpolation with a label starts and ends at the reconstructions given that label."""
    from vqtok.anomaly import score_images
    from vqtok.latents import interpolate

    model = cvae(num_classes=10, decoder_output="logistic_mixture", num_mixtures=1)
    dataset = build_dataset(DataConfig(limit=6), channels=1, preprocess=model.config.preprocess, size=16)
    labels = torch.tensor(dataset.labels)
    scores = score_images(model, dataset, labels=labels, batch_size=4)
    assert scores.scores["neg_elbo_nats"].mean() == pytest.approx(evaluate(model, dataset, batch_size=4)["neg_elbo_nats"],
                                                                  rel=1e-6)
    unconditional = score_images(model, dataset, batch_size=4).scores["neg_elbo_nats"]
    assert not np.allclose(unconditional, scores.scores["neg_elbo_nats"])
    x = uint8_to_range(torch.stack([dataset[i][0] for i in range(2)]), model.config.value_range)
    with torch.no_grad():
        path = interpolate(model, x[:1], x[1:], 3, labels=4)
        ends = model.decode(model.encode(x, labels=4).mode(), labels=4)
    torch.testing.assert_close(path[0, 0], ends[0])
    torch.testing.assert_close(path[0, -1], ends[1])


def test_the_command_line_uses_of_a_vae_take_a_cvaes_labels(tmp_path, capsys):
    """`vqtok score --dataset-labels` scores each image with its label, so its mean negative ELBO is `vqtok eval`'s
    (without it: the null label, another mean); `vqtok traverse --class` refuses a class the model does not have; the
    IWAE bound takes one label for every image however the images are chunked."""
    import csv

    model = cvae(num_classes=10, decoder_output="logistic_mixture", num_mixtures=1)
    model.save_pretrained(tmp_path / "cvae")
    dataset = build_dataset(DataConfig(limit=6), channels=1, preprocess=model.config.preprocess, size=16)
    expected = evaluate(model, dataset, batch_size=4)["neg_elbo_nats"]

    def mean_score(out, *flags):
        assert main(["score", str(tmp_path / "cvae"), "--data", "digits", "--split", "train", "--limit", "6",
                     "--batch-size", "4", "--out", str(out), *flags]) == 0
        with open(out) as f:
            return float(np.mean([float(row["neg_elbo_nats"]) for row in csv.DictReader(f)]))

    assert mean_score(tmp_path / "labelled.csv", "--dataset-labels") == pytest.approx(expected, rel=1e-6)
    assert mean_score(tmp_path / "null.csv") != pytest.approx(expected, rel=1e-6)
    Autoencoder(cvae_config(num_classes=0)).save_pretrained(tmp_path / "plain")
    assert main(["score", str(tmp_path / "plain"), "--data", "digits", "--limit", "2", "--dataset-labels",
                 "--out", str(tmp_path / "refused.csv")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("is not a class-conditional model")

    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "digit.png")
    assert main(["traverse", str(tmp_path / "cvae"), str(tmp_path / "digit.png"), "--class", "10",
                 "--out", str(tmp_path / "grid.png")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("--class 10: " + str(tmp_path / "cvae") +
                                                                     " has classes 0 to 9")
    assert not (tmp_path / "grid.png").exists()

    x = uint8_to_range(torch.stack([dataset[i][0] for i in range(3)]), model.config.value_range)
    with torch.no_grad():
        chunked = iwae_bound(model, x, 2, torch.Generator().manual_seed(0), batch=2, labels=torch.tensor(3))
        whole = iwae_bound(model, x, 2, torch.Generator().manual_seed(0), batch=2, labels=[3, 3, 3])
    torch.testing.assert_close(chunked, whole)
