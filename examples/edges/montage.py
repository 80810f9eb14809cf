"""The montage of Pachyderm's first tutorial: every image beside its edges, in one picture.

Its one datum sees all of /pfs/images and all of /pfs/edges (the input crosses the two repos with
glob /), and writes /pfs/out/montage.png: a row per image, the image on the left, its edges on the
right, on a steel blue background.
"""

from pathlib import Path

import cv2
import numpy as np

IMAGES = Path("/pfs/images")
EDGES = Path("/pfs/edges")
OUT = Path("/pfs/out")
TILE = 128
GAP = 4
BACKGROUND = (139, 100, 54)  # SteelBlue4, in OpenCV's BGR order


def tile(path: Path) -> np.ndarray:
    pixels = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if pixels is None:
        raise SystemExit(f"{path}: not an image OpenCV can read")
    return cv2.resize(pixels, (TILE, TILE), interpolation=cv2.INTER_NEAREST)


def main() -> None:
    images = sorted(p for p in IMAGES.rglob("*") if p.is_file())
    if not images:
        raise SystemExit(f"no images under {IMAGES}")
    step = TILE + GAP
    sheet = np.zeros((GAP + step * len(images), GAP + 2 * step, 3), np.uint8)
    sheet[:] = BACKGROUND
    for row, image in enumerate(images):
        edges = EDGES / image.relative_to(IMAGES).with_suffix(".png")
        top = GAP + row * step
        sheet[top : top + TILE, GAP : GAP + TILE] = tile(image)
        sheet[top : top + TILE, GAP + step : GAP + step + TILE] = tile(edges)
    cv2.imwrite(str(OUT / "montage.png"), sheet)
    print(f"montage of {len(images)} images and their edges")


if __name__ == "__main__":
    main()
