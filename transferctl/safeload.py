"""Reading tensors from files without ever running code that a file carries."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from transferctl.errors import Problem, TransferctlError

# Wrappers other tools put around a state dict: Lightning and timm use "state_dict", our runs "model".
_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "net")


def load_torch_file(path: Path, error: type[TransferctlError], where: str = "") -> Any:
    """torch.load with weights_only=True; a file that needs arbitrary unpickling is refused, not run."""
    import torch

    where = where or str(path)
    if not path.is_file():
        raise error(Problem(where, f"no such file: {path}", "check the path"))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe pickle"
        raise error(
            Problem(
                where,
                f"refused to load {path}: it holds Python objects that could run code ({first_line[:120]})",
                "save plain tensors instead (model.state_dict() or safetensors)",
            )
        ) from None
    except Exception as exc:
        # The weights-only unpickler runs no code, so any other failure means a damaged or foreign file;
        # garbage raises KeyError, IndexError, struct.error, AttributeError... depending on its bytes.
        raise error(Problem(where, f"cannot read {path}: {_first_line(exc)}", "the file is damaged or not a PyTorch file")) from None


def load_state_dict(path: Path, error: type[TransferctlError], where: str = "") -> dict[str, Any]:
    """A flat name->tensor mapping from a .pt/.pth/.bin or .safetensors file, unwrapped and de-prefixed."""
    import torch

    if path.suffix == ".safetensors":
        state = _load_safetensors(path, error, where)
    else:
        state = load_torch_file(path, error, where)
    for key in _STATE_DICT_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise error(Problem(where or str(path), f"{path} does not hold a state dict of tensors", "save model.state_dict()"))
    # DistributedDataParallel and torch.compile prefix every name; the weights are the same.
    return {_strip_prefixes(name): tensor for name, tensor in state.items()}


def _strip_prefixes(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _load_safetensors(path: Path, error: type[TransferctlError], where: str) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise error(Problem(where or str(path), f"no such file: {path}", "check the path"))
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise error(Problem(where or str(path), f"cannot read {path}: {_first_line(exc)}", "the file is damaged")) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
