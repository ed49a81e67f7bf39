from __future__ import annotations

from pathlib import Path

import pytest

from transferctl.config import (
    ExperimentConfig,
    apply_override,
    config_from_dict,
    config_to_dict,
    default_schedule,
    dump_yaml,
    load_config,
    parse_weights,
    schedule_of,
)
from transferctl.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def messages(exc: ConfigError) -> list[str]:
    return [str(problem) for problem in exc.problems]


def test_minimal_file_gets_every_default(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "data: {root: images}\n"))
    assert config.backbone.name == "resnet18"
    assert config.backbone.weights == "DEFAULT"
    assert config.strategy == "fine_tune"
    assert config.data.batch_size == 32


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "data: {root: images}\nbackbone: {weights: w/model.pth}\noutput: {dir: out}\n"))
    assert config.data.root == (tmp_path / "images").resolve()
    assert config.output.dir == (tmp_path / "out").resolve()
    assert config.backbone.weights == str((tmp_path / "w/model.pth").resolve())


def test_run_weights_resolve_against_the_config_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "data: {root: images}\nbackbone: {weights: 'run:runs/base'}\n"))
    assert config.backbone.weights == "run:" + str((tmp_path / "runs/base").resolve())


@pytest.mark.parametrize(
    ("text", "field"),
    [("data: {root: loop/images}\n", "data.root"), ("data: {root: images}\noutput: {dir: loop}\n", "output.dir"),
     ("data: {root: images}\nbackbone: {weights: loop/w.pt}\n", "backbone.weights"), ("data: {root: images}\nbackbone: {weights: 'run:loop'}\n", "backbone.weights")],
)  # fmt: skip
def test_a_relative_path_into_a_symlink_loop_names_its_field(tmp_path: Path, text: str, field: str) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ConfigError) as caught:  # pathlib's resolve raised RuntimeError('Symlink loop from ...')
        load_config(write(tmp_path, text))
    (message,) = messages(caught.value)
    assert message.startswith(f"{field}: {tmp_path / 'loop'}") and "runs into a symlink loop" in message


def test_an_experiment_file_with_a_name_too_long_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:  # OSError: [Errno 36] File name too long
        load_config(tmp_path / f"{'n' * 300}.yaml")
    (message,) = messages(caught.value)
    assert message.startswith(f"{tmp_path}/{'n' * 22}...") and "has a name of 305 bytes" in message


def test_unknown_field_suggests_the_close_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "data: {root: images, batch_sise: 4}\n"))
    (message,) = messages(caught.value)
    assert "data.batch_sise" in message and "did you mean 'batch_size'" in message
    assert str(tmp_path / "experiment.yaml") in message


def test_every_problem_is_reported_with_its_path(tmp_path: Path) -> None:
    text = "data: {root: d, batch_size: 0}\nschedule:\n  - {name: a, epochs: -1, lr: 0}\nstrategy: fine_tun\noutput: {checkpoint_seconds: -1}\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    joined = "\n".join(messages(caught.value))
    for where in ("data.batch_size", "schedule[0].epochs", "schedule[0].lr", "strategy", "output.checkpoint_seconds"):
        assert where in joined


def test_missing_data_section_is_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data: is required"):
        load_config(write(tmp_path, "name: x\n"))


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "name: x\ndata:\n  root: [unclosed\n"))
    assert "experiment.yaml:" in str(caught.value) and "invalid YAML" in str(caught.value)


def test_python_object_tags_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not allowed"):
        load_config(write(tmp_path, "name: !!python/object/apply:os.system ['echo hacked']\ndata: {root: d}\n"))


def test_words_yaml_1_1_reads_as_booleans_stay_words(tmp_path: Path) -> None:
    """docs/experiment-file.md's `cache: off` is the field's word; YAML 1.1 would read it as false."""
    config = load_config(write(tmp_path, "data: {root: d, cache: off}\ncompile: yes\nlogging: {tensorboard: off}\n"), ["data.augment=none"])
    assert config.data.cache == "off"
    assert config.compile is True and config.logging.tensorboard is False  # boolean fields still take the words
    assert load_config(write(tmp_path, "data: {root: d}\n"), ["data.cache=off"]).data.cache == "off"


def test_a_key_given_twice_is_named_with_its_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "data: {root: d, batch_size: 8}\nname: x\ndata: {root: e}\n"))
    assert messages(caught.value) == [f"{tmp_path / 'experiment.yaml'}:3: the key 'data' is given twice (keep one of them)"]
    with pytest.raises(ConfigError, match="experiment.yaml:1: the key 'root' is given twice"):
        load_config(write(tmp_path, "data: {root: d, root: e}\n"))


def test_merged_keys_may_be_overridden() -> None:
    from transferctl.config import parse_yaml

    assert parse_yaml("base: &base {root: d, batch_size: 8}\ndata:\n  <<: *base\n  batch_size: 4\n")["data"] == {"root": "d", "batch_size": 4}


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_top_level_list_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_overrides_set_nested_fields_with_yaml_values(tmp_path: Path) -> None:
    path = write(tmp_path, "data: {root: d}\nschedule:\n  - {name: a, epochs: 1, lr: 0.1}\n")
    config = load_config(path, ["data.batch_size=8", "schedule.0.epochs=3", "optimizer.name=sgd", "backbone.weights=none"])
    assert config.data.batch_size == 8
    assert config.schedule is not None and config.schedule[0].epochs == 3
    assert config.optimizer.name == "sgd"
    assert config.backbone.weights == "none"


def test_a_schedule_override_edits_the_strategys_default_schedule(tmp_path: Path) -> None:
    path = write(tmp_path, "data: {root: d}\n")  # fine_tune, no schedule: the README's `--set schedule.1.epochs=10` must work
    assert [(p.name, p.epochs) for p in schedule_of(load_config(path, ["schedule.1.epochs=10"]))] == [("head", 3), ("body", 10)]
    assert schedule_of(load_config(path, ["schedule.1.epochs=10"]))[1].backbone_lr_mult == 0.5  # the rest of the phase as it was
    changed = load_config(path, ["schedule.0.epochs=4", "strategy=feature_extract"])  # the strategy the overrides leave
    assert [(p.name, p.epochs, p.train) for p in schedule_of(changed)] == [("head", 4, "head")]


@pytest.mark.parametrize("field", ["data.batch_size", "data.cache_memory_mb", "data.image_size", "seed", "optimizer.weight_decay"])
def test_a_boolean_is_not_a_number(tmp_path: Path, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "data: {root: d}\n"), [f"{field}=true"])
    assert messages(caught.value) == [f"{tmp_path / 'experiment.yaml'}: {field}: must be a number, not true (got True)"]
    assert load_config(write(tmp_path, "data: {root: d}\n"), ["compile=true"]).compile is True  # booleans stay for yes-or-no fields


def test_null_weights_mean_none(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "data: {root: d}\nbackbone: {weights: null}\n")).backbone.weights == "none"


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [("none", "none", ""), ("None", "none", ""), ("DEFAULT", "hub", "DEFAULT"), ("IMAGENET1K_V2", "hub", "IMAGENET1K_V2"),
     ("a1_in1k", "hub", "a1_in1k"), ("w.pth", "file", "w.pth"), ("models/w", "file", "models/w"), ("run:runs/a", "run", "runs/a")],
)  # fmt: skip
def test_weights_are_parsed_once_into_their_source(text: str, kind: str, value: str) -> None:
    source = parse_weights(text)
    assert (source.kind, source.value) == (kind, value)
    assert str(source) == ("none" if kind == "none" else text)  # written back as the file said it


def test_override_errors_name_the_override() -> None:
    with pytest.raises(ConfigError, match="--set"):
        apply_override({}, "no_equals_sign")
    with pytest.raises(ConfigError, match="index"):
        apply_override({"schedule": [{}]}, "schedule.5.epochs=1")


def test_override_with_a_bad_value_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(write(tmp_path, "data: {root: d}\n"), ["data.batch_size=-3"])


@pytest.mark.parametrize(
    ("strategy", "phases"),
    [("feature_extract", [("head", "head")]), ("fine_tune", [("head", "head"), ("body", "all")]), ("scratch", [("all", "all")]), ("pretrained_init", [("all", "all")])],
)
def test_each_strategy_has_a_default_schedule(strategy: str, phases: list[tuple[str, str]]) -> None:
    assert [(p.name, p.train) for p in default_schedule(strategy)] == phases


def test_fine_tune_trains_the_body_slower_than_the_head() -> None:
    body = default_schedule("fine_tune")[1]
    assert body.backbone_lr_mult < 1.0


def test_feature_extract_refuses_a_phase_that_trains_the_body() -> None:
    raw = {"data": {"root": "d"}, "strategy": "feature_extract", "schedule": [{"name": "a", "epochs": 1, "lr": 0.1, "train": "all"}]}
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw)
    assert messages(caught.value) == [
        "<config>: schedule[0].train: feature_extract trains only the new head, but phase 'a' has train: 'all'; "
        "use strategy fine_tune to train backbone layers"
    ]  # the phase's field, not the whole config quoted after it


def test_scratch_refuses_a_head_only_phase() -> None:
    phases = [{"name": "warm", "epochs": 1, "lr": 0.1, "train": "all"}, {"name": "probe", "epochs": 1, "lr": 0.1, "train": "head"}]
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"data": {"root": "d"}, "strategy": "scratch", "schedule": phases})
    (message,) = messages(caught.value)
    assert message.startswith("<config>: schedule[1].train: scratch starts the body from random weights, and phase 'probe'")
    assert message.endswith("use train: all, or strategy fine_tune to keep pretrained weights")


def alias_bomb(levels: int) -> str:
    """A few hundred bytes of YAML whose `name` is 9^levels strings once its aliases are expanded."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nname: *a{levels - 1}\ndata: {{root: d}}\n"


def test_an_alias_bomb_is_refused_in_one_line_without_expanding_it(tmp_path: Path) -> None:
    import tracemalloc

    path = write(tmp_path, alias_bomb(6))  # half a million strings: the message quoting it took 4 MB, nine levels took gigabytes
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert messages(caught.value) == [f"{path}: refused: its aliases expand to more than 10,000 values (write the values out; an experiment file needs no deep aliases)"]
    assert peak < 2**20


@pytest.mark.parametrize(
    ("text", "expected"),
    [("name: &a [*a]\n", "refused: an alias refers to a value that contains it"), ("name: " + "[" * 3000 + "]" * 3000 + "\n", "refused: values nested too deeply")],
    ids=["self-reference", "deep"],
)
def test_values_that_refer_to_themselves_or_nest_without_end_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text + "data: {root: d}\n"))
    (message,) = messages(caught.value)
    assert message.startswith(f"{tmp_path / 'experiment.yaml'}: {expected}")


def test_an_alias_bomb_in_an_override_is_refused(tmp_path: Path) -> None:
    bomb = "[" + ", ".join(["&a0 [x, x, x, x, x, x, x, x, x, x]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 5)]) + "]"
    with pytest.raises(ConfigError, match=r"^--set name: refused: the value expands or nests beyond"):
        load_config(write(tmp_path, "data: {root: d}\n"), [f"name={bomb}"])


def test_aliases_that_stay_small_are_fine(tmp_path: Path) -> None:
    text = "phase: &phase {epochs: 1, lr: 0.1, train: all}\ndata: {root: d}\nschedule:\n  - {<<: *phase, name: a}\n  - {<<: *phase, name: b}\n"
    raw = __import__("transferctl.config", fromlist=["read_yaml"]).read_yaml(write(tmp_path, text))
    raw.pop("phase")
    assert [phase.name for phase in schedule_of(config_from_dict(raw))] == ["a", "b"]


def test_a_long_value_is_quoted_in_one_short_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "data: {root: d}\n"), ["name=" + "x" * 100_000, "device=" + "gpu\u2028" * 1000])
    for message in messages(caught.value):
        assert len(message) < 250 and len(message.splitlines()) == 1, message


def test_a_list_of_many_wrong_items_is_a_few_lines() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"data": {"root": "d"}, "schedule": [7] * 5000})
    assert len(caught.value.problems) == 21
    assert str(caught.value.problems[-1]) == "<config>: and 4980 more problems (fix the ones above first)"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("schedule.0.lr=.inf", "schedule[0].lr: Input should be a finite number (got inf)"),
        ("schedule.0.lr=.nan", "schedule[0].lr: Input should be a finite number (got nan)"),
        ("output.checkpoint_seconds=.inf", "output.checkpoint_seconds: Input should be a finite number (got inf)"),
        ("data.batch_size=1.0e+20", "data.batch_size: Input should be less than or equal to 65536 (got 100000000000000000000)"),
        ("data.batch_size=100000000000000000000", "data.batch_size: Input should be less than or equal to 65536 (got 100000000000000000000)"),
        ("schedule.0.epochs=1.0e+9", "schedule[0].epochs: Input should be less than or equal to 100000 (got 1000000000)"),
        ("seed=1.0e+30", "seed: Input should be less than or equal to 9223372036854775807 (got 1000000000000000019884624838656)"),
        ("data.num_workers=100000", "data.num_workers: must be 'auto' or a number from 0 to 1024 (got 100000)"),
        ("data.cache_memory_mb=1.0e+12", "data.cache_memory_mb: Input should be less than or equal to 1073741824 (got 1000000000000)"),
    ],
)
def test_numbers_are_finite_and_in_sane_ranges(tmp_path: Path, override: str, expected: str) -> None:
    path = write(tmp_path, "data: {root: d}\nschedule:\n  - {name: a, epochs: 1, lr: 0.1}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, [override])
    assert messages(caught.value) == [f"{path}: {expected}"]


def test_whole_numbers_written_as_floats_are_taken() -> None:
    config = config_from_dict({"data": {"root": "d", "batch_size": 16.0}, "seed": -3.0})
    assert (config.data.batch_size, config.seed) == (16, -3)


@pytest.mark.parametrize("override", ["data.root=", "data.root=null", "output.dir=''", "data.root=[a, b]"])
def test_an_empty_or_odd_folder_is_named_as_such(tmp_path: Path, override: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "data: {root: d}\n"), [override])
    (message,) = messages(caught.value)
    field = override.split("=")[0]
    assert f": {field}: " in message and ("is empty: name a folder" in message or "must be a folder path" in message)
    assert "class" not in message


def test_scratch_never_loads_pretrained_weights() -> None:
    config = config_from_dict({"data": {"root": "d"}, "strategy": "scratch"})
    assert not config.loads_pretrained_weights
    assert config_from_dict({"data": {"root": "d"}}).loads_pretrained_weights


@pytest.mark.parametrize("train", ["head", "all", "last:2", ["layer4"]])
def test_train_spec_forms_are_accepted(train: object) -> None:
    raw = {"data": {"root": "d"}, "schedule": [{"name": "a", "epochs": 1, "lr": 0.1, "train": train}]}
    assert schedule_of(config_from_dict(raw))[0].train == train


@pytest.mark.parametrize("train", ["most", "last:", []])
def test_bad_train_specs_are_rejected(train: object) -> None:
    raw = {"data": {"root": "d"}, "schedule": [{"name": "a", "epochs": 1, "lr": 0.1, "train": train}]}
    with pytest.raises(ConfigError, match=r"schedule\[0\]\.train"):
        config_from_dict(raw)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu"])
def test_bad_device_is_rejected(device: str) -> None:
    with pytest.raises(ConfigError, match="device"):
        config_from_dict({"data": {"root": "d"}, "device": device})


@pytest.mark.parametrize("workers", [-1, "many", True, 1.5])
def test_bad_worker_counts_get_one_message(workers: object) -> None:
    with pytest.raises(ConfigError, match=r"data\.num_workers: must be 'auto' or a number from 0 to 1024"):
        config_from_dict({"data": {"root": "d", "num_workers": workers}})


@pytest.mark.parametrize(("workers", "taken"), [("auto", "auto"), (0, 0), (3, 3), ("2", 2)])
def test_worker_counts_are_auto_or_a_number(workers: object, taken: object) -> None:
    assert config_from_dict({"data": {"root": "d", "num_workers": workers}}).data.num_workers == taken


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "data: {root: images}\nstrategy: fine_tune\n"))
    text = dump_yaml(config_to_dict(config))
    again = load_config(write(tmp_path, text))
    assert again == config.model_copy(update={"schedule": again.schedule})
    assert again.schedule is not None and len(again.schedule) == 2


def test_config_objects_are_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "data: {root: images}\n"))
    with pytest.raises(Exception):
        config.seed = 3  # type: ignore[misc]
    assert isinstance(config, ExperimentConfig)


@pytest.mark.parametrize("augment", ["none", "standard", "randaugment", "trivialaugment", "autoaugment", "augmix"])
def test_every_augmentation_and_random_erasing_are_accepted(tmp_path: Path, augment: str) -> None:
    config = load_config(write(tmp_path, f"data: {{root: images, augment: {augment}, random_erasing: 0.25}}\n"))
    assert (config.data.augment, config.data.random_erasing, config.data.random_views) == (augment, 0.25, True)
    assert load_config(write(tmp_path, "data: {root: images}\n")).data.random_erasing is None  # off unless asked for


@pytest.mark.parametrize(
    ("field", "value"),
    [("augment", "randaug"), ("augment", "[standard]"), ("random_erasing", "0"), ("random_erasing", "1.5"), ("random_erasing", "often")],
)
def test_a_bad_augmentation_is_one_line_naming_its_field(tmp_path: Path, field: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, f"data: {{root: images, {field}: {value}}}\n"))
    (message,) = messages(caught.value)
    assert f"data.{field}" in message and "\n" not in message


def test_a_misspelt_choice_names_the_closest_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "data: {root: images, augment: randaug}\n"))
    assert messages(caught.value)[0].endswith("(got 'randaug') (did you mean 'randaugment'?)")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "data: {root: images, augment: sideways}\n"))
    assert "did you mean" not in messages(caught.value)[0]  # nothing close: the message lists the choices
