"""quant_modules.initialize / deactivate: reversible patching of torch.nn."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

import torch.nn.modules.conv
import torch.nn.modules.linear
import torch.nn.modules.rnn
from mixq.errors import ModelError
from mixq.quant import modules as qm
from mixq.quant import quant_modules
from mixq.quant.rnn import QuantLSTM, QuantLSTMCell

ORIGINAL = {cls.__name__: cls for cls in qm.QUANT_MAP}


def nn_namespaces() -> dict[str, types.ModuleType]:
    return {n: m for n, m in sys.modules.items()
            if n == "torch.nn" or n == "torch.nn.modules" or n.startswith("torch.nn.modules.")}


def snapshot() -> dict[str, dict[str, object]]:
    # Warnings raised inside torch add __warningregistry__ to a module; that is not our doing.
    return {n: {k: v for k, v in vars(m).items() if k != "__warningregistry__"} for n, m in nn_namespaces().items()}


def assert_same(before, after) -> None:
    assert before.keys() == after.keys()
    for mod in before:
        assert before[mod].keys() == after[mod].keys(), mod
        changed = [k for k, v in before[mod].items() if after[mod][k] is not v]
        assert not changed, f"{mod}: {changed} not restored"


@pytest.fixture(autouse=True)
def _always_deactivate():
    yield
    quant_modules.deactivate()
    assert nn.Conv2d is ORIGINAL["Conv2d"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 6)
        self.lstm = nn.LSTM(6, 5, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(self.pool(self.act(self.conv(x))).flatten(1))
        return self.lstm(y.unsqueeze(1).repeat(1, 3, 1))[0]


def test_initialize_patches_every_place_a_class_is_reachable():
    quant_modules.initialize()
    assert quant_modules.is_active()
    for float_cls, quant_cls in qm.QUANT_MAP.items():
        name = float_cls.__name__
        assert getattr(nn, name) is quant_cls
        assert getattr(torch.nn.modules, name) is quant_cls
        assert getattr(sys.modules[float_cls.__module__], name) is quant_cls
    assert torch.nn.modules.conv.Conv2d is qm.QuantConv2d and torch.nn.modules.rnn.LSTM is QuantLSTM
    assert nn.ReLU.__module__.startswith("torch.")  # classes without a quant version are untouched


def test_deactivate_restores_torch_nn_exactly():
    before = snapshot()
    quant_modules.initialize()
    assert snapshot() != before
    Net()
    quant_modules.deactivate()
    assert not quant_modules.is_active()
    assert_same(before, snapshot())
    quant_modules.deactivate()  # a second deactivate is a no-op
    assert_same(before, snapshot())


def test_double_initialize_keeps_the_originals():
    before = snapshot()
    quant_modules.initialize()
    quant_modules.initialize()
    assert nn.Linear is qm.QuantLinear
    quant_modules.initialize(float_module_list=["Linear"])  # re-initializing starts from the originals
    assert nn.Linear is ORIGINAL["Linear"] and nn.Conv2d is qm.QuantConv2d
    quant_modules.deactivate()
    assert_same(before, snapshot())


def test_float_module_list_is_left_float():
    quant_modules.initialize(float_module_list=["Linear", "LSTM"])
    assert nn.Linear is ORIGINAL["Linear"] and torch.nn.modules.linear.Linear is ORIGINAL["Linear"]
    assert nn.LSTM is ORIGINAL["LSTM"] and nn.LSTMCell is QuantLSTMCell
    net = Net()
    assert type(net.fc) is ORIGINAL["Linear"] and type(net.conv) is qm.QuantConv2d


def test_unknown_float_module_name_raises_and_patches_nothing():
    before = snapshot()
    with pytest.raises(ModelError, match="Did you mean 'Linear'"):
        quant_modules.initialize(float_module_list=["Linaer"])
    assert not quant_modules.is_active()
    assert_same(before, snapshot())


def test_custom_quant_modules():
    class Foo(nn.Module):
        pass

    class QuantFoo(Foo):
        pass

    class MyQuantConv2d(qm.QuantConv2d):
        pass

    fake = types.ModuleType("fake_layers")
    fake.Foo = Foo
    before = snapshot()
    quant_modules.initialize(custom_quant_modules=[(fake, "Foo", QuantFoo), (fake, "Bar", QuantFoo),
                                                   (nn, "Conv2d", MyQuantConv2d)])
    assert fake.Foo is QuantFoo and fake.Bar is QuantFoo
    assert nn.Conv2d is MyQuantConv2d and torch.nn.modules.conv.Conv2d is qm.QuantConv2d
    quant_modules.deactivate()
    assert fake.Foo is Foo and not hasattr(fake, "Bar")
    assert_same(before, snapshot())


@pytest.mark.parametrize("bad", [("Conv2d", qm.QuantConv2d), (nn, "Conv2d", "QuantConv2d"), (nn, 3, qm.QuantConv2d)])
def test_malformed_custom_entry_raises(bad):
    with pytest.raises(ModelError, match="custom_quant_modules"):
        quant_modules.initialize(custom_quant_modules=[bad])
    assert nn.Conv2d is ORIGINAL["Conv2d"]


def test_every_patched_class_constructs_with_float_arguments():
    quant_modules.initialize()
    built = [nn.Conv1d(2, 3, 3), nn.Conv2d(2, 3, 3, stride=2, bias=False), nn.Conv3d(2, 3, 1),
             nn.ConvTranspose1d(2, 3, 3), nn.ConvTranspose2d(2, 3, 3, groups=1), nn.ConvTranspose3d(2, 3, 1),
             nn.Linear(4, 5, bias=False), nn.LSTM(4, 5, num_layers=2, bidirectional=True), nn.LSTMCell(4, 5),
             nn.AvgPool1d(2), nn.AvgPool2d(2, stride=1), nn.AvgPool3d(2), nn.AdaptiveAvgPool1d(2),
             nn.AdaptiveAvgPool2d((2, 3)), nn.AdaptiveAvgPool3d(1)]
    for m in built:
        assert isinstance(m, qm.QuantMixin) and type(m) in qm.QUANT_MAP.values()
        assert isinstance(m, tuple(ORIGINAL.values()))
        assert m.backend == "ort-cpu" and m.active_format == "int8"
    extra = nn.Conv2d(3, 4, 3, backend="tensorrt", formats=("int8", "fp8_e4m3"))
    assert extra.backend == "tensorrt" and extra.formats == ("int8", "fp8_e4m3")


def test_model_built_while_patched_holds_quant_modules_and_runs():
    torch.manual_seed(0)
    quant_modules.initialize()
    net = Net().eval()
    assert isinstance(net.conv, qm.QuantConv2d) and isinstance(net.fc, qm.QuantLinear)
    assert isinstance(net.pool, qm.QuantAdaptiveAvgPool2d) and isinstance(net.lstm, QuantLSTM)
    assert type(net.act) is nn.ReLU
    layers = dict(qm.quant_layers(net))
    assert set(layers) == {"conv", "pool", "fc", "lstm"}
    x = torch.randn(4, 3, 8, 8)
    for m in layers.values():
        m.begin_calibration()
    with torch.no_grad():
        net(x)
    for m in layers.values():
        m.end_calibration()
    with torch.no_grad():
        out = net(x)  # still patched: the quant classes' super() calls must not recurse
    quant_modules.deactivate()
    float_net = Net().eval()
    assert type(float_net.conv) is ORIGINAL["Conv2d"]
    float_net.load_state_dict({k: v for k, v in net.state_dict().items() if "quantizers" not in k})
    with torch.no_grad():
        ref = float_net(x)
        err = float((out - ref).norm() / ref.norm())
        assert 0 < err < 0.05
        for m in layers.values():
            m.set_format("fp32")
        assert torch.equal(net(x), ref)


def test_model_built_while_patched_can_be_quantized_by_plan():
    import mixq
    from mixq.quant import quant_modules

    quant_modules.initialize()
    try:
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    finally:
        quant_modules.deactivate()
    x = torch.randn(2, 1, 4, 4)
    for backend in ("ort-cpu", "tensorrt"):
        q = mixq.quantize(model.eval(), "int8", backend=backend, calib_data=[x])
        assert q.mixq.mode == "fx" and set(q.mixq.kinds) == {"0", "3"}
        assert q.get_submodule("0").backend == backend
        assert q(x).shape == (2, 3)
