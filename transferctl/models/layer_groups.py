"""Named layer groups (stem ... stages ... head) for torchvision classification models.

A layer group is what a user names in an experiment file (`train: [layer4, head]`, `train: last:2`)
and what becomes one optimizer parameter group. Groups are ordered from the input to the head, so
"the last k groups" is the usual fine-tuning choice. Every group lists module or parameter path
prefixes; a prefix `p` matches a parameter (or buffer) name `n` when `n == p` or `n` starts with
`p + "."`. Every parameter is matched by exactly one prefix, and `layer_groups` checks that, because
a parameter that falls through the cracks is silently never trained (or never frozen).

Groups are derived from the model's actual children, never from hard-coded counts, so every size
variant of a family (resnet18 ... resnet152, efficientnet_b0 ... b7) gets the same treatment.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from torch import nn

LayerGroups = list[tuple[str, list[str]]]  # ordered from input (first) to output (last)
HEAD = "head"  # the group of the classification layer, every backbone's last: what a new task replaces

__all__ = [
    "HEAD",
    "LayerGroups",
    "check_layer_groups",
    "family_of",
    "generic_layer_groups",
    "groups_from_parameters",
    "head_path",
    "layer_groups",
    "parameters_by_group",
]


# ---------------------------------------------------------------------------------------------
# Public API


def layer_groups(model_name: str, model: nn.Module) -> LayerGroups:
    """Named layer groups of a torchvision classification model, from the input side to the head.

    The last entry is always (HEAD, [path of the final classification layer]). Raises KeyError
    for a model name of no known family (see `family_of`), ValueError when the model does not
    have the structure its family expects (e.g. a torchvision version that changed it).
    """
    family = family_of(model_name)
    try:
        groups = _FAMILIES[family](model)
    except (AttributeError, IndexError, KeyError, ValueError) as error:
        # A layout change (another torchvision version, a custom model under a torchvision
        # name) is not something the user can fix in a config; say what did not match.
        raise ValueError(
            f"{type(model).__name__} ({model_name!r}) does not have the layout of the {family} "
            f"family that layer groups expect: {error}"
        ) from error
    return _finalize(model, groups)


def head_path(model_name: str, model: nn.Module) -> str:
    """Path of the final classification layer (e.g. "fc", "classifier.6", "heads.head"),
    the module a caller replaces to change the number of classes."""
    return layer_groups(model_name, model)[-1][1][0]


def family_of(model_name: str) -> str:
    """The family a torchvision model name belongs to (e.g. "resnext50_32x4d" -> "resnet").

    Raises KeyError naming the known families when the name matches none of them."""
    name = model_name.lower()
    for family, pattern in _NAME_PATTERNS:
        if pattern.match(name):
            return family
    known = ", ".join(sorted(_FAMILIES))
    raise KeyError(f"no layer groups known for model {model_name!r}; known families: {known}")


def generic_layer_groups(model: nn.Module, head_path: str) -> LayerGroups:
    """Fallback grouping for models of no known family: each top-level child with parameters is a
    group named by its attribute name, in definition order, and `head_path` is the last group.

    Parameters directly on the root module go into the first group. A child with buffers but no
    parameters (a BatchNorm without affine weights) joins the group before it, so that every
    group can become an optimizer group. The child that contains the head (e.g. "classifier"
    for head "classifier.6") keeps everything except the head; it is called "pre_logits" when
    its own name is "head" (head "head.fc")."""
    _require_path(model, head_path)
    leading = [name for name, _ in model.named_parameters(recurse=False) if name != head_path]
    groups: LayerGroups = []
    for name, child in model.named_children():
        if head_path == name:
            continue
        inside = head_path.startswith(name + ".")
        paths = _paths_except(child, name, head_path) if inside else [name]
        if _has_params(model, paths):
            # timm-style models keep a norm or pooling layer next to `head.fc`; "head" is taken.
            groups.append(("pre_logits" if name == HEAD else name, paths))
        else:
            (groups[-1][1] if groups else leading).extend(paths)
    if groups:
        groups[0] = (groups[0][0], leading + groups[0][1])
    elif leading:
        groups = [("body", leading)]
    return _finalize(model, [*groups, (HEAD, [head_path])])


def check_layer_groups(model: nn.Module, groups: LayerGroups) -> LayerGroups:
    """Groups given from outside (a config's backbone.groups, timm's group matcher): drop paths without
    state, then check that names are unique and every parameter is in exactly one group (ValueError)."""
    return _finalize(model, groups)


def groups_from_parameters(model: nn.Module, owner: dict[str, str]) -> LayerGroups:
    """Layer groups from a group name per parameter name (groups ordered by first parameter).

    Each group lists the highest modules all of whose parameters are its own, so its BatchNorm
    buffers travel with it and a frozen group's modules can be put in eval mode."""
    mine: dict[str, set[str]] = {}
    for path, _ in model.named_modules():
        if path:
            names = {owner[n] for n, _ in model.get_submodule(path).named_parameters(prefix=path)}
            if len(names) == 1:
                mine[path] = names
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        group = owner[name]
        top = next((a for a in _ancestors(name)[:-1] if mine.get(a) == {group}), name)
        if top not in groups.setdefault(group, []):
            groups[group].append(top)
    return list(groups.items())


def parameters_by_group(model: nn.Module, groups: LayerGroups) -> dict[str, list[str]]:
    """Names of the parameters in each group, in model order.

    Raises ValueError when a parameter is matched by no prefix or by more than one."""
    owner = _prefix_owners(groups)
    result: dict[str, list[str]] = {name: [] for name, _ in groups}
    unmatched: list[str] = []
    ambiguous: list[str] = []
    for param_name, _ in model.named_parameters():
        hits = [owner[p] for p in _ancestors(param_name) if p in owner]
        if not hits:
            unmatched.append(param_name)
        elif len(hits) > 1:
            ambiguous.append(f"{param_name} ({', '.join(hits)})")
        else:
            result[hits[0]].append(param_name)
    if unmatched or ambiguous:
        raise ValueError(_coverage_message(unmatched, ambiguous))
    return result


# ---------------------------------------------------------------------------------------------
# Families. Each takes the model and returns its groups; `_finalize` then removes paths without
# parameters or buffers and checks coverage, so a family may list activation and pooling
# layers freely when that keeps the code simple.


def _resnet(model: nn.Module) -> LayerGroups:
    stages = [name for name, _ in model.named_children() if re.fullmatch(r"layer\d+", name)]
    stem = _children_before(model, stages[0])
    return [("stem", stem), *[(name, [name]) for name in stages], (HEAD, ["fc"])]


def _vgg_like(model: nn.Module) -> LayerGroups:
    """vgg and alexnet: `features` split after each max-pool, classifier Linear layers as
    pre_logits."""
    segments = _split_after(_child_paths(model, "features"), model, nn.MaxPool2d)
    segments = [seg for seg in segments if _has_params(model, seg)]
    pre_logits, head = _split_head(model, "classifier")
    return [*_stem_and_stages(segments), ("pre_logits", pre_logits), (HEAD, [head])]


def _squeezenet(model: nn.Module) -> LayerGroups:
    segments = _split_after(_child_paths(model, "features"), model, nn.MaxPool2d)
    segments = [seg for seg in segments if _has_params(model, seg)]
    _, head = _split_head(model, "classifier")  # the 1x1 conv producing class scores
    return [*_stem_and_stages(segments), (HEAD, [head])]


def _densenet(model: nn.Module) -> LayerGroups:
    # A stage is a dense block plus the transition (or final norm5) that follows it.
    segments = _split_before(_child_paths(model, "features"), _matches(r"features\.denseblock\d+"))
    return [*_stem_and_stages(segments), (HEAD, ["classifier"])]


def _efficientnet(model: nn.Module) -> LayerGroups:
    # features[0] is the stem conv, features[1:-1] are the stages (one Sequential of MBConv
    # blocks per row of the paper's table), features[-1] is the 1x1 conv before pooling.
    paths = _child_paths(model, "features")
    return _stem_stages_classifier(model, paths[:1], [[p] for p in paths[1:-1]], paths[-1:])


def _mobilenet(model: nn.Module) -> LayerGroups:
    # Unlike efficientnet, features[1:-1] are single blocks (17 in mobilenet_v2); blocks with the
    # same output width form one row of the paper's table, so they make one stage. One group per
    # block would make `last:2` mean "two blocks" here and "two stages" everywhere else.
    paths = _child_paths(model, "features")
    stages = _runs(paths[1:-1], key=lambda p: _out_channels(model.get_submodule(p)))
    return _stem_stages_classifier(model, paths[:1], stages, paths[-1:])


def _mnasnet(model: nn.Module) -> LayerGroups:
    # `layers` is flat: stem convs, one Sequential per stage, then the final 1x1 conv + BN + ReLU.
    paths = _child_paths(model, "layers")
    is_stage = [isinstance(model.get_submodule(p), nn.Sequential) for p in paths]
    first, last = is_stage.index(True), len(is_stage) - 1 - is_stage[::-1].index(True)
    return _stem_stages_classifier(model, paths[:first], [[p] for p in paths[first : last + 1]], paths[last + 1 :])


def _stem_stages_classifier(model: nn.Module, stem: list[str], stages: list[list[str]], final_conv: list[str]) -> LayerGroups:
    """The mobile families' layout: stem, numbered stages, a final 1x1 conv, then `classifier`'s layers."""
    pre_logits, head = _split_head(model, "classifier")
    return [
        ("stem", stem),
        *_numbered("stage", stages),
        ("final_conv", final_conv),
        ("pre_logits", pre_logits),
        (HEAD, [head]),
    ]


def _shufflenet(model: nn.Module) -> LayerGroups:
    # Keep torchvision's (and the paper's) stage2..stage4: stage 1 is conv1 + maxpool, the stem.
    stages = [name for name, _ in model.named_children() if re.fullmatch(r"stage\d+", name)]
    return [
        ("stem", _children_before(model, stages[0])),
        *[(name, [name]) for name in stages],
        ("final_conv", ["conv5"]),
        (HEAD, ["fc"]),
    ]


def _regnet(model: nn.Module) -> LayerGroups:
    stages = [[p] for p in _child_paths(model, "trunk_output")]
    return [("stem", ["stem"]), *_numbered("stage", stages), (HEAD, ["fc"])]


def _googlenet(model: nn.Module) -> LayerGroups:
    # inception3a/3b -> "inception3" etc. The aux heads (only with aux_logits=True) read the
    # outputs of inception4a and 4d, so they belong with "inception4".
    aux = {"aux1": "inception4", "aux2": "inception4"}
    return _by_top_level_key(model, _inception_key(r"inception(\d)[a-z]", "inception", aux))


def _inception_v3(model: nn.Module) -> LayerGroups:
    # Mixed_5b..5d -> "mixed5" etc.; AuxLogits (only with aux_logits=True) reads Mixed_6e.
    aux = {"AuxLogits": "mixed6"}
    return _by_top_level_key(model, _inception_key(r"Mixed_(\d)[a-z]", "mixed", aux))


def _convnext(model: nn.Module) -> LayerGroups:
    from torchvision.models.convnext import CNBlock

    stages = _downsample_stages(model, "features", CNBlock)
    pre_logits, head = _split_head(model, "classifier")  # classifier[0] is a pretrained LayerNorm
    return [*stages, ("pre_logits", pre_logits), (HEAD, [head])]


def _swin(model: nn.Module) -> LayerGroups:
    from torchvision.models.swin_transformer import SwinTransformerBlock, SwinTransformerBlockV2

    stages = _downsample_stages(model, "features", (SwinTransformerBlock, SwinTransformerBlockV2))
    return [*stages, ("pre_logits", ["norm"]), (HEAD, ["head"])]


def _maxvit(model: nn.Module) -> LayerGroups:
    stages = [[p] for p in _child_paths(model, "blocks")]
    pre_logits, head = _split_head(model, "classifier")
    return [
        ("stem", ["stem"]),
        *_numbered("stage", stages),
        ("pre_logits", pre_logits),
        (HEAD, [head]),
    ]


def _vit(model: nn.Module) -> LayerGroups:
    # Token embedding: patch projection, class token and position embedding.
    embed = ["conv_proj", "class_token", "encoder.pos_embedding"]
    blocks = [[p] for p in _child_paths(model, "encoder.layers")]
    # heads.pre_logits (+ heads.act) exists only when built with a representation_size.
    pre_logits, head = _split_head(model, "heads")
    return [
        ("embed", embed),
        *_numbered("block", blocks, start=0),  # encoder_layer_0 -> block0
        ("norm", ["encoder.ln"]),
        ("pre_logits", pre_logits),
        (HEAD, [head]),
    ]


_FAMILIES: dict[str, Callable[[nn.Module], LayerGroups]] = {
    "alexnet": _vgg_like,
    "convnext": _convnext,
    "densenet": _densenet,
    "efficientnet": _efficientnet,
    "googlenet": _googlenet,
    "inception_v3": _inception_v3,
    "maxvit": _maxvit,
    "mnasnet": _mnasnet,
    "mobilenet_v2": _mobilenet,
    "mobilenet_v3": _mobilenet,
    "regnet": _regnet,
    "resnet": _resnet,
    "shufflenet_v2": _shufflenet,
    "squeezenet": _squeezenet,
    "swin": _swin,
    "vgg": _vgg_like,
    "vit": _vit,
}

_NAME_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    (family, re.compile(pattern))
    for family, pattern in [
        ("alexnet", r"alexnet$"),
        ("convnext", r"convnext_"),
        ("densenet", r"densenet\d"),
        ("efficientnet", r"efficientnet_"),
        ("googlenet", r"googlenet$"),
        ("inception_v3", r"inception_v3$"),
        ("maxvit", r"maxvit_"),
        ("mnasnet", r"mnasnet\d"),
        ("mobilenet_v2", r"mobilenet_v2$"),
        ("mobilenet_v3", r"mobilenet_v3_"),
        ("regnet", r"regnet_"),
        ("resnet", r"(resnet\d|resnext\d|wide_resnet\d)"),
        ("shufflenet_v2", r"shufflenet_v2_"),
        ("squeezenet", r"squeezenet\d"),
        ("swin", r"swin_"),
        ("vgg", r"vgg\d"),
        ("vit", r"vit_"),
    ]
]


# ---------------------------------------------------------------------------------------------
# Building blocks shared by the families


def _child_paths(model: nn.Module, path: str) -> list[str]:
    """Full paths of the direct children of the module at `path`."""
    return [f"{path}.{name}" for name, _ in model.get_submodule(path).named_children()]


def _children_before(model: nn.Module, stop: str) -> list[str]:
    """Names of the top-level children defined before the child `stop` (the stem, usually)."""
    names = [name for name, _ in model.named_children()]
    return names[: names.index(stop)]


def _split_head(model: nn.Module, path: str) -> tuple[list[str], str]:
    """Split a classifier container into (paths before the head, head path). The head is its
    last child with parameters, so a head the caller replaced (by a Sequential, say) counts."""
    paths = _child_paths(model, path)
    with_params = [p for p in paths if _has_params(model, [p])]
    if not with_params:
        raise ValueError(f"{path!r} has no layer with parameters to use as the classification head")
    head = with_params[-1]
    return paths[: paths.index(head)], head


def _split_after(paths: list[str], model: nn.Module, kind: type[nn.Module]) -> list[list[str]]:
    """Cut a run of paths after each module of type `kind` (the pooling that ends a stage)."""
    segments: list[list[str]] = [[]]
    for path in paths:
        segments[-1].append(path)
        if isinstance(model.get_submodule(path), kind):
            segments.append([])
    return [seg for seg in segments if seg]


def _split_before(paths: list[str], starts: Callable[[str], bool]) -> list[list[str]]:
    """Cut a run of paths before each path for which `starts` is true; the first segment is what
    comes before the first start (the stem)."""
    segments: list[list[str]] = [[]]
    for path in paths:
        if starts(path) and segments[-1]:
            segments.append([])
        segments[-1].append(path)
    return segments


def _runs(paths: list[str], key: Callable[[str], object]) -> list[list[str]]:
    """Group consecutive paths with the same key."""
    runs: list[list[str]] = []
    last: object = object()
    for path in paths:
        current = key(path)
        if not runs or current != last:
            runs.append([])
        runs[-1].append(path)
        last = current
    return runs


def _downsample_stages(
    model: nn.Module, path: str, block_types: type[nn.Module] | tuple[type[nn.Module], ...]
) -> LayerGroups:
    """convnext / swin: child 0 is the stem; after it, a downsampling layer joins the stage of
    blocks that follows it, since it produces that stage's resolution and width."""
    paths = _child_paths(model, path)

    def is_stage(p: str) -> bool:
        return any(isinstance(m, block_types) for m in model.get_submodule(p).children())

    stages: list[list[str]] = []
    pending: list[str] = []
    for p in paths[1:]:
        pending.append(p)
        if is_stage(p):
            stages.append(pending)
            pending = []
    if stages:
        stages[-1].extend(pending)  # a trailing non-block layer stays with the last stage
    return [("stem", paths[:1]), *_numbered("stage", stages)]


def _by_top_level_key(model: nn.Module, key: Callable[[str], str | None]) -> LayerGroups:
    """Group top-level children by `key(name)`, groups in order of first appearance; a child
    whose key is None (pooling, dropout) joins the group before it. The head ("fc") is last."""
    groups: dict[str, list[str]] = {}
    current: str | None = None
    for name, _ in model.named_children():
        if name == "fc":
            continue
        group = key(name)
        if group is not None and group != current and group in groups and current is not None:
            groups[group].append(name)  # a branch that belongs to an earlier stage (aux heads)
            continue
        current = group or current
        if current is not None:
            groups.setdefault(current, []).append(name)
    return [*groups.items(), (HEAD, ["fc"])]


def _inception_key(stage: str, prefix: str, aux: dict[str, str]) -> Callable[[str], str | None]:
    """Key for googlenet / inception_v3 children: stage modules by their number, aux heads by
    `aux`, parameter-free layers to the current group, and the convs before the stages to stem."""

    def key(name: str) -> str | None:
        if match := re.fullmatch(stage, name):
            return f"{prefix}{match.group(1)}"
        if name in aux:
            return aux[name]
        if re.match(r"(maxpool|avgpool|dropout)", name):
            return None
        return "stem"

    return key


def _stem_and_stages(segments: list[list[str]]) -> LayerGroups:
    return [("stem", segments[0]), *_numbered("stage", segments[1:])]


def _numbered(prefix: str, stages: list[list[str]], start: int = 1) -> LayerGroups:
    return [(f"{prefix}{i}", paths) for i, paths in enumerate(stages, start=start)]


def _matches(pattern: str) -> Callable[[str], bool]:
    compiled = re.compile(pattern)
    return lambda path: compiled.fullmatch(path) is not None


def _out_channels(module: nn.Module) -> int:
    """Output width of a block: its own `out_channels`, else that of its last conv."""
    if isinstance(width := getattr(module, "out_channels", None), int):
        return width
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"cannot tell the output width of {type(module).__name__}")
    return convs[-1].out_channels


def _paths_except(module: nn.Module, path: str, excluded: str) -> list[str]:
    """Paths covering everything inside `module` (at `path`) except the submodule `excluded`."""
    paths = [f"{path}.{name}" for name, _ in module.named_parameters(recurse=False)]
    paths += [f"{path}.{name}" for name, _ in module.named_buffers(recurse=False)]
    for name, child in module.named_children():
        child_path = f"{path}.{name}"
        if child_path == excluded:
            continue
        if excluded.startswith(child_path + "."):
            paths += _paths_except(child, child_path, excluded)
        else:
            paths.append(child_path)
    return paths


def _require_path(model: nn.Module, path: str) -> None:
    """Raise KeyError when `path` names neither a module nor a parameter of `model`."""
    try:
        model.get_submodule(path)
        return
    except AttributeError:
        pass
    try:
        model.get_parameter(path)
    except AttributeError:
        raise KeyError(f"{type(model).__name__} has no module or parameter {path!r}") from None


# ---------------------------------------------------------------------------------------------
# Cleaning and checking


def _finalize(model: nn.Module, groups: LayerGroups) -> LayerGroups:
    """Drop paths that hold no parameters or buffers (activations, pooling, dropout, absent
    optional modules) and groups left empty, then check the result."""
    head = groups[-1]
    groups = _drop_stateless(model, groups[:-1]) + [head]
    names = [name for name, _ in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"layer group names are not unique: {names}")
    parameters_by_group(model, groups)  # raises unless every parameter is in exactly one group
    return groups


def _drop_stateless(model: nn.Module, groups: LayerGroups) -> LayerGroups:
    # Buffers count as state: a BatchNorm without affine parameters still has running statistics,
    # and a caller that keeps frozen BatchNorm layers in eval mode must find it in its group.
    stateful = _all_ancestors(
        [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    )
    cleaned = [(name, [p for p in paths if p in stateful]) for name, paths in groups]
    return [(name, paths) for name, paths in cleaned if paths]


def _has_params(model: nn.Module, paths: Iterable[str]) -> bool:
    prefixes = set(paths)
    return any(prefixes.intersection(_ancestors(n)) for n, _ in model.named_parameters())


def _ancestors(name: str) -> list[str]:
    """Every prefix that would match the name: "a.b.c" -> ["a", "a.b", "a.b.c"]."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _all_ancestors(names: Iterable[str]) -> set[str]:
    return {prefix for name in names for prefix in _ancestors(name)}


def _prefix_owners(groups: LayerGroups) -> dict[str, str]:
    owner: dict[str, str] = {}
    for group, paths in groups:
        for path in paths:
            if path in owner:
                raise ValueError(f"path {path!r} is listed in both {owner[path]!r} and {group!r}")
            owner[path] = group
    return owner


def _coverage_message(unmatched: list[str], ambiguous: list[str]) -> str:
    parts = []
    if unmatched:
        parts.append(f"{len(unmatched)} parameter(s) in no layer group, e.g. {unmatched[:3]}")
    if ambiguous:
        parts.append(f"{len(ambiguous)} parameter(s) in several layer groups, e.g. {ambiguous[:3]}")
    return "; ".join(parts)
