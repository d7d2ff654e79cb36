"""sparge_compile.batches, the one batch helper of distill() and calibrate(): moving nested
batches to a device (containers keep their type), calling a model on one, taking batches."""
from __future__ import annotations

import collections

import pytest
import torch

import sparge_compile as sc
from sparge_compile import batches as B

Pair = collections.namedtuple("Pair", "x t")
META = torch.device("meta")


def test_to_device_keeps_every_container_type():
    x, t = torch.randn(2, 3), torch.arange(2)
    dd = collections.defaultdict(list, {"x": x})
    batch = [Pair(x, (t, 1.5)), collections.OrderedDict(a=x, b="keep"), dd, (x,), "s", None]
    moved = B.to_device(batch, META)
    assert type(moved) is list and len(moved) == len(batch)
    assert type(moved[0]) is Pair and moved[0].x.device == META and moved[0].t[1] == 1.5
    assert type(moved[1]) is collections.OrderedDict
    assert list(moved[1]) == ["a", "b"] and moved[1]["b"] == "keep"
    assert type(moved[2]) is collections.defaultdict and moved[2].default_factory is list
    assert moved[2]["x"].device == META and dd["x"].device.type == "cpu"     # the input is left alone
    assert moved[3][0].device == META and moved[4:] == ["s", None]
    assert B.to_device(batch, None) is batch
    same = B.to_device((x,), x.device)
    assert same[0] is x                                                       # already there: not copied


def test_call_args_and_describe():
    x = torch.zeros(2, 3, dtype=torch.float16)
    assert B.call_args(Pair(x, 1)) == ((x, 1), {})
    assert B.call_args({"a": x}) == ((), {"a": x})
    assert B.call_args(x)[0][0] is x and B.call_args(x)[1] == {}
    assert B.describe({"a": Pair(x, 1)}) == "{a: (Tensor(2, 3) float16 on cpu, int)}"


def test_take_batches_and_stream():
    class Oops(RuntimeError):
        pass

    assert B.take_batches(lambda i: i, None, "f", Oops) == [0, 1, 2, 3]
    assert B.take_batches(iter(range(10)), 3, "f", Oops) == [0, 1, 2]
    for bad in (torch.zeros(2), {"x": 1}, torch.nn.Linear(1, 1), 5):
        with pytest.raises(Oops, match=r"f: inputs must be .*"):
            B.take_batches(bad, None, "f", Oops)
    with pytest.raises(Oops, match=r"inputs\(1\) raised ZeroDivisionError"):
        B.take_batches(lambda i: 1 / (1 - i), 2, "f", Oops)
    with pytest.raises(Oops, match="no input batches"):
        B.take_batches([], None, "f", Oops)
    s = B.BatchStream([10, 11, 12], start=2, who="f", error=Oops)         # resumed: 2 batches used
    assert [s.get(i) for i in range(2, 6)] == [12, 10, 11, 12]             # epochs wrap
    once = B.BatchStream(iter([1, 2]), start=0, who="f", error=Oops)
    assert [once.get(0), once.get(1)] == [1, 2]
    with pytest.raises(Oops, match="ran out after 2 batches"):
        once.get(2)


def test_flow_matching_inputs_with_namedtuple_cond():
    cond = Pair(torch.arange(8.0)[:, None], torch.arange(8))
    draw = sc.flow_matching_inputs(torch.randn(8, 4), cond, batch_size=3, seed=1)
    x_t, t, c = draw(0)
    assert type(c) is Pair and c.x.shape == (3, 1) and torch.equal(c.x[:, 0].long(), c.t)   # the same rows
    with pytest.raises(TypeError, match="cond must be a tensor"):
        sc.flow_matching_inputs(torch.randn(8, 4), ("text",), batch_size=2)(0)
