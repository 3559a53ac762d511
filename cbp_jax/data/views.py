"""The paper's object-level view split for OCCL (``config.loss.views="objects"``), on the host.

The paper divides a label map y "into two views y1 and y2 so that each view has the same
categories as y but half the objects", different objects of a class acting as augmentations
of each other. Our reading, per training crop:

- An object is a connected component of one class in the cropped label map, 8-connected
  (diagonal neighbours join: a thin diagonal pole stays one object). An object cut by the
  crop counts by what is visible: one piece is one object, two disconnected visible pieces
  are two. Ignored pixels (255) belong to no object.
- The objects of each class present are put in a random order and alternate between the
  views from a random first view, so a class with k >= 2 objects gives floor(k/2) and
  ceil(k/2) objects to the two views, and both views keep it.
- A class with one object in the crop: ``single_object="one_view"`` sends it whole to a
  random view (the other view of this crop lacks the class; other images of the batch
  usually supply it), ``"split_pixels"`` splits its pixels at random between the views
  (both keep the class, at the price of a near-trivial positive pair for that class).

The split runs per example in the loader (its random generator, so a resumed run draws the
same views) and ships with the batch as ``"views"``: uint8 (H, W) in {0, 1}, nearest-
downsampled with the labels in the loss. Sharded and single-device steps see the same map.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SINGLE_OBJECT = ("one_view", "split_pixels")
CONNECTIVITY = np.ones((3, 3), bool)  # 8-connected


def objects(label: np.ndarray, ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """The objects of an (H, W) label map.

    Returns:
      ``(ids, classes)``: int32 (H, W) object id per pixel (-1 for ``ignore_index``), ids
      ``0 .. K-1`` numbered class by class (ascending) then in scan order; and (K,) the class
      of each object.
    """
    ids = np.full(label.shape, -1, np.int32)
    classes = []
    for c in np.unique(label):
        if c == ignore_index:
            continue
        components, count = ndimage.label(label == c, structure=CONNECTIVITY)
        inside = components > 0
        ids[inside] = components[inside] - 1 + len(classes)
        classes += [int(c)] * count
    return ids, np.asarray(classes, np.int64)


def object_views(
    label: np.ndarray,
    rng: np.random.Generator,
    *,
    single_object: str = "one_view",
    ignore_index: int = 255,
) -> np.ndarray:
    """uint8 (H, W) view (0 or 1) of each pixel of an (H, W) label map, object by object
    (module docstring); ignored pixels get 0 (the loss leaves them out)."""
    if single_object not in SINGLE_OBJECT:
        raise ValueError(f"single_object={single_object!r}; use one of {SINGLE_OBJECT}.")
    ids, classes = objects(label, ignore_index)
    view_of_object = np.zeros(len(classes), np.uint8)
    lone = []
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        order = rng.permutation(members)
        first = rng.integers(2)
        view_of_object[order] = (first + np.arange(len(order))) % 2
        if len(members) == 1:
            lone.append(members[0])
    views = np.where(ids >= 0, view_of_object[np.maximum(ids, 0)], 0).astype(np.uint8)
    if single_object == "split_pixels" and lone:
        pixels = np.isin(ids, lone)
        views[pixels] = rng.integers(0, 2, int(pixels.sum()), dtype=np.uint8)
    return views


class WithObjectViews:
    """A train transform plus the object-level views of its label: ``f(example, rng) ->
    {"image", "label", "views"}`` (picklable, so it runs in grain's workers)."""

    def __init__(self, transform, single_object: str = "one_view", ignore_index: int = 255):
        if single_object not in SINGLE_OBJECT:
            raise ValueError(
                f"config.loss.single_object={single_object!r}; use one of {SINGLE_OBJECT}."
            )
        self.transform = transform
        self.single_object = single_object
        self.ignore_index = ignore_index

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        out = self.transform(example, rng)
        views = object_views(
            out["label"], rng, single_object=self.single_object, ignore_index=self.ignore_index
        )
        return {**out, "views": views}
