#!/usr/bin/env python3
"""Reference values for the clustering-metric tests in runtime/src/metrics.rs.

Run with scikit-learn, SciPy and NumPy installed:

    pip install scikit-learn scipy numpy
    python3 runtime/tests/data/metrics_expected.py

It prints, for every test case, the Rust expressions that the `expected_*` tests of
runtime/src/metrics.rs paste in: the label arrays (or the generator parameters for the
large generated cases) and the four scores at full (round-trip) precision.

ACC is the Hungarian-matched accuracy: SciPy's `linear_sum_assignment` on the negated
contingency matrix (rows = classes, columns = clusters; it accepts rectangular
matrices), matched count divided by n. NMI, AMI and ARI are scikit-learn's
`normalized_mutual_info_score`, `adjusted_mutual_info_score` (both with their default
arithmetic averaging) and `adjusted_rand_score`.
"""

import numpy as np
import scipy
import sklearn
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import (
    adjusted_mutual_info_score,
    adjusted_rand_score,
    normalized_mutual_info_score,
)
from sklearn.metrics.cluster import contingency_matrix

MASK64 = (1 << 64) - 1


def lcg_stream(seed):
    """64-bit LCG (Knuth's MMIX constants); the Rust tests implement the same one."""
    state = seed & MASK64
    while True:
        state = (state * 6364136223846793005 + 1442695040888963407) & MASK64
        yield state >> 33


def generated(n, classes, clusters, agree_percent, seed):
    """Labels uniform in 0..classes; a cluster agrees with a fixed map of its label
    agree_percent% of the time and is uniform in 0..clusters otherwise."""
    rng = lcg_stream(seed)
    labels, preds = [], []
    for _ in range(n):
        label = next(rng) % classes
        if next(rng) % 100 < agree_percent:
            pred = (label * 7 + 3) % clusters
        else:
            pred = next(rng) % clusters
        labels.append(label)
        preds.append(pred)
    return labels, preds


def hungarian_acc(labels, preds):
    table = contingency_matrix(labels, preds)
    rows, cols = linear_sum_assignment(-table)
    return table[rows, cols].sum() / len(labels)


def scores(labels, preds):
    return (
        float(hungarian_acc(labels, preds)),
        float(normalized_mutual_info_score(labels, preds)),
        float(adjusted_mutual_info_score(labels, preds)),
        float(adjusted_rand_score(labels, preds)),
    )


def rust_list(values):
    return "[" + ", ".join(str(int(v)) for v in values) + "]"


def main():
    # Random case: a fixed NumPy seed, the drawn arrays are pasted literally into Rust.
    rng = np.random.default_rng(20240611)
    random_labels = rng.integers(0, 5, size=200).tolist()
    random_clusters = rng.integers(0, 7, size=200).tolist()

    literal_cases = {
        "perfect_permuted": ([0, 0, 0, 1, 1, 2, 2, 2, 2, 3], [7, 7, 7, 2, 2, 0, 0, 0, 0, 5]),
        "more_clusters": (
            [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2],
            [0, 0, 3, 3, 1, 1, 1, 4, 2, 2, 2, 0],
        ),
        "fewer_clusters": (
            [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3],
            [0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0],
        ),
        "one_cluster": ([0, 0, 1, 1, 1, 2, 3, 3], [4, 4, 4, 4, 4, 4, 4, 4]),
        "sparse_ids": (
            [0, 0, 0, 5, 5, 5, 5, 9, 9, 9, 0, 5],
            [100, 100, 4, 1, 1, 1, 4, 4, 4, 100, 100, 1],
        ),
        "anti_correlated": ([0, 0, 1, 1], [0, 1, 0, 1]),
        "all_singletons": ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 2, 4]),
        "one_class_one_cluster": ([3, 3, 3, 3, 3], [8, 8, 8, 8, 8]),
        "one_class_many_clusters": ([2, 2, 2, 2, 2, 2], [0, 1, 1, 2, 3, 3]),
        "random_200": (random_labels, random_clusters),
    }
    generated_cases = {
        # name: (n, classes, clusters, agree_percent, seed)
        "generated_5000": (5000, 30, 40, 60, 7),
        "generated_100000": (100_000, 100, 100, 40, 2024),
    }

    print(f"// scikit-learn {sklearn.__version__}, SciPy {scipy.__version__}, NumPy {np.__version__}")
    for name, (labels, preds) in literal_cases.items():
        acc, nmi, ami, ari = scores(labels, preds)
        print(f"// {name}")
        print(f"labels: &{rust_list(labels)},")
        print(f"clusters: &{rust_list(preds)},")
        print(f"acc: {acc!r}, nmi: {nmi!r}, ami: {ami!r}, ari: {ari!r},")
    for name, params in generated_cases.items():
        labels, preds = generated(*params)
        acc, nmi, ami, ari = scores(labels, preds)
        print(f"// {name}: generated{params}")
        print(f"acc: {acc!r}, nmi: {nmi!r}, ami: {ami!r}, ari: {ari!r},")


if __name__ == "__main__":
    main()
