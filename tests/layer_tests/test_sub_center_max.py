"""SubCenterMax (sub-center ArcFace): the standard tests over several shapes,
K and axes; then ties (the first index wins), the layout against
pytorch-metric-learning's SubCenterArcFaceLoss, a PyTorch autograd
cross-check, use before the margin layers, and bad input."""

import naive
import numpy as np
import pytest
from layer_test_case import LayerTestCase
from layer_testing import assert_numba_falls_back, filler, make_blob, requires_numba

import netlite
from netlite import Blob
from netlite.errors import LayerSetupError, NonFiniteError, ShapeError


class TestSubCenterMaxLayer(LayerTestCase):
    """Forward against ``naive.sub_center_max`` (both dtypes), the
    exhaustive float64 gradient (Gaussian data: no ties), propagate_down and
    the overwritten bottom diff."""

    shape, k, axis = (4, 12), 3, 1
    cases = {
        "rows": {},
        "k1": {"k": 1, "shape": (3, 5)},
        "k4": {"k": 4, "shape": (2, 8)},
        "caffe_4d": {"shape": (3, 6, 1, 1), "k": 2},
        "spatial": {"shape": (2, 6, 3), "k": 3},
        "axis_last": {"shape": (3, 2, 6), "k": 2, "axis": -1},
    }

    @property
    def layer(self):
        return (
            f'type: "SubCenterMax" sub_center_param {{ num_subcenters: {self.k} '
            f"axis: {self.axis} }}"
        )

    @property
    def bottoms(self):
        return [(self.shape, filler("gaussian"))]

    def oracle(self, bottoms, blobs):
        return [naive.sub_center_max(bottoms[0], self.k, self.axis)]


def _run(x, k, dtype=np.float64, axis=1, dy=None):
    layer = netlite.create_layer(
        f'name: "sub" type: "SubCenterMax" sub_center_param {{ num_subcenters: {k} '
        f"axis: {axis} }}",
        dtype=dtype,
    )
    x = np.asarray(x, dtype=np.float64)
    bottom, top = [make_blob(x.shape, dtype, x)], [Blob(dtype=dtype)]
    layer.setup(bottom, top)
    layer.forward(bottom, top)
    top[0].diff[...] = np.ones(top[0].shape) if dy is None else dy
    bottom[0].diff[...] = 5
    layer.backward(top, [True], bottom)
    return top[0].data.copy(), bottom[0].diff.copy()


def test_layout_is_class_major(dtype):
    # Class c's sub-centers are columns c K .. c K + K - 1.
    x = np.array([[0.1, 0.9, 0.2, 0.5, 0.4, 0.3]])
    y, dx = _run(x, 3, dtype, dy=[[2.0, 3.0]])
    np.testing.assert_array_equal(y, np.array([[0.9, 0.5]], dtype=dtype))
    np.testing.assert_array_equal(dx, [[0, 2, 0, 3, 0, 0]])


def test_ties_route_to_the_first_index():
    x = np.array([[0.7, 0.7, 0.7, -0.2, 0.4, 0.4]])
    y, dx = _run(x, 3, dy=[[1.5, -2.0]])
    np.testing.assert_array_equal(y, [[0.7, 0.4]])
    np.testing.assert_array_equal(dx, [[1.5, 0, 0, 0, -2.0, 0]])


def test_k_equal_one_is_the_identity():
    x = np.random.default_rng(1).standard_normal((3, 4))
    y, dx = _run(x, 1, dy=2 * np.ones((3, 4)))
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(dx, 2.0)


@pytest.mark.torch
def test_matches_pml_subcenter_cosine_and_torch_autograd():
    """pml's SubCenterArcFaceLoss.get_cosine views the (N, C K) cosines as
    (N, C, K) and takes the max over K: the same numbers, and torch's
    autograd of that max gives the same gradient."""
    torch = pytest.importorskip("torch")
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    rng = np.random.default_rng(4)
    n, c, k, d = 8, 5, 3, 6
    emb = rng.standard_normal((n, d))
    pml = losses.SubCenterArcFaceLoss(num_classes=c, embedding_size=d, sub_centers=k)
    pml.W.data = torch.tensor(rng.standard_normal((d, c * k)))
    with torch.no_grad():
        want = pml.get_cosine(torch.tensor(emb)).numpy()
    cos_all = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (
        pml.W.data.numpy() / np.linalg.norm(pml.W.data.numpy(), axis=0, keepdims=True)
    )
    dy = rng.standard_normal((n, c))
    got, dx = _run(cos_all, k, dy=dy)
    ct = torch.tensor(cos_all, requires_grad=True)
    ct.view(-1, c, k).max(axis=2)[0].backward(torch.tensor(dy))
    worst = max(
        float(np.abs(got - want).max() / np.abs(want).max()),
        float(np.abs(dx - ct.grad.numpy()).max() / np.abs(dy).max()),
    )
    print(
        f"SubCenterMax vs pml get_cosine / torch autograd: worst relative error "
        f"{worst:.3g}"
    )
    assert worst < 1e-14


def test_feeds_the_margin_layers():
    text = (
        'layer { name: "in" type: "Input" top: "c" top: "y" '
        "input_param { shape { dim: 2 dim: 6 } shape { dim: 2 } } }\n"
        'layer { name: "sub" type: "SubCenterMax" bottom: "c" top: "cm" '
        "sub_center_param { num_subcenters: 2 } }\n"
        'layer { name: "arc" type: "LabelSpecificMargin" bottom: "cm" bottom: "y" '
        'top: "z" label_specific_margin_param { margin_base: 0.5 gamma: 0 '
        "unit: RADIAN } }\n"
        'layer { name: "add" type: "LabelSpecificAdd" bottom: "cm" bottom: "y" '
        'top: "w" label_specific_add_param { bias: -0.35 } }\n'
    )
    net = netlite.Net(text, netlite.TRAIN, dtype=np.float64)
    c = np.array([[0.1, 0.8, 0.3, 0.2, -0.5, 0.6], [0.4, 0.0, 0.9, 0.95, 0.2, 0.1]])
    net.blobs["c"].data[...] = c
    net.blobs["y"].data[...] = [0, 1]
    out = net.forward()
    cm = naive.sub_center_max(c, 2)
    np.testing.assert_allclose(
        out["z"], naive.label_specific_margin(cm, [0, 1], m2=0.5), rtol=1e-15
    )
    np.testing.assert_allclose(
        out["w"], naive.label_specific_add(cm, [0, 1], float(np.float32(-0.35)))
    )


def test_bad_input():
    with pytest.raises(
        LayerSetupError, match="'sub'.*num_subcenters must be at least 1"
    ):
        _run(np.zeros((2, 4)), 0)
    with pytest.raises(
        ShapeError, match="'sub'.*5 columns along axis 1.*num_subcenters = 2"
    ):
        _run(np.zeros((2, 5)), 2)
    with pytest.raises(LayerSetupError, match="axis"):
        _run(np.zeros((2, 4)), 2, axis=3)
    for value in (np.nan, np.inf):
        x = np.zeros((2, 4))
        x[1, 3] = value
        with pytest.raises(NonFiniteError, match=r"'sub'.*index \(1, 3\)"):
            _run(x, 2)


def test_in_place_is_rejected():
    layer = netlite.create_layer(
        'name: "sub" type: "SubCenterMax" sub_center_param { num_subcenters: 2 }'
    )
    x = make_blob((2, 4), np.float32, np.zeros((2, 4)))
    with pytest.raises(LayerSetupError, match="in place"):
        layer.setup([x], [x])


@requires_numba()
def test_numba_engine_falls_back_to_the_reference(dtype):
    # No kernel of its own: the Numba engine runs the NumPy reference.
    rng = np.random.default_rng(9)
    inputs = [rng.standard_normal((4, 12))]
    diffs = [rng.standard_normal((4, 4))]
    assert_numba_falls_back(
        'name: "l" type: "SubCenterMax" sub_center_param { num_subcenters: 3 }',
        inputs, diffs, [True], dtype)
