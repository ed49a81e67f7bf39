"""What a network expects of an image: resize the short side, centre-crop, normalise. The models package
derives it from each weights source (transferctl.models.build); the data package turns it into transforms.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """What the network expects of an image: resize the short side, centre-crop, normalise (RGB)."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(
            resize=int(data["resize"]),
            crop=int(data["crop"]),
            mean=tuple(data["mean"]),  # type: ignore[arg-type]
            std=tuple(data["std"]),  # type: ignore[arg-type]
            interpolation=str(data.get("interpolation", "bilinear")),
        )

    def with_image_size(self, size: int | None) -> Preprocessing:
        """Keep the weights' resize/crop ratio at a new crop size."""
        if size is None or size == self.crop:
            return self
        resize = max(size, round(size * self.resize / self.crop))
        return Preprocessing(resize, size, self.mean, self.std, self.interpolation)
