"""Classify MNIST test images with a trained LeNet (the deploy net).

Loads ``lenet.prototxt`` (an Input layer instead of the data layers and a
Softmax "prob" top), copies the trained weights into it by layer name, runs
the test images through it in batches and prints the accuracy, the
per-class accuracy and a few predictions.  Run from the repository root
after training::

    netlite train --solver examples/mnist/lenet_quick_solver.prototxt --engine numba
    python examples/mnist/classify.py \
        --weights runs/mnist/lenet_quick_iter_2000.caffemodel

For Fashion-MNIST add ``--dataset fashion-mnist`` (and its weights).
"""

import argparse
import os
import sys
import time

import numpy as np

import netlite
from netlite.data import mnist

HERE = os.path.dirname(os.path.abspath(__file__))

#: Class names of Fashion-MNIST (MNIST's classes are the digits).
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def classify(net, images, batch_size=1000):
    """Class probabilities of ``images`` (N, 28, 28) uint8 -> (N, 10).

    The pixels are scaled by 1/256 as the training data were
    (``transform_param { scale: 0.00390625 }``).
    """
    probs = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        data = batch[:, None, :, :].astype(np.float32) * np.float32(0.00390625)
        out = net.forward(data=data)
        probs.append(np.array(netlite.backend.to_numpy(out["prob"])))
    return np.concatenate(probs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.path.join(HERE, "lenet.prototxt"),
                   help="deploy prototxt (default: lenet.prototxt here)")
    p.add_argument("--weights", required=True,
                   help="trained weights (.caffemodel or .npz)")
    p.add_argument("--dataset", default="mnist",
                   choices=("mnist", "fashion-mnist"))
    p.add_argument("--count", type=int, default=None,
                   help="classify only the first COUNT test images")
    p.add_argument("--show", type=int, default=10,
                   help="print this many predictions (default 10)")
    p.add_argument("--engine", choices=("numpy", "numba"), default=None)
    p.add_argument("--data", default=None, help="directory searched first for data")
    args = p.parse_args(argv)

    if args.engine:
        netlite.set_cpu_engine(args.engine)
    images, labels = mnist.load_mnist(args.dataset, "test", data_dir=args.data)
    if args.count is not None:
        images, labels = images[:args.count], labels[:args.count]
    net = netlite.Net(args.model, netlite.TEST, weights=args.weights)

    classify(net, images[:1])  # compile the kernels outside the timing
    start = time.perf_counter()
    probs = classify(net, images)
    seconds = time.perf_counter() - start
    predicted = probs.argmax(axis=1)
    correct = predicted == labels
    names = FASHION_CLASSES if args.dataset == "fashion-mnist" else tuple(
        str(d) for d in range(10))

    for i in range(min(args.show, len(labels))):
        mark = "ok" if correct[i] else "WRONG"
        print(f"image {i:5d}: predicted {names[predicted[i]]:<12} "
              f"(p = {probs[i, predicted[i]]:.3f}), true {names[labels[i]]:<12} "
              f"{mark}")
    print("per-class accuracy:")
    for c, name in enumerate(names):
        mask = labels == c
        if mask.any():
            print(f"  {name:<12} {correct[mask].mean():.4f}  ({mask.sum()} images)")
    print(f"Accuracy: {correct.mean():.4f} ({correct.sum()}/{len(labels)}) on "
          f"{args.dataset} test, {len(labels) / seconds:,.0f} images/s "
          f"({netlite.cpu_engine()} engine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
