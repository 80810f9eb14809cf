"""Edge detection, as in Pachyderm's first tutorial: every image under /pfs/images becomes a
black-and-white picture of its edges, at the same path under /pfs/out.

The paths are hard-coded, as Pachyderm code has them: datumflow gives each datum's process a /pfs
of its own (Linux, as root), so several workers run this at once without seeing each other.
"""

from pathlib import Path

import cv2

IMAGES = Path("/pfs/images")
OUT = Path("/pfs/out")


def main() -> None:
    # The glob is /*: this datum holds one image, but the code does not need to know that.
    for image in sorted(p for p in IMAGES.rglob("*") if p.is_file()):
        pixels = cv2.imread(str(image))
        if pixels is None:
            raise SystemExit(f"{image}: not an image OpenCV can read")
        edges = cv2.Canny(pixels, 100, 200)
        target = OUT / image.relative_to(IMAGES).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), edges)
        print(f"{image.name}: {int((edges > 0).sum())} edge pixels")


if __name__ == "__main__":
    main()
