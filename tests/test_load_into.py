"""``gs.load_into``: a training state of Statefuls (module, optimizer, LR scheduler, GradScaler) saved
in one call and restored in place into freshly built objects, as torch DCP's ``Stateful``.

The restored objects must continue training bit-identically with the originals (the optimizer
restored never stepped, so its moments are built from the checkpoint); missing and unexpected keys
are reported as torch's ``load_state_dict`` reports them, or refused (typed, naming them) before
anything in the target changes.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpusaver as gs
from gpusaver.api import LoadResult, load_into
from gpusaver.errors import (
    DTypeMismatchError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    ShapeMismatchError,
    TensorNotFoundError,
)

torch = pytest.importorskip("torch")

X = torch.linspace(-1, 1, 64).reshape(16, 4)
Y = torch.sin(X[:, :2] * 3)


def _build(seed: int, layers: int = 2, dtype: Any = None):
    torch.manual_seed(seed)
    mods = [torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)]
    if layers == 3:
        mods += [torch.nn.ReLU(), torch.nn.Linear(2, 2)]
    model = torch.nn.Sequential(*mods)
    if dtype is not None:
        model = model.to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    return model, opt, sched, scaler


def _train(model, opt, sched, scaler, n: int) -> list[torch.Tensor]:
    losses = []
    for _ in range(n):
        opt.zero_grad()
        loss = ((model(X) - Y) ** 2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        losses.append(loss.detach().clone())
    return losses


def _snapshot(*objects: Any) -> list[Any]:
    return [copy.deepcopy(o.state_dict()) for o in objects]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# ------------------------------------------------------------------------ training state
def test_fresh_objects_restored_in_place_train_on_bit_identically(tmp_path: Path) -> None:
    model, opt, sched, scaler = _build(0)
    assert scaler.is_enabled() and scaler.state_dict()  # CPU GradScaler is live in this torch
    _train(model, opt, sched, scaler, 5)
    prefix = gs.save({"model": model, "optim": opt, "sched": sched, "scaler": scaler, "step": 7}, tmp_path / "s7")
    names = {n for n, _ in gs.list_variables(prefix)}
    assert {"model/0.weight", "optim/state/0/exp_avg", "optim/state/0/exp_avg_sq"} <= names

    model2, opt2, sched2, scaler2 = _build(1)
    assert opt2.state_dict()["state"] == {}  # never stepped: no moments to write into
    params_before = [p for p in model2.parameters()]
    target = {"model": model2, "optim": opt2, "sched": sched2, "scaler": scaler2, "step": 0}
    result = load_into(target, prefix)
    assert result == LoadResult([], []) and isinstance(result, tuple)
    assert target["step"] == 7 and type(target["step"]) is int
    assert [p for p in model2.parameters()] == params_before  # the same Parameters, written into
    assert _same(model2.state_dict(), model.state_dict())
    assert _same(opt2.state_dict(), opt.state_dict())
    assert sched2.state_dict() == sched.state_dict() and scaler2.state_dict() == scaler.state_dict()
    for p in model2.parameters():  # the moments were built on their parameters' device and dtype
        state = opt2.state[p]
        assert state["exp_avg"].device == p.device and state["exp_avg"].dtype == p.dtype
        assert state["exp_avg"].data_ptr() != p.data_ptr()

    a = _train(model, opt, sched, scaler, 6)
    b = _train(model2, opt2, sched2, scaler2, 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), (a, b)
    assert _same(model2.state_dict(), model.state_dict())
    assert _same(opt2.state_dict(), opt.state_dict())


def test_an_optimizer_gets_its_moments_in_its_parameters_dtype(tmp_path: Path) -> None:
    # torch's Optimizer.load_state_dict casts (and moves) floating state to each parameter's
    # dtype (and device); 'step' stays as it was stored.
    model, opt, sched, scaler = _build(0, dtype=torch.float64)
    opt.zero_grad()
    ((model(X.double()) - Y.double()) ** 2).mean().backward()
    opt.step()
    prefix = gs.save({"optim": opt}, tmp_path / "o")
    model32, opt32, _, _ = _build(1)
    load_into({"optim": opt32}, prefix)
    for p in model32.parameters():
        assert opt32.state[p]["exp_avg"].dtype == torch.float32 == p.dtype
        assert opt32.state[p]["step"].dtype == torch.float32
    want = [opt.state[p]["exp_avg"].float() for p in model.parameters()]
    assert all(torch.equal(opt32.state[p]["exp_avg"], w) for p, w in zip(model32.parameters(), want))


def test_an_optimizer_of_another_model_is_refused_before_anything_changes(tmp_path: Path) -> None:
    model, opt, sched, scaler = _build(0)
    _train(model, opt, sched, scaler, 1)
    prefix = gs.save({"model": model, "optim": opt}, tmp_path / "c")
    other = torch.nn.Linear(4, 2)
    other_opt = torch.optim.AdamW(other.parameters())
    model2 = _build(1)[0]
    before = _snapshot(model2, other_opt)
    with pytest.raises(InvalidArgumentError, match=r"'optim'.*\[2\].*\[4\]"):
        load_into({"model": model2, "optim": other_opt}, prefix)
    assert all(_same(x, y) for x, y in zip(_snapshot(model2, other_opt), before))


# ------------------------------------------------------------------ missing and unexpected
def _mismatched(tmp_path: Path):
    model = _build(0)[0]
    prefix = gs.save({"model": model, "extra": np.arange(3.0), "step": 7, "tail": [1, 2]}, tmp_path / "c")
    model3, opt3, sched3, _ = _build(1, layers=3)
    target = {"step": 0, "model": model3, "other": np.zeros(2), "sched": sched3, "tail": [0, 0]}
    return model, prefix, target


def test_not_strict_restores_what_fits_and_reports_the_keys_as_torch_does(tmp_path: Path) -> None:
    model, prefix, target = _mismatched(tmp_path)
    model3 = target["model"]
    head = {k: v.clone() for k, v in model3.state_dict().items() if k.startswith("4.")}
    sched_before = target["sched"].state_dict()
    result = load_into(target, prefix, strict=False)
    # missing in the target's order (as the module lists them), unexpected in the checkpoint's order
    assert result.missing_keys == ["model/4.weight", "model/4.bias", "other", "sched"]
    assert result.unexpected_keys == ["extra"]
    torch_missing = model3.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert ["model/" + k for k in torch_missing] == result.missing_keys[:2]  # torch's own order
    for k, v in model.state_dict().items():
        assert torch.equal(model3.state_dict()[k], v), k
    assert all(torch.equal(model3.state_dict()[k], v) for k, v in head.items())
    assert target["step"] == 7 and target["tail"] == [1, 2]
    assert (target["other"] == 0).all() and target["sched"].state_dict() == sched_before


def test_strict_names_the_missing_keys_and_changes_nothing(tmp_path: Path) -> None:
    _, prefix, target = _mismatched(tmp_path)
    before = _snapshot(target["model"], target["sched"])
    with pytest.raises(TensorNotFoundError, match=r"'model/4\.weight', 'model/4\.bias', 'other', 'sched'") as info:
        load_into(target, prefix)
    assert info.value.name == "model/4.weight"
    assert all(_same(x, y) for x, y in zip(_snapshot(target["model"], target["sched"]), before))
    assert target["step"] == 0 and target["tail"] == [0, 0] and (target["other"] == 0).all()


def test_strict_names_the_unexpected_keys_and_changes_nothing(tmp_path: Path) -> None:
    model = _build(0)[0]
    prefix = gs.save({"model": model, "extra": np.arange(3.0), "more": {"x": 1}, "step": 7}, tmp_path / "c")
    model2 = _build(1)[0]
    before = _snapshot(model2)
    target = {"model": model2, "step": 0}
    with pytest.raises(InvalidArgumentError, match=r"'extra', 'more/x'"):
        load_into(target, prefix)
    assert _same(_snapshot(model2)[0], before[0]) and target["step"] == 0
    assert load_into(target, prefix, strict=False) == LoadResult([], ["extra", "more/x"])
    assert target["step"] == 7 and _same(model2.state_dict(), model.state_dict())


def test_a_tensor_that_does_not_fit_is_refused_before_anything_changes(tmp_path: Path) -> None:
    model = _build(0)[0]
    prefix = gs.save({"model": model, "step": 7}, tmp_path / "c")
    wider = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    target = {"model": wider, "step": 0}
    before = _snapshot(wider)
    with pytest.raises(ShapeMismatchError, match="2.weight"):
        load_into(target, prefix)
    assert _same(_snapshot(wider)[0], before[0]) and target["step"] == 0
    double = _build(1, dtype=torch.float64)[0]
    with pytest.raises(DTypeMismatchError, match="float64"):
        load_into({"model": double, "step": 0}, prefix)
    load_into({"model": double, "step": 0}, prefix, cast=True)
    assert all(torch.equal(double.state_dict()[k], v.double()) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------- other Statefuls
class Counter:
    """A Stateful of one's own, holding NumPy state."""

    def __init__(self) -> None:
        self.seen = np.zeros(3)
        self.name = ""
        self.loaded: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = state
        self.seen = state["seen"]
        self.name = state["name"]


class OnlyStateDict:
    def state_dict(self) -> dict[str, Any]:
        return {"w": np.ones(2)}


def test_any_object_with_both_methods_is_a_stateful_the_root_too(tmp_path: Path) -> None:
    c = Counter()
    c.seen += [1, 2, 3]
    c.name = "run-1"
    prefix = gs.save({"counter": c, "w": np.arange(2.0)}, tmp_path / "c")
    assert gs.load(prefix) == {"counter": {"seen": pytest.approx([1, 2, 3]), "name": "run-1"},
                               "w": pytest.approx([0, 1])}
    fresh = Counter()
    load_into({"counter": fresh, "w": np.zeros(2)}, prefix)
    assert fresh.name == "run-1" and isinstance(fresh.loaded["seen"], np.ndarray)  # NumPy for a NumPy object
    np.testing.assert_array_equal(fresh.seen, [1, 2, 3])
    root = gs.save(c, tmp_path / "root")  # one Stateful as the whole tree
    again = Counter()
    assert load_into(again, root) == LoadResult([], []) and again.name == "run-1"
    model = _build(0)[0]
    whole = gs.save(model, tmp_path / "model")
    model2 = _build(1)[0]
    load_into(model2, whole)
    assert _same(model2.state_dict(), model.state_dict())


def test_an_object_with_state_dict_but_no_load_state_dict_is_refused(tmp_path: Path) -> None:
    # It could be saved but never restored: refused, pointing at .state_dict(), before anything is written.
    with pytest.raises(InvalidArgumentTypeError, match=r"\['half'\].*no load_state_dict\(\).*\.state_dict\(\)"):
        gs.save({"half": OnlyStateDict(), "w": np.ones(2)}, tmp_path / "c")
    assert not list(tmp_path.iterdir())


def test_a_number_inside_a_tuple_cannot_be_restored_in_place(tmp_path: Path) -> None:
    prefix = gs.save({"pair": (np.ones(2), 5)}, tmp_path / "c")
    arr = np.zeros(2)
    with pytest.raises(InvalidArgumentError, match=r"\['pair'\]\[1\].*tuple"):
        load_into({"pair": (arr, 0)}, prefix)
    assert (arr == 0).all()
    target = {"pair": [arr, 0]}
    load_into(target, prefix)
    assert target["pair"][1] == 5 and (arr == 1).all()


def test_a_checkpoint_without_the_structure_is_refused(tmp_path: Path) -> None:
    prefix = gs.Saver({"w": np.ones(2)}).save(str(tmp_path / "plain"))
    with pytest.raises(InvalidArgumentError, match="not written by gpusaver.save"):
        load_into({"w": np.zeros(2)}, prefix)
