"""How long a `timm:` backbone whose Hub weights are neither cached nor reachable takes to fail, against timm alone.

    python scripts/bench_timm_offline.py [--model resnet18]

Run it on a machine without a network (as the development boxes are). With an empty Hugging Face cache
it times transferctl's build_backbone (weights: DEFAULT), which probes the Hub's host before asking timm,
and then `timm.create_model(pretrained=True)` alone, which huggingface_hub retries before giving up.
Both should fail; each one's seconds and the ratio are printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def seconds_to_fail(attempt: object) -> tuple[float, str]:
    started = time.perf_counter()
    try:
        attempt()  # type: ignore[operator]
    except Exception as exc:  # noqa: BLE001 - any failure is the outcome being timed
        return time.perf_counter() - started, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    raise SystemExit("the weights loaded: run this where the Hub cannot be reached")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    args = parser.parse_args()
    from bench import scratch_folder  # beside this script: run it as scripts/bench_timm_offline.py

    with scratch_folder("transferctl-empty-hf-") as hf_home:
        os.environ["HF_HOME"] = str(hf_home)  # before huggingface_hub reads it
        compare(args.model)


def compare(model: str) -> None:
    import timm

    from transferctl.models.build import build_backbone
    from transferctl.config import BackboneConfig

    timm.list_models()  # the registry's first build is not what is timed
    ours, our_error = seconds_to_fail(lambda: build_backbone(BackboneConfig(name=f"timm:{model}", weights="DEFAULT"), 3, None))
    theirs, their_error = seconds_to_fail(lambda: timm.create_model(model, pretrained=True))
    print(f"transferctl build_backbone: {ours:.2f} s ({our_error})")
    print(f"timm.create_model alone:    {theirs:.2f} s ({their_error})")
    print(f"transferctl fails {theirs / ours:.0f}x sooner")

if __name__ == "__main__":
    main()
