"""Write the data sets derived from Fashion-MNIST that the issue-16 benchmarks read (no downloads).

    python benchmarks/make_datasets.py folder OUT --images 20000 --size 224   # OUT/{train,test}/<class>/*.jpg
    python benchmarks/make_datasets.py segmentation OUT --images 2000 --size 96 [--split test --seed 1]
    python benchmarks/make_datasets.py detection OUT --images 2000 --size 160 [--split test --seed 1]

See :mod:`squeezer.evaluators.derived` for what each holds.
"""

from __future__ import annotations

import argparse
import json
import time

from squeezer.evaluators.derived import write_detection_set, write_image_folder, write_segmentation_set


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("folder", "segmentation", "detection"))
    p.add_argument("out")
    p.add_argument("--images", type=int, required=True, help="training images (folder) or images (the others)")
    p.add_argument("--size", type=int, required=True, help="side in pixels")
    p.add_argument("--test-images", type=int, help="folder: test images (default images // 10)")
    p.add_argument("--split", default="train", help="segmentation/detection: Fashion-MNIST items of train or test")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    t0 = time.time()
    if a.kind == "folder":
        out = write_image_folder(a.out, a.images, a.size, n_test=a.test_images)
    elif a.kind == "segmentation":
        out = write_segmentation_set(a.out, a.images, a.size, split=a.split, seed=a.seed)
    else:
        out = write_detection_set(a.out, a.images, a.size, split=a.split, seed=a.seed)
    print(json.dumps({**out, "seconds": round(time.time() - t0, 1)}, default=str))


if __name__ == "__main__":
    main()
