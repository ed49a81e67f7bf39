from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from transferctl.models.backbone import replace_head
from transferctl.config import config_from_dict
from transferctl.training.engine import train_one_epoch
from transferctl.training.runtime import Runtime
from transferctl.errors import ConfigError
from transferctl.models.layer_groups import layer_groups
from transferctl.training.phases import (
    PhasePlan,
    apply_freezing,
    build_optimizer,
    build_scheduler,
    describe_phase,
    fused_step_fits,
    load_optimizer_state,
    lr_factor,
    optimizer_param_groups,
    parameters_by_group,
    plan_phases,
    refuse_single_image_batches,
    set_train_mode,
    trainable_groups,
)

GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
CPU = Runtime(torch.device("cpu"), "fp32", channels_last=False)


def small_resnet(classes: int = 3) -> tuple[nn.Module, list[tuple[str, list[str]]]]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    replace_head(model, "fc", classes)
    return model, layer_groups("resnet18", model)


def plan(trainable: tuple[str, ...], lr: float = 0.1, mult: float = 0.1, bn: str = "train") -> PhasePlan:
    frozen = tuple(g for g in GROUPS if g not in trainable)
    return PhasePlan(0, "p", 1, lr, mult, bn, trainable, frozen)


def random_batches(count: int = 3, classes: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, classes, (4,), generator=generator)) for _ in range(count)]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def run_phase(model: nn.Module, groups: list[tuple[str, list[str]]], phase: PhasePlan) -> torch.optim.Optimizer:
    apply_freezing(model, groups, phase)
    optimizer = build_optimizer(config_from_dict({"data": {"root": "d"}}).optimizer, optimizer_param_groups(model, groups, phase, 1e-4))
    scheduler = build_scheduler(optimizer, config_from_dict({"data": {"root": "d"}}).scheduler, 1, 3)
    set_train_mode(model, groups, phase)
    train_one_epoch(model, random_batches(), optimizer, scheduler, CPU)
    return optimizer


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("head", ("head",)),
        ("all", tuple(GROUPS)),
        ("last:1", ("layer4", "head")),
        ("last:2", ("layer3", "layer4", "head")),
        (["layer2", "layer4"], ("layer2", "layer4", "head")),
    ],
)
def test_train_specs_select_groups_and_always_the_head(spec: object, expected: tuple[str, ...]) -> None:
    assert trainable_groups(spec, GROUPS, "schedule[0].train") == expected  # type: ignore[arg-type]


def test_unknown_group_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match=r"schedule\[1\]\.train: unknown layer group 'layer5'.*did you mean 'layer4'|schedule\[1\]\.train: unknown layer group 'layer5'.*layer"):
        trainable_groups(["layer5"], GROUPS, "schedule[1].train")


def test_last_n_beyond_the_backbone_is_an_error() -> None:
    with pytest.raises(ConfigError, match="last:1 .. last:5"):
        trainable_groups("last:9", GROUPS, "schedule[0].train")


def test_strategies_expand_to_their_phases() -> None:
    for strategy, expected in [
        ("feature_extract", [("head",)]),
        ("fine_tune", [("head",), tuple(GROUPS)]),
        ("scratch", [tuple(GROUPS)]),
        ("pretrained_init", [tuple(GROUPS)]),
    ]:
        plans = plan_phases(config_from_dict({"data": {"root": "d"}, "strategy": strategy}), GROUPS)
        assert [p.trainable for p in plans] == expected


def test_min_steps_adds_epochs_on_a_small_training_set() -> None:
    schedule = [{"name": "head", "epochs": 3, "train": "head", "lr": 1e-3},
                {"name": "body", "epochs": 5, "train": "all", "lr": 1e-3, "min_steps": 300}]  # fmt: skip
    config = config_from_dict({"data": {"root": "d"}, "schedule": schedule})
    assert [p.epochs for p in plan_phases(config, GROUPS, steps_per_epoch=4)] == [3, 75]
    assert [p.epochs for p in plan_phases(config, GROUPS, steps_per_epoch=7)] == [3, 43]  # ceil(300 / 7)
    assert [p.epochs for p in plan_phases(config, GROUPS, steps_per_epoch=100)] == [3, 5]  # enough steps already
    assert [p.epochs for p in plan_phases(config, GROUPS)] == [3, 5]
    default = config_from_dict({"data": {"root": "d"}, "strategy": "pretrained_init"})
    assert [p.epochs for p in plan_phases(default, GROUPS, steps_per_epoch=4)] == [75]


def test_frozen_weights_and_batchnorm_buffers_are_bit_identical_after_a_phase() -> None:
    model, groups = small_resnet()
    before = snapshot(model)
    run_phase(model, groups, plan(("head",)))
    after = snapshot(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"fc.weight", "fc.bias"}


def test_partial_unfreeze_trains_only_the_named_groups() -> None:
    model, groups = small_resnet()
    before = snapshot(model)
    run_phase(model, groups, plan(("layer4", "head")))
    after = snapshot(model)
    for name in before:
        moved = not torch.equal(before[name], after[name])
        trained = name.startswith(("layer4.", "fc."))
        if name.endswith("num_batches_tracked") or not trained:
            assert not moved or trained, f"{name} changed while frozen"
        elif name.endswith(("weight", "bias")):
            assert moved, f"{name} did not train"


def test_frozen_parameters_get_no_gradient_and_no_optimizer_state() -> None:
    model, groups = small_resnet()
    optimizer = run_phase(model, groups, plan(("head",)))
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        if name.startswith("fc."):
            assert param.requires_grad and id(param) in optimized and optimizer.state[param]
        else:
            assert not param.requires_grad and param.grad is None and id(param) not in optimized


def test_body_groups_get_the_lower_learning_rate() -> None:
    model, groups = small_resnet()
    param_groups = optimizer_param_groups(model, groups, plan(tuple(GROUPS), lr=0.01, mult=0.1), weight_decay=1e-4)
    lrs = {g["name"]: g["lr"] for g in param_groups}
    assert lrs["head"] == pytest.approx(0.01)
    assert lrs["layer4"] == pytest.approx(0.001) and lrs["stem"] == pytest.approx(0.001)


def test_every_trainable_parameter_is_in_exactly_one_optimizer_group() -> None:
    model, groups = small_resnet()
    param_groups = optimizer_param_groups(model, groups, plan(tuple(GROUPS)), weight_decay=1e-4)
    ids = [id(p) for g in param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_biases_and_norm_weights_get_no_weight_decay() -> None:
    model, groups = small_resnet()
    for group in optimizer_param_groups(model, groups, plan(tuple(GROUPS)), weight_decay=0.05):
        expected = 0.0 if group["name"].endswith("/no_decay") else 0.05
        assert group["weight_decay"] == expected
        assert all((p.ndim <= 1) == group["name"].endswith("/no_decay") for p in group["params"])


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_the_fused_step_makes_the_same_updates_as_the_per_tensor_one(name: str) -> None:
    # The same gradients go to both: recomputed ones would differ by rounding, which Adam's step can turn
    # into a sign flip where a gradient is near zero.
    config = config_from_dict({"data": {"root": "d"}, "optimizer": {"name": name, "weight_decay": 0.05}}).optimizer
    updated = []
    for fused in (True, False):
        model, groups = small_resnet()
        optimizer = build_optimizer(config, optimizer_param_groups(model, groups, plan(tuple(GROUPS), lr=0.01), 0.05))
        assert optimizer.defaults["fused"]
        for group in optimizer.param_groups:
            group["fused"] = fused
        generator = torch.Generator().manual_seed(2)
        for _ in range(3):
            for parameter in model.parameters():
                parameter.grad = torch.randn(parameter.shape, generator=generator)
            optimizer.step()
        updated.append(snapshot(model))
    assert updated[0].keys() == updated[1].keys()
    for key, tensor in updated[0].items():
        torch.testing.assert_close(tensor, updated[1][key], rtol=1e-5, atol=1e-6, msg=key)


def test_no_fused_step_for_parameters_torch_has_no_fused_kernel_for() -> None:
    on_meta = [{"params": [nn.Parameter(torch.zeros(3, device="meta"))], "lr": 0.1}]
    whole_numbers = [{"params": [nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)], "lr": 0.1}]
    assert fused_step_fits(torch.optim.AdamW, [{"params": [nn.Parameter(torch.zeros(3))], "lr": 0.1}])
    assert not fused_step_fits(torch.optim.AdamW, on_meta)
    assert not fused_step_fits(torch.optim.AdamW, whole_numbers)


@pytest.mark.parametrize(("saved_fused", "here_fused"), [(None, True), (True, False)])
def test_a_resumed_optimizer_keeps_the_step_kind_chosen_here(saved_fused: bool | None, here_fused: bool) -> None:
    # (None, True): a checkpoint from before fused steps; (True, False): one from a machine that had them.
    model, groups = small_resnet()
    config = config_from_dict({"data": {"root": "d"}}).optimizer
    saved = build_optimizer(config, optimizer_param_groups(model, groups, plan(tuple(GROUPS)), 1e-4))
    for group in saved.param_groups:
        group["fused"] = saved_fused
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    saved.step()
    here = build_optimizer(config, optimizer_param_groups(model, groups, plan(tuple(GROUPS)), 1e-4))
    for group in here.param_groups:
        group["fused"] = here_fused
    load_optimizer_state(here, saved.state_dict())
    assert all(group["fused"] is here_fused for group in here.param_groups)
    here.step()  # the step counters sit where this kind of step expects them
    assert all(float(here.state[p]["step"]) == 2 for p in model.parameters())


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_a_resumed_fused_step_is_right_whatever_layout_its_state_was_saved_in(name: str) -> None:
    # torch's fused CPU step pairs a channels-last parameter with contiguous moments element by element
    # in memory order, silently wrong; load_optimizer_state gives the state the parameter's layout.
    config = config_from_dict({"data": {"root": "d"}, "optimizer": {"name": name}}).optimizer
    results = []
    for saved_layout in (torch.channels_last, torch.contiguous_format):
        model, groups = small_resnet()
        model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(config, optimizer_param_groups(model, groups, plan(tuple(GROUPS)), 0.0))
        generator = torch.Generator().manual_seed(3)
        gradients = {p: torch.randn(p.shape, generator=generator).contiguous(memory_format=torch.channels_last) if p.ndim == 4 else torch.randn(p.shape, generator=generator) for p in model.parameters()}
        for parameter in model.parameters():
            parameter.grad = gradients[parameter]
        optimizer.step()
        state = optimizer.state_dict()
        for per_parameter in state["state"].values():
            for key, value in per_parameter.items():
                if isinstance(value, torch.Tensor) and value.ndim == 4:
                    per_parameter[key] = value.contiguous(memory_format=saved_layout)
        resumed = build_optimizer(config, optimizer_param_groups(model, groups, plan(tuple(GROUPS)), 0.0))
        assert resumed.defaults["fused"]
        load_optimizer_state(resumed, state)
        for parameter in model.parameters():
            parameter.grad = gradients[parameter] * 2 + 1  # unlike the first: the moments matter
        resumed.step()
        results.append(snapshot(model))
    for key, tensor in results[0].items():
        torch.testing.assert_close(results[1][key], tensor, msg=key)


def test_parameters_by_group_refuses_an_orphan_parameter() -> None:
    model, groups = small_resnet()
    with pytest.raises(ValueError, match="layer2"):
        parameters_by_group(model, [g for g in groups if g[0] != "layer2"])


def test_frozen_groups_are_in_eval_mode_and_trained_groups_train() -> None:
    model, groups = small_resnet()
    set_train_mode(model, groups, plan(("layer4", "head")))
    assert not model.bn1.training and not model.layer1[0].bn1.training
    assert model.layer4[0].bn1.training and model.training


def test_bn_frozen_keeps_every_batchnorm_in_eval_mode() -> None:
    model, groups = small_resnet()
    set_train_mode(model, groups, plan(tuple(GROUPS), bn="frozen"))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)


def test_one_image_per_step_is_refused_for_a_phase_that_trains_batchnorm() -> None:
    model, groups = small_resnet()
    model.eval()
    head, body = plan(("head",)), PhasePlan(1, "body", 1, 0.1, 0.1, "train", ("layer4", "head"), tuple(GROUPS[:4]))
    with pytest.raises(ConfigError) as caught:
        refuse_single_image_batches(model, groups, [head, body], per_process=1, processes=1)
    assert str(caught.value) == (
        "data.batch_size: 1 image per step, but phase 'body' (schedule[1]) trains 5 BatchNorm layers (layer4.0.bn1, ...), "
        "which need 2 or more (raise data.batch_size, or set bn: frozen in schedule[1] to keep their statistics fixed)"
    )
    with pytest.raises(ConfigError, match=r"2 images per step over 2 processes is 1 per process, but phase 'body'"):
        refuse_single_image_batches(model, groups, [body], per_process=1, processes=2)
    assert not model.training  # the check looked at the modes a phase sets, and put the model's back


def test_one_image_per_step_is_fine_where_no_batchnorm_trains() -> None:
    model, groups = small_resnet()
    frozen_bn = PhasePlan(1, "body", 1, 0.1, 0.1, "frozen", tuple(GROUPS), ())
    refuse_single_image_batches(model, groups, [plan(("head",)), frozen_bn], per_process=1, processes=1)
    refuse_single_image_batches(model, groups, [plan(tuple(GROUPS))], per_process=2, processes=1)


def test_lr_factor_warms_up_linearly_then_follows_a_cosine() -> None:
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(70, 100, 0, "constant") == 1.0


def test_describe_phase_counts_trainable_parameters() -> None:
    model, groups = small_resnet()
    info = describe_phase(model, groups, plan(("head",)), 1e-4)
    assert info["trainable_params"] == 512 * 3 + 3
    assert info["total_params"] == sum(p.numel() for p in model.parameters())
    assert set(info["lr"]) == {"head"}
