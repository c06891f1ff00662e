"""The built-in spikingjelly and norse adapters, on the real libraries, against recorded tensors.

Both libraries declare torchvision (which has no CPU build on the CI image), so CI installs them
without their declared dependencies: ``pip install --no-deps spikingjelly==2.0.0 norse==1.1.0 loguru
nir nirtorch h5py``. The tests skip with that hint where they are missing.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import stabwatch as sw
from tests.spiking.snn_models import Recorder, assert_matches, reference

_HINT = "install with: pip install --no-deps spikingjelly==2.0.0 norse==1.1.0 loguru nir nirtorch h5py"
T, B = 6, 5
ONLY_SPIKING = {"update": None, "grad_sv": None, "weight": None, "activation": None, "spiking": 1}


def _step(model: nn.Module, x: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with sw.Monitor(model, opt, every=ONLY_SPIKING, alerts=False) as mon:
        out = model(x)
        loss = (out[0] if isinstance(out, tuple) else out).sum()
        loss.backward()
        opt.step()
        return mon.step(loss=loss)


def _x(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2.0


# spikingjelly ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sj():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        neuron = pytest.importorskip("spikingjelly.activation_based.neuron", reason=_HINT)
        from spikingjelly.activation_based import functional
    return neuron, functional


def test_spikingjelly_single_step(sj):
    neuron, functional = sj

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.n1 = nn.Linear(8, 12), neuron.LIFNode(tau=2.0, step_mode="s")
            self.fc2, self.n2 = nn.Linear(12, 4), neuron.IFNode(v_threshold=0.5, step_mode="s")
            self.simple = neuron.SimpleLIFNode(tau=2.0, decay_input=True)  # a SimpleBaseNode, not a BaseNode
            self.rec = Recorder()

        def forward(self, x):
            functional.reset_net(self)
            out = []
            for t in range(x.shape[0]):
                s1 = self.n1(self.fc1(x[t]))
                self.rec.add("n1", s1, self.n1.v, self.n1.v_threshold)  # v after the reset
                s2 = self.n2(self.fc2(s1) * 3)
                self.rec.add("n2", s2, self.n2.v, self.n2.v_threshold)
                s3 = self.simple(self.fc2(s1) * 3)
                self.rec.add("simple", s3, self.simple.v, self.simple.v_threshold)
                out.append(s2 + s3)
            return torch.stack(out)

    model = Net()
    rec = _step(model, _x(0, (T, B, 8)))
    assert_matches(rec, reference(model.rec))


@pytest.mark.parametrize("store_v_seq", [False, True])
def test_spikingjelly_multi_step(sj, store_v_seq):
    neuron, functional = sj
    from spikingjelly.activation_based import layer

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.fc = layer.Linear(8, 12, step_mode="m")
            self.node = neuron.LIFNode(step_mode="m", store_v_seq=store_v_seq)
            self.rec = Recorder()

        def forward(self, x):
            functional.reset_net(self)
            s = self.node(self.fc(x))  # the whole sequence [T, B, 12] in one call
            # its membrane: every step's v with store_v_seq, else only the last step's
            v = self.node.v_seq if store_v_seq else self.node.v
            self.rec.add("node", s, v, self.node.v_threshold, tdim=0)
            return s

    model = Net()
    rec = _step(model, _x(1, (T, B, 8)))
    assert_matches(rec, reference(model.rec))


# norse ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nt():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("norse.torch", reason=_HINT)


@pytest.mark.parametrize("record_states", [False, True])
def test_norse_lif_and_cells(nt, record_states):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(2)
            self.fc1, self.lif = nn.Linear(8, 12), nt.LIF(record_states=record_states)
            self.fc2, self.cell = nn.Linear(12, 4), nt.LIFCell()
            self.refrac = nt.LIFRefracCell()  # state.lif.v, p.lif.v_th
            self.li = nt.LICell()  # a leaky integrator: its output is a voltage, not spikes
            self.rec = Recorder()

        def forward(self, x):
            z, state = self.lif(self.fc1(x))  # time-major [T, B, 12]
            self.rec.add("lif", z, state.v, self.lif.p.v_th, tdim=0)
            s_cell = s_ref = s_li = None
            out = []
            for t in range(z.shape[0]):
                inp = self.fc2(z[t]) * 4
                o, s_cell = self.cell(inp, s_cell)
                self.rec.add("cell", o, s_cell.v, self.cell.p.v_th)
                o2, s_ref = self.refrac(inp, s_ref)
                self.rec.add("refrac", o2, s_ref.lif.v, self.refrac.p.lif.v_th)
                v_li, s_li = self.li(inp, s_li)
                out.append(o + o2 + v_li)
            return torch.stack(out)

    model = Net()
    rec = _step(model, _x(2, (T, B, 8)))
    assert_matches(rec, reference(model.rec))
    assert "li" not in rec.layers
