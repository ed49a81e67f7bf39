"""Reading tensors from files without ever running code that a file carries."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

from transferctl.errors import Problem, TransferctlError, clip
from transferctl.paths import checked

# Wrappers other tools put around a state dict: Lightning and timm use "state_dict", our runs "model".
_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "net")


def load_torch_file(path: Path, error: type[TransferctlError], where: str = "") -> Any:
    """torch.load with weights_only=True; a file that needs arbitrary unpickling is refused, not run."""
    import torch

    checked(path, error, where)
    where = where or str(path)
    if not path.is_file():
        raise error(Problem(where, f"no such file: {path}", "check the path"))
    if path.stat().st_size == 0:
        raise error(Problem(where, f"cannot read {path}: the file is empty", "the file is damaged or not a PyTorch file"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns (two lines on stderr) about files it then refuses: the error says it
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise error(_load_problem(exc, path, where)) from None


def _load_problem(exc: Exception, path: Path, where: str) -> Problem:
    """Why torch.load refused the file, in a sentence of ours: torch's own run to paragraphs."""
    code = _unpickled_code(str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
    if code is not None:
        return Problem(where, f"refused to load {path}: it holds Python objects that could run code ({code})", "save plain tensors instead (model.state_dict() or safetensors)")
    if isinstance(exc, pickle.UnpicklingError) and "Unsupported operand" in str(exc):
        return Problem(where, f"refused to load {path}: its pickle has an instruction that torch's safe loader does not run (a damaged file, or one pickled without torch.save)",
                       "save plain tensors with torch.save(model.state_dict()) or as safetensors")  # fmt: skip
    if "TorchScript" in str(exc):
        return Problem(where, f"refused to load {path}: a TorchScript archive holds code, which loading it would run", "save model.state_dict() instead")
    # The weights-only unpickler runs no code, so any other failure means a damaged or foreign file;
    # garbage raises KeyError, IndexError, struct.error, AttributeError... depending on its bytes.
    return Problem(where, f"cannot read {path}: {_damage(exc)}", "the file is damaged or not a PyTorch file")


def _unpickled_code(text: str) -> str | None:
    """What torch's weights-only unpickler refused as code ('it names posix.system'); None when it refused
    an instruction (plain pickle's protocol 4 framing, or damaged bytes) or pickle found no pickle at all."""
    named = re.search(r"GLOBAL (\S+)", text)
    if named:
        return f"it names {named.group(1)}"
    if not text.startswith("Weights only load failed") or "Unsupported operand" in text:
        return None
    reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    return clip(reason.group(1).split(". ")[0]) if reason else "unsafe pickle"


# torch's own words for a damaged file, and what they mean to whoever has to fix it.
_DAMAGE = (
    ("failed finding central directory", "the file ends early, as one cut off by an interrupted copy or a full disk does"),
    ("not a ZIP archive", "no zip archive, as a PyTorch file is: another kind of file, or one cut off early"),
    ("failed locating file", "a part of the archive is missing"),
    ("does not match expected size", "a tensor holds fewer bytes than its header says, as a cut-off file does"),
)


def _damage(exc: BaseException) -> str:
    text = str(exc).strip()
    for words, meaning in _DAMAGE:
        if words in text:
            return meaning
    if isinstance(exc, EOFError):
        return _DAMAGE[0][1]
    if isinstance(exc, pickle.UnpicklingError):
        return "its contents are not a valid pickle"
    if isinstance(exc, (RuntimeError, OSError, ValueError)) and text:
        return clip(text.splitlines()[0].split(". ")[0], 120)
    return "its bytes are not what a PyTorch file holds"  # KeyError '101' and the like say nothing more


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

    if not checked(path, error, where).is_file():
        raise error(Problem(where or str(path), f"no such file: {path}", "check the path"))
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise error(Problem(where or str(path), f"cannot read {path}: {_first_line(exc)}", "the file is damaged")) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
