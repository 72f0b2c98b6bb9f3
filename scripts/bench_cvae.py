"""Class-conditional generation of a conditional VAE (CVAE) on MNIST, judged by a classifier.

A small CNN trained on MNIST's training split (scripts/mnist_classifier.py) classifies images the CVAE decodes from
its prior N(0, I) with each label in turn; the benchmark reports how often a sample is the digit that was asked for,
per class and overall, beside the classifier's accuracy on the MNIST test images and on the CVAE's reconstructions of
them (with their true labels: what decoded images can at best reach). It writes the class-conditional grid (one row
per class) and, for comparison, the classes the classifier sees in samples decoded with the null label (the
unconditional pass trained by class_dropout).

    python scripts/bench_cvae.py --model runs/mnist_cvae/tokenizer --mnist ../shared/datasets/mnist \
        --grid docs/cvae_mnist_classes.png --cache /tmp/mnist_classifier.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from mnist_classifier import accuracy, cached_classifier, mnist_test, predict  # scripts/, beside this file

import vqtok
from vqtok.train.evaluate import save_image_grid


@torch.no_grad()
def reconstructions(model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """uint8 reconstructions (posterior means) of uint8 images with their labels."""
    out = []
    for x, y in zip(images.split(500), labels.split(500)):
        out.append(model.postprocess(model.decode(model.encode(model.preprocess(x), labels=y).mode(), labels=y)))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a class-conditional Gaussian tokenizer (num_classes 10)")
    parser.add_argument("--mnist", default="../shared/datasets/mnist")
    parser.add_argument("--epochs", type=int, default=2, help="classifier training epochs")
    parser.add_argument("--cache", default=None, help="keep the trained classifier's weights in this file")
    parser.add_argument("--per-class", type=int, default=100, help="samples per class")
    parser.add_argument("--temperature", type=float, default=1.0, help="prior temperature: z ~ N(0, t^2 I)")
    parser.add_argument("--grid", default=None, help="write the class-conditional grid (10 rows of 10) here")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    mnist = Path(args.mnist)
    model = vqtok.load(args.model).eval()
    if not model.is_conditional or model.config.num_classes != 10:
        raise SystemExit(f"{args.model}: not a 10-class conditional tokenizer")
    classifier, test_accuracy = cached_classifier(mnist, args.epochs, args.cache)
    print(f"classifier: {test_accuracy * 100:.2f}% on the MNIST test images")
    test_x, test_y = mnist_test(mnist)
    recon_accuracy = accuracy(classifier, reconstructions(model, test_x[:2000], test_y[:2000]), test_y[:2000])
    print(f"classifier on the CVAE's reconstructions of 2,000 test images: {recon_accuracy * 100:.2f}%")
    results = {"classifier_test_accuracy": test_accuracy, "classifier_reconstruction_accuracy": recon_accuracy,
               "samples_per_class": args.per_class, "temperature": args.temperature, "per_class": {}}
    start, correct, rows = time.perf_counter(), 0, []
    for label in range(10):
        images = model.postprocess(model.sample(args.per_class, labels=label, temperature=args.temperature,
                                                seed=label))
        hits = int((predict(classifier, images) == label).sum())
        correct += hits
        results["per_class"][str(label)] = hits / args.per_class
        rows.append(images[:10])
        print(f"  class {label}: {hits / args.per_class * 100:6.2f}%")
    results["overall"] = correct / (10 * args.per_class)
    null = model.postprocess(model.sample(10 * args.per_class, temperature=args.temperature, seed=10))
    counts = torch.bincount(predict(classifier, null), minlength=10)
    results["null_label_class_fractions"] = (counts.float() / counts.sum()).tolist()
    results["sampling_s"] = time.perf_counter() - start
    print(f"overall: {results['overall'] * 100:.2f}% of {10 * args.per_class} samples classified as requested "
          f"(temperature {args.temperature})")
    print("null label: classes seen " + " ".join(f"{c}:{f * 100:.0f}%" for c, f in
                                                  enumerate(results["null_label_class_fractions"])))
    if args.grid:
        save_image_grid(torch.cat(rows), args.grid, nrow=10)
        print(f"class-conditional grid written to {args.grid}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
