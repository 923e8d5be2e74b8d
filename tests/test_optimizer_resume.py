"""Resuming optimizers whose states torch creates at the first step (Adam): nothing is lost, mismatches are refused."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper

from helpers import make_kjt, random_bags
from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig
from torchrec_pss.checkpoint import load_training_state, save_training_state


class Tower(nn.Module):
    """A compressed table (fused in-backward Adagrad) under a dense layer (the optimizer under test)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        table = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=300, feature_names=["f"])
        self.ebc = CompressedEmbeddingBagCollection([table], {"t": RobeConfig(compression=10, chunk_size=4, seed=0)})
        apply_optimizer_in_backward(torch.optim.Adagrad, self.ebc.parameters(), {"lr": 0.1})
        self.dense = nn.Linear(8, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, step: int) -> torch.Tensor:
        rng = random.Random(step)
        return self.head(self.dense(self.ebc(make_kjt({"f": random_bags(rng, 300, 5, 3)})).values()))


def plain_adam(model: Tower, **kwargs: object) -> torch.optim.Optimizer:
    return torch.optim.Adam([*model.dense.parameters(), *model.head.parameters()], lr=0.05, **kwargs)


def keyed_adam(model: Tower) -> KeyedOptimizer:
    params = {f"{prefix}.{name}": p for prefix in ("dense", "head")
              for name, p in getattr(model, prefix).named_parameters()}
    return CombinedOptimizer([("dense", KeyedOptimizerWrapper(params, lambda ps: torch.optim.Adam(ps, lr=0.05)))])


def train(model: Tower, optimizer: torch.optim.Optimizer, steps: range) -> list[torch.Tensor]:
    losses = []
    for step in steps:
        optimizer.zero_grad()
        loss = model(step).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()["state"]
    return ({k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
            {k: {n: torch.as_tensor(t).clone() for n, t in s.items()} for k, s in state.items()})


def assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    assert a[0].keys() == b[0].keys() and a[1].keys() == b[1].keys()
    for part_a, part_b in zip(a, b):
        for key in part_a:
            if isinstance(part_a[key], dict):
                assert part_a[key].keys() == part_b[key].keys(), key
                for name in part_a[key]:
                    assert torch.equal(part_a[key][name], part_b[key][name]), (key, name)
            else:
                assert torch.equal(part_a[key], part_b[key]), key


@pytest.mark.parametrize("make", [plain_adam, keyed_adam], ids=["torch", "keyed"])
def test_a_fresh_adam_resumes_with_its_moments_and_trains_on_identically(tmp_path: Path,
                                                                         make: Callable) -> None:
    trained = Tower()
    optimizer = make(trained)
    train(trained, optimizer, range(3))
    path = save_training_state(str(tmp_path), 3, trained, {"dense": optimizer, "fused": trained.ebc.fused_optimizer})

    restored = Tower()
    fresh = make(restored)
    assert not fresh.state_dict()["state"]  # Adam has no state before its first step
    load_training_state(path, restored, {"dense": fresh, "fused": restored.ebc.fused_optimizer})
    assert_same(snapshot(restored, fresh), snapshot(trained, optimizer))
    assert all(p.grad is None for p in restored.parameters())  # the zero-rate step left no gradient behind
    assert fresh.param_groups[0]["lr"] == 0.05
    assert torch.equal(torch.stack(train(restored, fresh, range(3, 6))), torch.stack(train(trained, optimizer, range(3, 6))))


def test_a_checkpoint_taken_before_the_first_step_loads_into_a_fresh_adam(tmp_path: Path) -> None:
    model = Tower()
    path = save_training_state(str(tmp_path), 0, model, {"dense": plain_adam(model)})
    restored = Tower()
    fresh = plain_adam(restored)
    load_training_state(path, restored, {"dense": fresh})
    assert not fresh.state_dict()["state"]
    assert torch.equal(torch.stack(train(restored, fresh, range(2))), torch.stack(train(model, plain_adam(model), range(2))))


def test_state_the_optimizer_would_not_read_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    model = Tower()
    optimizer = plain_adam(model, amsgrad=True)
    train(model, optimizer, range(2))
    path = save_training_state(str(tmp_path), 2, model, {"dense": optimizer})

    other = Tower()
    fresh = plain_adam(other)
    before = snapshot(other, fresh)
    with pytest.raises(ValueError, match=r"optimizer 'dense' do not match.*unexpected.*max_exp_avg_sq"):
        load_training_state(path, other, {"dense": fresh})
    assert_same(snapshot(other, fresh), before)  # the states made for the load were dropped again
    assert not fresh.state


def test_state_the_checkpoint_lacks_is_refused(tmp_path: Path) -> None:
    model = Tower()
    path = save_training_state(str(tmp_path), 1, model, {"dense": torch.optim.SGD(model.dense.parameters(), lr=0.1)})
    other = Tower()
    optimizer = torch.optim.Adagrad(other.dense.parameters(), lr=0.1)  # its state exists from construction on
    with pytest.raises(ValueError,
                       match=r"the state entries of optimizer 'dense' do not match; missing \['optimizers.dense.state.0.step"):
        load_training_state(path, other, {"dense": optimizer})


def test_a_lazy_state_that_cannot_be_made_is_refused(tmp_path: Path) -> None:
    model = Tower()
    optimizer = keyed_adam(model)
    train(model, optimizer, range(2))
    path = save_training_state(str(tmp_path), 2, model, {"dense": optimizer})

    other = Tower()
    params = {f"dense.dense.{n}": p for n, p in other.dense.named_parameters()}
    params.update({f"dense.head.{n}": p for n, p in other.head.named_parameters()})
    stateless = KeyedOptimizer(params, {}, [{"params": list(params.values()), "lr": 0.05}])  # no step to make it
    with pytest.raises(ValueError, match=r"optimizer 'dense' has no state for \['dense.dense.bias'"):
        load_training_state(path, other, {"dense": stateless})


def two_group_adam(model: Tower, rates: tuple[float, float] = (0.05, 0.02)) -> KeyedOptimizer:
    """Keyed Adam over the dense layer and the head: two param groups, or one when both rates are equal."""
    params = {f"{prefix}.{name}": p for prefix in ("dense", "head")
              for name, p in getattr(model, prefix).named_parameters()}

    def adam(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
        if rates[0] == rates[1]:
            return torch.optim.Adam(ps, lr=rates[0])
        return torch.optim.Adam([{"params": ps[:2], "lr": rates[0]}, {"params": ps[2:], "lr": rates[1]}])

    return KeyedOptimizerWrapper(params, adam)


def with_saved_groups(optimizer: KeyedOptimizer) -> KeyedOptimizer:
    optimizer.save_param_groups(True)
    return optimizer


def test_saved_param_groups_resume_their_learning_rates(tmp_path: Path) -> None:
    """``save_param_groups(True)`` (TorchRec's switch): learning rates a schedule changed come back on resume,
    for the dense groups and the fused optimizer's, and training goes on identically."""
    trained = Tower()
    optimizer = with_saved_groups(two_group_adam(trained))
    fused = with_saved_groups(trained.ebc.fused_optimizer)
    train(trained, optimizer, range(2))
    for group, rate in zip([*optimizer.param_groups, *fused.param_groups], (0.007, 0.003, 0.05)):
        group["lr"] = rate
    path = save_training_state(str(tmp_path), 2, trained, {"dense": optimizer, "fused": fused})

    restored = Tower()
    fresh, fresh_fused = with_saved_groups(two_group_adam(restored)), with_saved_groups(restored.ebc.fused_optimizer)
    load_training_state(path, restored, {"dense": fresh, "fused": fresh_fused})
    assert [g["lr"] for g in [*fresh.param_groups, *fresh_fused.param_groups]] == [0.007, 0.003, 0.05]
    assert torch.equal(torch.stack(train(restored, fresh, range(2, 5))), torch.stack(train(trained, optimizer, range(2, 5))))


def test_param_groups_saved_apart_do_not_load_into_one_group(tmp_path: Path) -> None:
    trained = Tower()
    optimizer = with_saved_groups(two_group_adam(trained))
    train(trained, optimizer, range(2))
    path = save_training_state(str(tmp_path), 2, trained, {"dense": optimizer})

    other = Tower()
    merged = with_saved_groups(two_group_adam(other, (0.05, 0.05)))
    train(other, merged, range(1))
    before = snapshot(other, merged)
    with pytest.raises(ValueError, match=r"optimizer 'dense': parameters 'dense.bias' and 'head.bias' share a param group here"):
        load_training_state(path, other, {"dense": merged})
    assert_same(snapshot(other, merged), before)
