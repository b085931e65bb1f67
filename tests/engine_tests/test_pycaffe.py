"""pycaffe's own Python tests, ported onto netlite's names, then what a
pycaffe user also relies on.

The ported classes keep Caffe's names (``TestNet``, ``TestLevels``,
``TestStages``, ``TestAllInOne`` from python/caffe/test/test_net.py,
``TestSolver`` from test_solver.py, ``TestLayerTypeList`` from
test_layer_type_list.py), their nets (``simple_net_file`` and the level,
stage and all-in-one prototxts, verbatim) and their checks.  Adapted only
where netlite's names differ: ``caffe.`` is ``netlite.``, the private
``net._layer_names`` is the public ``net.layer_names``, files go to pytest's
``tmp_path``, and random labels come from a seeded generator.  Left out:
``test_memory`` and the memory half of ``test_net_memory`` (Python holds
references; nothing can dangle), ``test_save_hdf5`` (netlite reads no HDF5),
the Python-layer and NCCL tests (netlite has neither).  pycaffe's
test_net_spec.py is ported in test_net_spec.py.

Then: every call form of ``Net`` and its errors, ``forward_all`` and
``forward_backward_all``, the remaining pycaffe attributes, the module-level
names, the solver classes built from a path, and the warning of a backward
pass that can compute nothing.
"""

import os
import pathlib
import warnings
from collections import OrderedDict

import numpy as np
import pytest

import netlite

SEED = 1701


def simple_net_file(num_output, directory):
    """Make a simple net prototxt, based on test_net.cpp, returning the name
    of the file (pycaffe's helper; written to ``directory``)."""
    path = os.path.join(directory, f"simple_net_{num_output}.prototxt")
    with open(path, "w") as f:
        f.write("""name: 'testnet' force_backward: true
    layer { type: 'DummyData' name: 'data' top: 'data' top: 'label'
      dummy_data_param { num: 5 channels: 2 height: 3 width: 4
        num: 5 channels: 1 height: 1 width: 1
        data_filler { type: 'gaussian' std: 1 }
        data_filler { type: 'constant' } } }
    layer { type: 'Convolution' name: 'conv' bottom: 'data' top: 'conv'
      convolution_param { num_output: 11 kernel_size: 2 pad: 3
        weight_filler { type: 'gaussian' std: 1 }
        bias_filler { type: 'constant' value: 2 } }
        param { decay_mult: 1 } param { decay_mult: 0 }
        }
    layer { type: 'InnerProduct' name: 'ip' bottom: 'conv' top: 'ip_blob'
      inner_product_param { num_output: """ + str(num_output) + """
        weight_filler { type: 'gaussian' std: 2.5 }
        bias_filler { type: 'constant' value: -3 } } }
    layer { type: 'SoftmaxWithLoss' name: 'loss' bottom: 'ip_blob' bottom: 'label'
      top: 'loss' }""")
    return path


def _random_labels(num_output, shape):
    return np.random.default_rng(SEED).integers(num_output, size=shape)


@pytest.fixture
def quiet():
    """Any warning raised inside is an error (the suite's setting, made
    explicit where a test checks that nothing warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ========================================================= test_net.py port
class TestNet:
    num_output = 13

    @pytest.fixture(autouse=True)
    def _net(self, tmp_path):
        self.tmp_path = tmp_path
        net_file = simple_net_file(self.num_output, tmp_path)
        self.net = netlite.Net(net_file, netlite.TRAIN)
        # fill in valid labels
        self.net.blobs["label"].data[...] = _random_labels(
            self.num_output, self.net.blobs["label"].data.shape)
        os.remove(net_file)

    def test_layer_dict(self):
        layer_dict = self.net.layer_dict
        assert list(layer_dict.keys()) == list(self.net.layer_names)
        for i, name in enumerate(self.net.layer_names):
            assert layer_dict[name].type == self.net.layers[i].type

    def test_forward_backward(self):
        self.net.forward()
        self.net.backward()

    def test_forward_start_end(self):
        conv_blob = self.net.blobs["conv"]
        ip_blob = self.net.blobs["ip_blob"]
        sample_data = np.random.default_rng(SEED).uniform(size=conv_blob.data.shape)
        sample_data = sample_data.astype(np.float32)
        conv_blob.data[:] = sample_data
        forward_blob = self.net.forward(start="ip", end="ip")
        assert "ip_blob" in forward_blob

        manual_forward = []
        for i in range(0, conv_blob.data.shape[0]):
            dot = np.dot(self.net.params["ip"][0].data,
                         conv_blob.data[i].reshape(-1))
            manual_forward.append(dot + self.net.params["ip"][1].data)
        manual_forward = np.array(manual_forward)

        np.testing.assert_allclose(ip_blob.data, manual_forward, rtol=1e-3,
                                   atol=1e-5)

    def test_backward_start_end(self):
        conv_blob = self.net.blobs["conv"]
        ip_blob = self.net.blobs["ip_blob"]
        sample_data = np.random.default_rng(SEED).uniform(size=ip_blob.data.shape)
        sample_data = sample_data.astype(np.float32)
        ip_blob.diff[:] = sample_data
        backward_blob = self.net.backward(start="ip", end="ip")
        assert "conv" in backward_blob

        manual_backward = []
        for i in range(0, conv_blob.data.shape[0]):
            dot = np.dot(self.net.params["ip"][0].data.transpose(),
                         sample_data[i].reshape(-1))
            manual_backward.append(dot)
        manual_backward = np.array(manual_backward)
        manual_backward = manual_backward.reshape(conv_blob.data.shape)

        np.testing.assert_allclose(conv_blob.diff, manual_backward, rtol=1e-3,
                                   atol=1e-5)

    def test_clear_param_diffs(self):
        # Run a forward/backward step to have non-zero diffs
        self.net.forward()
        self.net.backward()
        diff = self.net.params["conv"][0].diff
        # Check that we have non-zero diffs
        assert diff.max() > 0
        self.net.clear_param_diffs()
        # Check that the diffs are now 0
        assert (diff == 0).all()

    def test_inputs_outputs(self):
        assert self.net.inputs == []
        assert self.net.outputs == ["loss"]

    def test_top_bottom_names(self):
        assert self.net.top_names == OrderedDict([("data", ["data", "label"]),
                                                  ("conv", ["conv"]),
                                                  ("ip", ["ip_blob"]),
                                                  ("loss", ["loss"])])
        assert self.net.bottom_names == OrderedDict([("data", []),
                                                     ("conv", ["data"]),
                                                     ("ip", ["conv"]),
                                                     ("loss", ["ip_blob", "label"])])

    def test_save_and_read(self):
        f = self.tmp_path / "weights"
        self.net.save(str(f))
        net_file = simple_net_file(self.num_output, self.tmp_path)
        # Test legacy constructor (pycaffe logs a deprecation warning; in
        # netlite it is a first-class form)
        legacy = netlite.Net(net_file, str(f), netlite.TRAIN)
        # Test named constructor
        net2 = netlite.Net(net_file, netlite.TRAIN, weights=str(f))
        os.remove(net_file)
        os.remove(f)
        for other in (legacy, net2):
            for name in self.net.params:
                for i in range(len(self.net.params[name])):
                    assert abs(self.net.params[name][i].data
                               - other.params[name][i].data).sum() == 0


class _NetFile:
    """pycaffe's tests read ``TEST_NET`` from a file: write it to a fresh
    temporary file ``self.f`` for every test."""

    TEST_NET = ""

    @pytest.fixture(autouse=True)
    def _file(self, tmp_path):
        self.f = tmp_path / "net.prototxt"
        self.f.write_text(self.TEST_NET)


class _BlobsCheck(_NetFile):
    def check_net(self, net, blobs):
        net_blobs = [b for b in net.blobs.keys() if "data" not in b]
        assert net_blobs == blobs


class TestLevels(_BlobsCheck):

    TEST_NET = """
layer {
  name: "data"
  type: "DummyData"
  top: "data"
  dummy_data_param { shape { dim: 1 dim: 1 dim: 10 dim: 10 } }
}
layer {
  name: "NoLevel"
  type: "InnerProduct"
  bottom: "data"
  top: "NoLevel"
  inner_product_param { num_output: 1 }
}
layer {
  name: "Level0Only"
  type: "InnerProduct"
  bottom: "data"
  top: "Level0Only"
  include { min_level: 0 max_level: 0 }
  inner_product_param { num_output: 1 }
}
layer {
  name: "Level1Only"
  type: "InnerProduct"
  bottom: "data"
  top: "Level1Only"
  include { min_level: 1 max_level: 1 }
  inner_product_param { num_output: 1 }
}
layer {
  name: "Level>=0"
  type: "InnerProduct"
  bottom: "data"
  top: "Level>=0"
  include { min_level: 0 }
  inner_product_param { num_output: 1 }
}
layer {
  name: "Level>=1"
  type: "InnerProduct"
  bottom: "data"
  top: "Level>=1"
  include { min_level: 1 }
  inner_product_param { num_output: 1 }
}
"""

    def test_0(self):
        net = netlite.Net(str(self.f), netlite.TEST)
        self.check_net(net, ["NoLevel", "Level0Only", "Level>=0"])

    def test_1(self):
        net = netlite.Net(str(self.f), netlite.TEST, level=1)
        self.check_net(net, ["NoLevel", "Level1Only", "Level>=0", "Level>=1"])
        # pycaffe's positional form: Net(network_file, phase, level).
        net = netlite.Net(str(self.f), netlite.TEST, 1)
        self.check_net(net, ["NoLevel", "Level1Only", "Level>=0", "Level>=1"])


class TestStages(_BlobsCheck):

    TEST_NET = """
layer {
  name: "data"
  type: "DummyData"
  top: "data"
  dummy_data_param { shape { dim: 1 dim: 1 dim: 10 dim: 10 } }
}
layer {
  name: "A"
  type: "InnerProduct"
  bottom: "data"
  top: "A"
  include { stage: "A" }
  inner_product_param { num_output: 1 }
}
layer {
  name: "B"
  type: "InnerProduct"
  bottom: "data"
  top: "B"
  include { stage: "B" }
  inner_product_param { num_output: 1 }
}
layer {
  name: "AorB"
  type: "InnerProduct"
  bottom: "data"
  top: "AorB"
  include { stage: "A" }
  include { stage: "B" }
  inner_product_param { num_output: 1 }
}
layer {
  name: "AandB"
  type: "InnerProduct"
  bottom: "data"
  top: "AandB"
  include { stage: "A" stage: "B" }
  inner_product_param { num_output: 1 }
}
"""

    def test_A(self):
        net = netlite.Net(str(self.f), netlite.TEST, stages=["A"])
        self.check_net(net, ["A", "AorB"])

    def test_B(self):
        net = netlite.Net(str(self.f), netlite.TEST, stages=["B"])
        self.check_net(net, ["B", "AorB"])

    def test_AandB(self):
        net = netlite.Net(str(self.f), netlite.TEST, stages=["A", "B"])
        self.check_net(net, ["A", "B", "AorB", "AandB"])
        # pycaffe's positional form: Net(network_file, phase, level, stages).
        net = netlite.Net(str(self.f), netlite.TEST, 0, ["A", "B"])
        self.check_net(net, ["A", "B", "AorB", "AandB"])


class TestAllInOne(_NetFile):

    TEST_NET = """
layer {
  name: "train_data"
  type: "DummyData"
  top: "data"
  top: "label"
  dummy_data_param {
    shape { dim: 1 dim: 1 dim: 10 dim: 10 }
    shape { dim: 1 dim: 1 dim: 1 dim: 1 }
  }
  include { phase: TRAIN stage: "train" }
}
layer {
  name: "val_data"
  type: "DummyData"
  top: "data"
  top: "label"
  dummy_data_param {
    shape { dim: 1 dim: 1 dim: 10 dim: 10 }
    shape { dim: 1 dim: 1 dim: 1 dim: 1 }
  }
  include { phase: TEST stage: "val" }
}
layer {
  name: "deploy_data"
  type: "Input"
  top: "data"
  input_param { shape { dim: 1 dim: 1 dim: 10 dim: 10 } }
  include { phase: TEST stage: "deploy" }
}
layer {
  name: "ip"
  type: "InnerProduct"
  bottom: "data"
  top: "ip"
  inner_product_param { num_output: 2 }
}
layer {
  name: "loss"
  type: "SoftmaxWithLoss"
  bottom: "ip"
  bottom: "label"
  top: "loss"
  include: { phase: TRAIN stage: "train" }
  include: { phase: TEST stage: "val" }
}
layer {
  name: "pred"
  type: "Softmax"
  bottom: "ip"
  top: "pred"
  include: { phase: TEST stage: "deploy" }
}
"""

    def check_net(self, net, outputs):
        assert list(net.blobs["data"].shape) == [1, 1, 10, 10]
        assert net.outputs == outputs

    def test_train(self):
        net = netlite.Net(str(self.f), netlite.TRAIN, stages=["train"])
        self.check_net(net, ["loss"])

    def test_val(self):
        net = netlite.Net(str(self.f), netlite.TEST, stages=["val"])
        self.check_net(net, ["loss"])

    def test_deploy(self):
        net = netlite.Net(str(self.f), netlite.TEST, stages=["deploy"])
        self.check_net(net, ["pred"])


# =================================================== test_layer_type_list.py
class TestLayerTypeList:

    def test_standard_types(self):
        # "Python" is left out: netlite has no Python layer.
        for type_name in ["Data", "Convolution", "InnerProduct"]:
            assert type_name in netlite.layer_type_list(), (
                f"{type_name} not in layer_type_list()")

    def test_no_duplicates(self):
        types = netlite.layer_type_list()
        assert len(types) == len(set(types)) > 0
        assert types == netlite.layer_types()


# ======================================================= test_solver.py port
class TestSolver:
    num_output = 13

    @pytest.fixture(autouse=True)
    def _solver(self, tmp_path, monkeypatch):
        # snapshot_prefix "model" is relative: write into tmp_path.
        monkeypatch.chdir(tmp_path)
        net_f = simple_net_file(self.num_output, tmp_path)
        f = tmp_path / "solver.prototxt"
        f.write_text("""net: '""" + net_f + """'
        test_iter: 10 test_interval: 10 base_lr: 0.01 momentum: 0.9
        weight_decay: 0.0005 lr_policy: 'inv' gamma: 0.0001 power: 0.75
        display: 100 max_iter: 100 snapshot_after_train: false
        snapshot_prefix: "model" """)
        self.solver = netlite.SGDSolver(str(f))
        # also make sure get_solver runs
        netlite.get_solver(str(f))
        netlite.set_mode_cpu()
        # fill in valid labels
        self.solver.net.blobs["label"].data[...] = _random_labels(
            self.num_output, self.solver.net.blobs["label"].data.shape)
        self.solver.test_nets[0].blobs["label"].data[...] = _random_labels(
            self.num_output, self.solver.test_nets[0].blobs["label"].data.shape)
        os.remove(f)
        os.remove(net_f)

    def test_solve(self):
        assert self.solver.iter == 0
        self.solver.solve()
        assert self.solver.iter == 100

    def test_apply_update(self):
        net = self.solver.net
        data = net.layers[1].blobs[0].data[...]
        # Reset the weights of that layer to 0
        data[...] = 0
        net.layers[1].blobs[0].diff[...] = 1
        # Apply the update, the initial learning rate should be 0.01
        self.solver.apply_update()
        # Check that the new weights are -0.01, with a precision of 1e-7
        assert (data - -0.01 * np.ones(data.shape)).max() < 1e-7
        # (pycaffe checks the maximum only; the whole array moved.)
        np.testing.assert_allclose(data, -0.01, rtol=1e-6)

    def test_net_memory(self):
        """Check that nets survive after the solver is destroyed."""

        nets = [self.solver.net] + list(self.solver.test_nets)
        assert len(nets) == 2
        del self.solver

        total = 0
        for net in nets:
            for ps in net.params.values():
                for p in ps:
                    total += p.data.sum() + p.diff.sum()
            for bl in net.blobs.values():
                total += bl.data.sum() + bl.diff.sum()
        assert np.isfinite(total)

    def test_snapshot(self):
        self.solver.snapshot()
        # Check that these files exist and then remove them
        files = ["model_iter_0.caffemodel", "model_iter_0.solverstate"]
        for fn in files:
            assert os.path.isfile(fn)
            os.remove(fn)


# ================================================================ call forms
_DEPLOY = """name: 'deploy'
layer { name: 'input' type: 'Input' top: 'data'
        input_param { shape { dim: 4 dim: 3 } } }
layer { name: 'ip' type: 'InnerProduct' bottom: 'data' top: 'ip'
        inner_product_param { num_output: 5
          weight_filler { type: 'gaussian' std: 1 }
          bias_filler { type: 'gaussian' std: 1 } } }
layer { name: 'prob' type: 'Softmax' bottom: 'ip' top: 'prob' }
"""

_STAGED = """name: 'staged'
layer { name: 'input' type: 'Input' top: 'data'
        input_param { shape { dim: 4 dim: 3 } } }
layer { name: 'ip' type: 'InnerProduct' bottom: 'data' top: 'ip'
        inner_product_param { num_output: 5
          weight_filler { type: 'gaussian' std: 1 } } }
layer { name: 'extra' type: 'InnerProduct' bottom: 'ip' top: 'extra'
        include { phase: TEST min_level: 2 stage: 'x' }
        inner_product_param { num_output: 2 } }
"""


@pytest.fixture
def deploy_files(tmp_path):
    """(model path, weights path, the net that wrote the weights)."""
    model = tmp_path / "deploy.prototxt"
    model.write_text(_DEPLOY)
    netlite.set_random_seed(SEED)
    source = netlite.Net(str(model), netlite.TEST)
    weights = tmp_path / "deploy.caffemodel"
    source.save(str(weights))
    return str(model), str(weights), source


def _same_weights(net, source):
    return all(np.array_equal(a.data, b.data)
               for name in source.params
               for a, b in zip(net.params[name], source.params[name]))


class TestCallForms:

    def test_legacy_positional_form(self, deploy_files):
        model, weights, source = deploy_files
        netlite.set_random_seed(7)  # a fresh net would draw other weights
        net = netlite.Net(model, weights, netlite.TEST)
        assert net.phase == netlite.TEST and _same_weights(net, source)
        # A path object and the phase as a keyword work too.
        net = netlite.Net(model, pathlib.Path(weights), phase=netlite.TEST)
        assert _same_weights(net, source)

    @pytest.mark.parametrize("form", ["weights_keyword", "keywords_only",
                                      "model_keyword", "all_positional",
                                      "level_stages_keywords"])
    def test_named_forms(self, deploy_files, form):
        model, weights, source = deploy_files
        netlite.set_random_seed(7)
        net = {
            "weights_keyword": lambda: netlite.Net(model, netlite.TEST,
                                                   weights=weights),
            "keywords_only": lambda: netlite.Net(network_file=model,
                                                 phase=netlite.TEST,
                                                 weights=weights),
            "model_keyword": lambda: netlite.Net(model=model, phase=netlite.TEST,
                                                 weights=weights),
            "all_positional": lambda: netlite.Net(model, netlite.TEST, 0, None,
                                                  weights),
            "level_stages_keywords": lambda: netlite.Net(
                model, netlite.TEST, level=0, stages=[], weights=weights),
        }[form]()
        assert net.phase == netlite.TEST and _same_weights(net, source)

    def test_phase_defaults_to_train_and_keywords_stay(self, deploy_files):
        model, weights, _ = deploy_files
        net = netlite.Net(model)
        assert net.phase == netlite.TRAIN and net.dtype == np.float32
        net = netlite.Net(model, netlite.TEST, weights=weights, dtype=np.float64,
                          device="cpu")
        assert net.dtype == np.float64 and net.device == "cpu"
        assert net.params["ip"][0].dtype == np.float64

    @pytest.mark.parametrize("args, kwargs", [
        ((), dict(level=2, stages=["x"])),
        ((2, ["x"]), {}),
        ((2, "x"), {}),
        ((2,), dict(stages=("x",))),
    ], ids=["keywords", "positional", "one_stage_string", "mixed"])
    def test_level_and_stages(self, args, kwargs):
        net = netlite.Net(_STAGED, netlite.TEST, *args, **kwargs)
        assert "extra" in net.layer_names
        assert "extra" not in netlite.Net(_STAGED, netlite.TEST, 2).layer_names
        assert "extra" not in netlite.Net(_STAGED, netlite.TEST,
                                          stages=["x"]).layer_names

    @pytest.mark.parametrize("call, error, message", [
        (lambda m, w: netlite.Net(m, w), TypeError,
         "the phase must follow it"),
        (lambda m, w: netlite.Net(m, w, netlite.TEST, 1), TypeError,
         "takes nothing else"),
        (lambda m, w: netlite.Net(m, w, netlite.TEST, weights=w), TypeError,
         "takes nothing else"),
        (lambda m, w: netlite.Net(m, w, netlite.TEST, phase=netlite.TEST),
         TypeError, "got the phase twice"),
        (lambda m, w: netlite.Net(m, netlite.TEST, w), TypeError,
         "level must be an int, got '.*deploy.caffemodel'"),
        (lambda m, w: netlite.Net(m, netlite.TEST, 0, [], w, 1), TypeError,
         "at most 5 positional arguments"),
        (lambda m, w: netlite.Net(m, netlite.TEST, phase=netlite.TEST),
         TypeError, "got phase twice"),
        (lambda m, w: netlite.Net(m, netlite.TEST, weight=w), TypeError,
         "unexpected keyword argument 'weight' \\(did you mean 'weights'\\?\\)"),
        (lambda m, w: netlite.Net(), TypeError, "needs a model"),
        (lambda m, w: netlite.Net(m, network_file=m), TypeError,
         "got the model twice"),
        (lambda m, w: netlite.Net(network_file=m, model=m), TypeError,
         "got the model twice"),
        (lambda m, w: netlite.Net(m, netlite.TEST, stages=[1]), TypeError,
         "stages must be a string or a list of strings"),
        (lambda m, w: netlite.Net(m, netlite.TEST, weights=3), TypeError,
         "weights must be a file path"),
        (lambda m, w: netlite.Net(m, 2), ValueError,
         "phase must be netlite.TRAIN or netlite.TEST, got 2"),
        (lambda m, w: netlite.Net(m, True), ValueError,
         "phase must be netlite.TRAIN or netlite.TEST, got True"),
    ], ids=["legacy_without_phase", "legacy_with_level", "legacy_weights_twice",
            "legacy_phase_twice", "weights_in_level_slot", "too_many",
            "phase_twice", "misspelt_keyword", "no_model", "model_twice",
            "model_keywords_twice", "bad_stages", "bad_weights", "bad_phase",
            "bool_phase"])
    def test_wrong_arguments_list_the_forms(self, deploy_files, call, error,
                                            message):
        model, weights, _ = deploy_files
        with pytest.raises(error, match=message) as info:
            call(model, weights)
        # Every message lists pycaffe's forms.
        text = str(info.value)
        assert "Net(model, weights, phase)" in text
        assert "Net(model, phase, level=0, stages=None, weights=None)" in text


# ======================================================== pycaffe's methods
class TestForwardAll:

    @pytest.fixture(autouse=True)
    def _net(self, deploy_files):
        self.net = netlite.Net(deploy_files[0], netlite.TEST, dtype=np.float64)
        w, b = (blob.data for blob in self.net.params["ip"])
        self.w, self.b = w.copy(), b.copy()

    def _expected(self, x):
        ip = x @ self.w.T + self.b
        e = np.exp(ip - ip.max(axis=1, keepdims=True))
        return ip, e / e.sum(axis=1, keepdims=True)

    @pytest.mark.parametrize("n", [1, 4, 8, 10])
    def test_forward_all_batches_and_pads(self, n):
        x = np.random.default_rng(n).normal(size=(n, 3))
        out = self.net.forward_all(data=x, blobs=["ip"])
        ip, prob = self._expected(x)
        assert sorted(out) == ["ip", "prob"]
        np.testing.assert_allclose(out["prob"], prob, rtol=1e-12)
        np.testing.assert_allclose(out["ip"], ip, rtol=1e-12)
        # The net keeps its batch size; the results are copies.
        assert self.net.blobs["data"].shape == (4, 3)
        assert not np.shares_memory(out["prob"], self.net.blobs["prob"].data)

    def test_forward_all_padding_is_zeros(self):
        x = np.random.default_rng(0).normal(size=(6, 3))
        self.net.forward_all(data=x)
        # The last batch held items 4, 5 and two rows of zero padding.
        np.testing.assert_array_equal(self.net.blobs["data"].data[:2], x[4:])
        np.testing.assert_array_equal(self.net.blobs["data"].data[2:], 0)

    def test_forward_all_without_inputs_runs_once(self):
        self.net.blobs["data"].data[...] = 1.0
        out = self.net.forward_all()
        np.testing.assert_allclose(out["prob"], self._expected(np.ones((4, 3)))[1])

    def test_forward_all_rejects_ragged_inputs(self):
        text = """layer { name: 'input' type: 'Input' top: 'data' top: 'other'
                          input_param { shape { dim: 4 dim: 3 }
                                        shape { dim: 4 } } }"""
        net = netlite.Net(text, netlite.TEST)
        with pytest.raises(ValueError, match="arrays of one length"):
            net.forward_all(data=np.zeros((5, 3)), other=np.zeros(6))
        with pytest.raises(ValueError, match="at least one item"):
            net.forward_all(data=np.zeros((0, 3)), other=np.zeros(0))
        with pytest.raises(KeyError, match="'nope' is not an input"):
            self.net.forward_all(nope=np.zeros((5, 3)))

    def test_forward_all_stacks_per_batch_values(self):
        # A loss (no batch axis) comes back once per batch.
        text = _DEPLOY.replace(
            "layer { name: 'prob' type: 'Softmax' bottom: 'ip' top: 'prob' }",
            "layer { name: 'in2' type: 'Input' top: 'target' "
            "input_param { shape { dim: 4 dim: 5 } } } "
            "layer { name: 'loss' type: 'EuclideanLoss' bottom: 'ip' "
            "bottom: 'target' top: 'loss' }")
        net = netlite.Net(text, netlite.TEST, dtype=np.float64)
        x = np.random.default_rng(1).normal(size=(8, 3))
        t = np.random.default_rng(2).normal(size=(8, 5))
        out = net.forward_all(data=x, target=t)
        assert out["loss"].shape == (2,)
        for k in range(2):
            one = net.forward(data=x[4 * k:4 * k + 4], target=t[4 * k:4 * k + 4])
            assert out["loss"][k] == pytest.approx(float(one["loss"]))

    def test_forward_backward_all(self):
        text = "force_backward: true " + _DEPLOY.replace(
            "layer { name: 'prob' type: 'Softmax' bottom: 'ip' top: 'prob' }", "")
        net = netlite.Net(text, netlite.TEST, dtype=np.float64)
        w, b = (blob.data.copy() for blob in net.params["ip"])
        gen = np.random.default_rng(3)
        x, dy = gen.normal(size=(7, 3)), gen.normal(size=(7, 5))
        outs, diffs = net.forward_backward_all(data=x, ip=dy)
        np.testing.assert_allclose(outs["ip"], x @ w.T + b, rtol=1e-12)
        np.testing.assert_allclose(diffs["data"], dy @ w, rtol=1e-12)
        assert outs["ip"].shape == (7, 5) and diffs["data"].shape == (7, 3)
        with pytest.raises(KeyError, match="neither an input nor an output"):
            net.forward_backward_all(prob=dy)


class TestNetAttributes:

    @pytest.fixture(autouse=True)
    def _net(self, tmp_path):
        self.tmp_path = tmp_path
        self.net = netlite.Net(simple_net_file(13, tmp_path), netlite.TRAIN)

    def test_blob_loss_weights(self):
        assert self.net.blob_loss_weights == OrderedDict(
            [("data", 0.0), ("label", 0.0), ("conv", 0.0), ("ip_blob", 0.0),
             ("loss", 1.0)])

    def test_params_data_and_diff(self):
        weight, bias = self.net.params["conv"]
        assert weight.data.shape == (11, 2, 2, 2) and bias.data.shape == (11,)
        weight.data[...] = 0.5
        assert (self.net.layer_dict["conv"].blobs[0].data == 0.5).all()
        self.net.forward()
        self.net.backward()
        assert np.abs(weight.diff).sum() > 0
        assert list(self.net.params) == ["conv", "ip"]

    def test_forward_returns_asked_blobs(self):
        out = self.net.forward(blobs=["conv"])
        assert sorted(out) == ["conv", "loss"]
        out = self.net.forward(blobs=["conv"], end="ip")
        assert sorted(out) == ["conv", "ip_blob"]
        with pytest.raises(KeyError, match="no blob named 'nope'"):
            self.net.forward(blobs=["nope"])

    def test_backward_returns_asked_diffs(self):
        self.net.forward()
        out = self.net.backward(diffs=["conv", "data"])
        assert sorted(out) == ["conv", "data"]
        assert np.abs(out["data"]).sum() > 0

    def test_wrong_order_of_start_and_end(self):
        with pytest.raises(ValueError, match="forward runs upwards"):
            self.net.forward(start="ip", end="conv")
        with pytest.raises(ValueError, match="backward runs downwards"):
            self.net.backward(start="conv", end="ip")
        with pytest.raises(KeyError, match="no layer named 'nope'"):
            self.net.forward(start="nope")
        # A single bound never conflicts; a net without layers runs nothing.
        assert sorted(self.net.forward(start="loss")) == ["loss"]
        assert netlite.Net("name: 'empty'").forward() == {}

    def test_share_with_and_copy_from(self):
        netlite.set_random_seed(3)
        other = netlite.Net(simple_net_file(13, self.tmp_path), netlite.TEST)
        assert not np.array_equal(other.params["ip"][0].data,
                                  self.net.params["ip"][0].data)
        other.share_with(self.net)
        assert other.params["ip"][0].shares_data_with(self.net.params["ip"][0])
        path = self.tmp_path / "w.caffemodel"
        self.net.save(str(path))
        netlite.set_random_seed(4)
        third = netlite.Net(simple_net_file(13, self.tmp_path), netlite.TEST)
        third.copy_from(str(path))
        np.testing.assert_array_equal(third.params["conv"][0].data,
                                      self.net.params["conv"][0].data)

    def test_reshape(self):
        text = _DEPLOY
        net = netlite.Net(text, netlite.TEST)
        net.blobs["data"].reshape(7, 3)
        net.reshape()
        assert net.blobs["prob"].shape == (7, 5)


# ========================================================== module-level API
PYCAFFE_NAMES = ["Net", "SGDSolver", "NesterovSolver", "AdaGradSolver",
                 "RMSPropSolver", "AdaDeltaSolver", "AdamSolver", "set_mode_cpu",
                 "set_mode_gpu", "set_device", "Layer", "get_solver",
                 "layer_type_list", "set_random_seed", "TRAIN", "TEST", "NetSpec"]


@pytest.mark.parametrize("name", PYCAFFE_NAMES)
def test_pycaffe_module_names(name):
    assert hasattr(netlite, name), f"netlite.{name} is missing"
    assert name in netlite.__all__


def test_phases_and_mode_functions():
    assert (netlite.TRAIN, netlite.TEST) == (0, 1)  # caffe_pb2's values
    netlite.set_mode_cpu()
    assert netlite.Net(_DEPLOY).device == "cpu"


SOLVER_CLASSES = ["SGDSolver", "NesterovSolver", "AdaGradSolver",
                  "RMSPropSolver", "AdaDeltaSolver", "AdamSolver"]


@pytest.fixture
def solver_file(tmp_path):
    net_f = simple_net_file(13, tmp_path)
    f = tmp_path / "solver.prototxt"
    f.write_text(f"""net: '{net_f}' base_lr: 0.01
        lr_policy: 'multistep' gamma: 0.1 stepvalue: 2 stepvalue: 3
        max_iter: 5 snapshot_prefix: '{tmp_path / "s"}' """)
    return str(f)


@pytest.mark.parametrize("name", SOLVER_CLASSES)
def test_solver_classes_from_a_path(name, solver_file):
    # pycaffe's caffe.AdamSolver(path): the class, whatever the file's type.
    solver = getattr(netlite, name)(solver_file)
    assert type(solver).__name__ == name
    assert solver.type == name[: -len("Solver")]
    solver.step(1)
    assert solver.iter == 1


def test_get_solver_picks_the_files_type(solver_file):
    solver = netlite.get_solver(solver_file)
    assert type(solver) is netlite.SGDSolver


def test_solver_lr_is_the_next_rate_and_reads_nothing(solver_file):
    solver = netlite.SGDSolver(solver_file)
    rates = []
    solver.add_callback(on_iteration=lambda it, loss, smooth, lr: rates.append(lr))
    seen = []
    for _ in range(4):
        step = solver.current_step
        seen.append(solver.lr)
        # Reading changes nothing (Caffe's GetLearningRate would advance
        # the multistep position).
        assert solver.lr == seen[-1] and solver.current_step == step
        solver.step(1)
    assert rates == pytest.approx([0.01, 0.01, 0.001, 0.0001])
    assert seen == pytest.approx(rates)


def test_solver_share_weights(solver_file, tmp_path):
    solver = netlite.SGDSolver(solver_file)
    netlite.set_random_seed(5)
    net = netlite.Net(simple_net_file(13, tmp_path), netlite.TEST)
    solver.share_weights(net)
    assert net.params["ip"][0].shares_data_with(solver.net.params["ip"][0])
    solver.step(1)
    np.testing.assert_array_equal(net.params["ip"][0].data,
                                  solver.net.params["ip"][0].data)


def test_solver_pycaffe_attributes(solver_file, tmp_path):
    solver = netlite.SGDSolver(solver_file)
    assert isinstance(solver.net, netlite.Net) and solver.test_nets == []
    assert solver.param.base_lr == pytest.approx(0.01)
    solver.solve()
    assert solver.iter == 5
    path = solver.snapshot()
    assert path.endswith("s_iter_5.solverstate")
    fresh = netlite.SGDSolver(solver_file)
    fresh.restore(path)
    assert fresh.iter == 5
    np.testing.assert_array_equal(fresh.net.params["ip"][0].data,
                                  solver.net.params["ip"][0].data)


# ================================================ no silent zero gradients
_LOSS_NET = _DEPLOY.replace(
    "layer { name: 'prob' type: 'Softmax' bottom: 'ip' top: 'prob' }",
    "layer { name: 'in2' type: 'Input' top: 'label' "
    "input_param { shape { dim: 4 } } } "
    "layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'ip' bottom: 'label' "
    "top: 'loss' }")


class TestNoSilentZeroGradients:

    def test_deploy_net_warns_once(self, quiet):
        net = netlite.Net(_DEPLOY, netlite.TEST)
        net.forward(data=np.ones((4, 3)))
        with pytest.warns(netlite.NetliteWarning) as record:
            diffs = net.backward(prob=np.ones((4, 5)))
        assert len(record) == 1
        message = str(record[0].message)
        assert "force_backward: true" in message
        assert "net 'deploy'" in message and "the net has no loss" in message
        assert record[0].filename == __file__  # points at the caller
        assert not diffs["data"].any()
        # Once per net: the second call is quiet (warnings are errors here).
        net.backward(prob=np.ones((4, 5)))
        # Another net warns again.
        other = netlite.Net(_DEPLOY, netlite.TEST)
        with pytest.warns(netlite.NetliteWarning, match="force_backward"):
            other.backward()

    def test_is_a_user_warning(self):
        assert issubclass(netlite.NetliteWarning, UserWarning)
        net = netlite.Net(_DEPLOY, netlite.TEST)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("ignore", netlite.NetliteWarning)
            net.backward()
        assert record == []

    def test_force_backward_does_not_warn(self, quiet):
        net = netlite.Net("force_backward: true " + _DEPLOY, netlite.TEST)
        net.forward(data=np.ones((4, 3)))
        diffs = net.backward(prob=np.random.default_rng(0).normal(size=(4, 5)))
        assert np.abs(diffs["data"]).sum() > 0

    def test_loss_net_does_not_warn(self, quiet):
        net = netlite.Net(_LOSS_NET, netlite.TRAIN)
        net.forward(data=np.ones((4, 3)), label=np.arange(4))
        net.backward()
        assert np.abs(net.params["ip"][0].diff).sum() > 0
        outs, diffs = net.forward_backward_all(data=np.ones((4, 3)),
                                               label=np.arange(4))
        assert np.abs(net.params["ip"][0].diff).sum() > 0

    def test_loss_without_anything_to_learn_warns(self):
        # A loss straight on the inputs: nothing below it needs a gradient.
        text = """name: 'loss_only'
            layer { name: 'input' type: 'Input' top: 'score' top: 'label'
                    input_param { shape { dim: 4 dim: 5 } shape { dim: 4 } } }
            layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'score'
                    bottom: 'label' top: 'loss' }"""
        net = netlite.Net(text, netlite.TRAIN)
        assert not any(net.layer_need_backward)
        net.forward(score=np.ones((4, 5)), label=np.arange(4))
        with pytest.warns(netlite.NetliteWarning,
                          match="no parameter under the loss has lr_mult != 0"):
            net.backward()
        # force_backward gives the score's gradient.
        net = netlite.Net("force_backward: true " + text, netlite.TRAIN)
        net.forward(score=np.ones((4, 5)), label=np.arange(4))
        assert np.abs(net.backward()["score"]).sum() > 0

    def test_partial_backward_names_the_layers(self, quiet):
        text = _LOSS_NET + (
            "layer { name: 'accuracy' type: 'Accuracy' bottom: 'ip' "
            "bottom: 'label' top: 'accuracy' }")
        net = netlite.Net(text, netlite.TEST)
        net.forward(data=np.ones((4, 3)), label=np.arange(4))
        net.backward()  # the loss reaches ip: quiet
        with pytest.warns(netlite.NetliteWarning,
                          match="no layer from 'accuracy' down to 'accuracy'"):
            net.backward(start="accuracy", end="accuracy")
