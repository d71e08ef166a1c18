"""Noise of FD (greenprop CNN features) at a given sample count: FD of real images only.

For K draws of N real training images: FD to the test split (what `fd_floor` records, one
fixed draw), and FD between two disjoint real draws of N images each. Uses the run's cached
FD classifier; nothing is trained if it exists.
"""

import sys
from pathlib import Path

import numpy as np
import torch

from greenprop import data as gp_data
from greenprop.diffusion.frechet import frechet_distance
from greenprop.diffusion.scoring import classifier_features, load_or_train_classifier
from greenprop.train.config import TrainConfig

# usage: fd_floor.py FD_CACHE_ROOT SUBSET TEST_SUBSET N DRAWS
root = Path(sys.argv[1])
subset, test_subset, n, draws = (int(arg) for arg in sys.argv[2:6])
config = TrainConfig(
    model="ddpm-unet",
    dataset="fashion-mnist",
    subset=subset,
    test_subset=test_subset,
    device="cpu",
    progress=False,
)
data = gp_data.load("fashion-mnist", subset=subset, test_subset=test_subset)
classifier = load_or_train_classifier(config, root, data)
train = classifier_features(classifier, data.train.inputs)
test = classifier_features(classifier, data.test.inputs)
gen = torch.Generator().manual_seed(0)
to_test, disjoint = [], []
for _ in range(draws):
    order = torch.randperm(len(train), generator=gen).numpy()
    to_test.append(frechet_distance(train[order[:n]], test))
    disjoint.append(frechet_distance(train[order[:n]], train[order[n : 2 * n]]))
for name, values in (("N real train vs test split", to_test), ("N real vs N other real", disjoint)):
    v = np.array(values)
    print(
        f"{name} (N={n}, {draws} draws): mean {v.mean():.3f}  std {v.std(ddof=1):.3f}  "
        f"min {v.min():.3f}  max {v.max():.3f}"
    )
