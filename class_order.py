"""The order a confusion matrix's classes are drawn in: folder order for few classes, grouped by confusion beyond.

Up to ``MAX_CLASSES_WITH_CELL_TEXT`` classes every cell carries its number and
the folder order is the one readers know; past that, classes mistaken for each
other are pulled next to one another (average-linkage clustering of the
confusion shares), so confusions show as blocks along the diagonal. plots.py,
report.py and report.html draw the same model in the same order. The shares
themselves (:func:`normalize_confusion`, each true class's row divided by its
sum) live here too: the order is computed from them, and plots.py colours the
cells with them.
"""

from __future__ import annotations

import numpy as np

# Per-cell numbers are only legible up to this many classes; up to it the classes keep folder order.
MAX_CLASSES_WITH_CELL_TEXT = 30


def normalize_confusion(confusion: np.ndarray) -> np.ndarray:
    """Divide each row (true class) of a count matrix by its sum.

    Rows with no samples stay all zero instead of becoming NaN. Returns a new
    float array of the same shape.
    """
    counts = np.asarray(confusion, dtype=float)
    if counts.ndim != 2:
        raise ValueError(f"confusion must be 2-D, got shape {counts.shape}")
    row_sums = counts.sum(axis=1, keepdims=True)
    normalized = np.zeros_like(counts)
    np.divide(counts, row_sums, out=normalized, where=row_sums > 0)
    return normalized


def auto_class_order(confusion: np.ndarray) -> list[int]:
    """The order to draw classes in: folder order up to 30 classes, confusion clusters beyond.

    Up to 30 classes every cell carries its number and the folder order is the
    one readers know. Beyond that, mistakes scattered over a 100 x 100 grid are
    hard to pair up by eye, so :func:`confusion_cluster_order` pulls classes
    that are mistaken for each other next to one another, turning confusions
    into blocks along the diagonal. (Sorting by recall would rank the weak
    classes, which ``per_class.csv`` already does, but would scatter their
    confusions.)
    """
    num_classes = np.asarray(confusion).shape[0]
    if num_classes <= MAX_CLASSES_WITH_CELL_TEXT:
        return list(range(num_classes))
    return confusion_cluster_order(confusion)


def confusion_cluster_order(confusion: np.ndarray) -> list[int]:
    """Class indices ordered so that classes mistaken for each other sit side by side.

    Classes are linked when either is ever predicted as the other. Each group
    of linked classes is ordered by average-linkage clustering of the symmetric
    confusion shares, with optimal leaf ordering so the most confused
    neighbours touch. Groups, single classes included, are laid out by their
    lowest class index, so classes that are never confused keep folder order.
    """
    from scipy.sparse.csgraph import connected_components  # here, as the others below: only past 30 classes

    similarity = _confusion_similarity(confusion)
    num_groups, group_of = connected_components(similarity > 0, directed=False)
    groups = sorted((np.flatnonzero(group_of == group) for group in range(num_groups)), key=min)
    return [int(members[position]) for members in groups
            for position in _leaf_order(similarity[np.ix_(members, members)])]


def _confusion_similarity(confusion: np.ndarray) -> np.ndarray:
    """For each pair of classes, the mean of the share of each mistaken for the other; zero diagonal."""
    shares = normalize_confusion(confusion)
    similarity = (shares + shares.T) / 2
    np.fill_diagonal(similarity, 0.0)
    return similarity


def _leaf_order(similarity: np.ndarray) -> list[int]:
    """Positions 0..n-1 in the leaf order of the optimally ordered average-linkage tree, lower end first."""
    from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
    from scipy.spatial.distance import squareform

    if len(similarity) <= 2:
        return list(range(len(similarity)))
    distance = 1.0 - similarity  # shares are at most 1, so distances stay in 0..1
    np.fill_diagonal(distance, 0.0)
    condensed = squareform(distance)
    tree = optimal_leaf_ordering(linkage(condensed, method="average"), condensed)
    leaves = [int(leaf) for leaf in leaves_list(tree)]
    return leaves if leaves[0] < leaves[-1] else leaves[::-1]
