"""predict with files decoded ahead on threads against decoding them in turn, in the same run.

    python scripts/bench_predict.py [--images 512] [--size 320] [--rounds 5] [--batch 32]

Writes --images generated PNGs of --size px, then labels them with a resnet18 (random weights; precision
auto, channels-last, the ImageNet preprocessing: resize 256, crop 224) through transferctl's Predictor,
once with decode_threads=0 (each batch decoded, then run) and once with the default threads (the next batch
decodes while the model runs this one), alternating for --rounds rounds after one warm-up pass each
(bench_inference.py's loop and table). Prints each setting's median images/s, every round's, and the ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from bench import scratch_folder  # beside this script: run it as scripts/bench_predict.py

    args = parse_args(argv)
    with scratch_folder("transferctl-bench-predict-") as work:
        compare_decoding(args, work)


def compare_decoding(args: argparse.Namespace, work: Path) -> None:
    import torchvision

    from transferctl.data.preprocessing import Preprocessing
    from transferctl.training.runtime import make_runtime, prepare_model
    from transferctl.inference.trained_model import eval_transform
    from transferctl.inference.predict import Predictor, default_decode_threads
    from transferctl.testing.synthetic import SOURCE_CLASSES, write_image_folder
    from bench_inference import interleaved, predict_speed, table

    root = write_image_folder(work / "images", SOURCE_CLASSES, max(1, args.images // len(SOURCE_CLASSES)), args.size, seed=0, layout="flat")
    paths = sorted(str(p) for p in root.rglob("*.png"))
    model = torchvision.models.resnet18(weights=None, num_classes=len(SOURCE_CLASSES))
    runtime = make_runtime("cpu", "auto", model)
    model = prepare_model(model, runtime, training=False).eval()
    transform = eval_transform(Preprocessing(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    settings = {
        name: predict_speed(Predictor(model, list(SOURCE_CLASSES), transform, runtime, decode_threads=threads), paths, args.batch)
        for name, threads in (("in turn (decode_threads=0)", 0), (f"ahead ({default_decode_threads()} thread(s), the default)", default_decode_threads()))
    }  # fmt: skip
    speeds = interleaved(settings, args.rounds)
    print(f"# {len(paths)} PNGs of {args.size} px, resnet18, precision {runtime.precision}, batch {args.batch}, {args.rounds} rounds")
    print(table("decoding", speeds))


if __name__ == "__main__":
    main()
