"""The object-level view split (``loss.views="objects"``) against a NumPy flood-fill reference:
objects are the 8-connected components of each class, each object lies in one view, and the
objects of a class alternate between the views."""

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbp_jax.data import views


def reference_objects(label: np.ndarray, ignore_index: int = 255) -> list[tuple[int, frozenset]]:
    """``[(class, pixels)]`` of every 8-connected component, by breadth-first flood fill."""
    h, w = label.shape
    seen = np.zeros(label.shape, bool)
    found = []
    for i in range(h):
        for j in range(w):
            if seen[i, j] or label[i, j] == ignore_index:
                continue
            c, queue, pixels = label[i, j], collections.deque([(i, j)]), set()
            seen[i, j] = True
            while queue:
                y, x = queue.popleft()
                pixels.add((y, x))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        v, u = y + dy, x + dx
                        if 0 <= v < h and 0 <= u < w and not seen[v, u] and label[v, u] == c:
                            seen[v, u] = True
                            queue.append((v, u))
            found.append((int(c), frozenset(pixels)))
    return found


def _as_sets(ids: np.ndarray, classes: np.ndarray) -> set[tuple[int, frozenset]]:
    return {
        (int(classes[k]), frozenset(zip(*np.nonzero(ids == k), strict=True)))
        for k in range(len(classes))
    }


labels_strategy = st.integers(0, 2**31 - 1).map(
    lambda seed: np.random.default_rng(seed).choice(
        np.array([0, 1, 2, 255], np.uint8), size=(9, 11), p=[0.4, 0.3, 0.2, 0.1]
    )
)


@settings(max_examples=40, deadline=None)
@given(labels_strategy)
def test_objects_are_the_8_connected_components_of_each_class(label):
    ids, classes = views.objects(label)
    assert _as_sets(ids, classes) == set(reference_objects(label))
    assert (ids == -1).sum() == (label == 255).sum()


@settings(max_examples=40, deadline=None)
@given(labels_strategy, st.integers(0, 1000))
def test_each_object_lies_in_one_view_and_the_objects_of_a_class_alternate(label, seed):
    got = views.object_views(label, np.random.default_rng(seed))
    assert got.dtype == np.uint8 and got.shape == label.shape
    per_class = collections.defaultdict(list)
    for c, pixels in reference_objects(label):
        values = {int(got[p]) for p in pixels}
        assert len(values) == 1, f"class {c}: an object spans both views"
        per_class[c].append(values.pop())
    for c, object_views in per_class.items():
        ones = sum(object_views)
        assert abs(len(object_views) - 2 * ones) <= 1, (c, object_views)  # floor / ceil


def test_a_lone_object_goes_whole_to_one_view_or_is_split_by_pixels():
    label = np.full((12, 12), 255, np.uint8)
    label[2:10, 2:10] = 4  # class 4: one object
    label[0, 0], label[11, 11] = 7, 7  # class 7: two objects
    drawn = {int(views.object_views(label, np.random.default_rng(s))[5, 5]) for s in range(20)}
    assert drawn == {0, 1}  # a random view, whole
    for seed in range(5):
        one = views.object_views(label, np.random.default_rng(seed))
        assert len(np.unique(one[2:10, 2:10])) == 1 and one[0, 0] != one[11, 11]
        split = views.object_views(label, np.random.default_rng(seed), single_object="split_pixels")
        assert 0.2 < split[2:10, 2:10].mean() < 0.8  # both views keep class 4
        assert split[0, 0] != split[11, 11]  # two objects: still split by object
    with pytest.raises(ValueError, match="single_object='both'"):
        views.object_views(label, np.random.default_rng(0), single_object="both")


def test_with_object_views_adds_the_views_of_the_transformed_label():
    label = np.zeros((6, 8), np.uint8)
    label[:, 4:] = 1

    def transform(example, rng):
        return {"image": example["image"], "label": example["label"][:, ::-1].copy()}

    wrapped = views.WithObjectViews(transform)
    out = wrapped({"image": np.zeros((6, 8, 3), np.float32), "label": label},
                  np.random.default_rng(3))  # fmt: skip
    rng = np.random.default_rng(3)
    np.testing.assert_array_equal(out["views"], views.object_views(label[:, ::-1], rng))
    assert out["views"][:, :4].std() == 0 and out["views"][:, 4:].std() == 0
