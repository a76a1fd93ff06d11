"""Image folders at any size: streamed when large (memory does not grow with the image count),
the train / eval transforms and normalisations do what they say, pretrained weights survive the
head swap, and bad folders or weights files are one line and exit 2."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from squeezer.evaluators.datasets import load_dataset
from squeezer.evaluators.images import IMAGENET_MEAN, IMAGENET_STD, image_folder
from squeezer.evaluators.models import build_model
from squeezer.evaluators.splits import DatasetData, TensorData
from squeezer.search.config import SearchConfig
from squeezer.search.workload import base_cache_path


def write_folder(root: Path, per_class: int, size: int = 32, classes=("a", "b"), fmt: str = "jpg") -> Path:
    g = torch.Generator().manual_seed(0)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            px = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(root / c / f"{i}.{fmt}")
    return root


RSS_SCRIPT = """
import json, resource, sys, torch
torch.set_num_threads(1)
from squeezer.evaluators.datasets import load_dataset
d = load_dataset("imagefolder:" + sys.argv[1], image_size=160, workers=0, val_size=50, in_memory_max_bytes=0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = sum(len(y) for _, y in d.train.batches(64, shuffle=True))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"kind": type(d.train).__name__, "images": n, "growth_kb": after - before}))
"""


def _peak_growth(folder: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(folder)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_streamed_folder_reads_every_image_and_memory_does_not_grow_with_the_count(tmp_path):
    small = _peak_growth(write_folder(tmp_path / "small", 150))
    large = _peak_growth(write_folder(tmp_path / "large", 750))
    decoded_mb = 1500 * 3 * 160 * 160 * 4 / 2**20          # what holding the large set would take: 440 MB
    assert small["kind"] == large["kind"] == "DatasetData"
    assert large["images"] == 1500 - 50 - 300              # every training image (minus val and the held-out 20%)
    assert large["growth_kb"] / 1024 < decoded_mb / 8      # a batch at a time, not the set
    assert abs(large["growth_kb"] - small["growth_kb"]) / 1024 < 40  # 5x the images, about the same peak


def test_small_folders_are_held_in_memory_and_the_log_says_which(tmp_path, caplog):
    root = write_folder(tmp_path / "f", 10)
    with caplog.at_level(logging.INFO, logger="squeezer"):
        small = image_folder(root, image_size=32, workers=0, val_size=2)
        big = image_folder(root, image_size=32, workers=0, val_size=2, in_memory_max_bytes=1000)
    assert isinstance(small.train, TensorData) and isinstance(big.train, DatasetData)
    assert "held in memory" in caplog.text and "streamed from disk" in caplog.text
    assert len(small.train) + len(small.val) + len(small.test) == 20 and small.input_shape == (3, 32, 32)


def _halves(root: Path, size: int = 64) -> Path:
    """One image: left half white, right half black (a flip moves the white to the right)."""
    (root / "x").mkdir(parents=True)
    px = torch.zeros(size, size, 3, dtype=torch.uint8)
    px[:, : size // 2] = 255
    for i in range(5):
        Image.fromarray(px.numpy()).save(root / "x" / f"{i}.png")
    return root


def test_train_crops_and_flips_eval_resizes_and_centre_crops(tmp_path):
    d = image_folder(_halves(tmp_path / "f"), image_size=24, normalize="none", workers=0, val_size=1,
                     in_memory_max_bytes=0)
    train_ds, val_ds = d.train.dataset, d.val.dataset
    torch.manual_seed(0)
    reads = [train_ds[0][0] for _ in range(30)]
    assert all(r.shape == (3, 24, 24) for r in reads)
    left_white = [bool(r[:, :, :4].mean() > r[:, :, -4:].mean()) for r in reads]
    assert any(left_white) and not all(left_white)          # random horizontal flips
    assert len({round(float(r.mean()), 3) for r in reads}) > 3  # random crops see different parts
    e1, e2 = val_ds[0][0], val_ds[0][0]
    assert torch.equal(e1, e2) and e1.shape == (3, 24, 24)     # eval is deterministic
    assert float(e1[:, :, :12].mean()) > 0.95 and float(e1[:, :, 12:].mean()) < 0.05  # centred: halves stay halves


def test_normalisations(tmp_path):
    root = tmp_path / "f"
    for c, colour in (("a", (200, 100, 50)), ("b", (20, 40, 60))):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (30, 30), colour).save(root / c / f"{i}.png")
    none = image_folder(root, image_size=16, normalize="none", workers=0, val_size=1)
    imnet = image_folder(root, image_size=16, normalize="imagenet", workers=0, val_size=1)
    own = image_folder(root, image_size=16, normalize="dataset", workers=0, val_size=1)
    def first_a(d):
        x, y = torch.cat([d.train.x, d.val.x, d.test.x]), torch.cat([d.train.y, d.val.y, d.test.y])
        return x[y == 0][0]
    xa = first_a(none)
    assert torch.allclose(xa[:, 0, 0], torch.tensor([200, 100, 50]) / 255, atol=1e-6)
    ia = first_a(imnet)
    expect = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(ia[:, 0, 0], expect, atol=1e-5) and imnet.mean == IMAGENET_MEAN
    x = own.train.x
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.3 and (x.std(dim=(0, 2, 3)) - 1).abs().max() < 0.3
    # Named in-memory datasets take the same options.
    digits = load_dataset("digits", normalize="none")
    assert digits.mean == (0.0,) and 0.0 <= float(digits.train.x.min()) and float(digits.train.x.max()) <= 1.0
    assert load_dataset("digits", normalize="imagenet").mean == (pytest.approx(sum(IMAGENET_MEAN) / 3),)


def test_pretrained_weights_survive_the_head_swap(tmp_path):
    torch.manual_seed(3)
    src = build_model("torchvision:mobilenet_v3_small", in_channels=3, num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    m = build_model("torchvision:mobilenet_v3_small", in_channels=3, num_classes=7, weights=str(tmp_path / "w.pt"))
    sd, ref = m.state_dict(), src.state_dict()
    assert m.classifier[3].weight.shape == (7, 1024)
    kept = [k for k in ref if not k.startswith("classifier.3.")]
    assert len(kept) > 200 and all(torch.equal(sd[k], ref[k]) for k in kept)    # features and the rest unchanged
    grey = build_model("mobilenet_v3_small", in_channels=1, num_classes=7, weights=str(tmp_path / "w.pt"))
    assert torch.allclose(grey.features[0][0].weight, ref["features.0.0.weight"].sum(1, keepdim=True))
    assert torch.equal(grey.features[1].block[0][0].weight, ref["features.1.block.0.0.weight"])
    # The base-model cache tells pretrained starts apart (and image sizes, normalisations).
    c = SearchConfig(model="torchvision:mobilenet_v3_small", dataset="imagefolder:/x", image_size=96)
    paths = {base_cache_path(tmp_path, c), base_cache_path(tmp_path, c.with_(weights=str(tmp_path / "w.pt"))),
             base_cache_path(tmp_path, c.with_(image_size=128)), base_cache_path(tmp_path, c.with_(normalize="none"))}
    assert len(paths) == 4


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    run = cwd / f"run{len(list(cwd.glob('run*')))}"
    return subprocess.run([sys.executable, "-m", "squeezer", "search", *args, "--run", str(run)],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def one_line(r: subprocess.CompletedProcess, pattern: str) -> None:
    import re

    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith(("imagefolder:", "input "))]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_bad_folders_and_weights_are_one_line_and_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line(run_cli("--dataset", f"imagefolder:{tmp_path / 'empty'}", cwd=tmp_path), "no images found under")
    root = write_folder(tmp_path / "oneclass", 3)
    (root / "c").mkdir()
    one_line(run_cli("--dataset", f"imagefolder:{root}", cwd=tmp_path), r"class folder\(s\) c .* hold no images")
    bad = write_folder(tmp_path / "bad", 3)
    (bad / "a" / "broken.jpg").write_bytes(b"not a jpeg at all")
    one_line(run_cli("--dataset", f"imagefolder:{bad}", cwd=tmp_path), r"unreadable image .*broken\.jpg")
    torch.save({"features.0.0.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "other.pt")
    good = write_folder(tmp_path / "good", 6)
    one_line(run_cli("--dataset", f"imagefolder:{good}", "--image-size", "32", "--model",
                     "torchvision:mobilenet_v3_small", "--weights", str(tmp_path / "other.pt"), cwd=tmp_path),
             r"weights file .*other\.pt does not match torchvision model mobilenet_v3_small: \d+ missing")


def test_options_that_do_not_apply_say_so(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="--weights applies to torchvision models"):
        build_model("lenet5", in_channels=1, weights=str(tmp_path / "w.pt"))
    with pytest.raises(ValueError, match="image_size applies to imagefolder"):
        load_dataset("digits", image_size=64)
    with pytest.raises(ValueError, match="did you mean 'imagenet'"):
        SearchConfig(normalize="imagenett")
    with pytest.raises(ValueError, match="not both"):
        SearchConfig(weights="w.pt", checkpoint="c.pt")
    with pytest.raises(ValueError, match="weights file nothing.pt does not exist"):
        build_model("resnet18", weights="nothing.pt")


def test_loader_workers_apply_to_datasets_passed_from_python():
    from torch.utils.data import DataLoader, TensorDataset

    from squeezer.search.workload import splits_of

    ds = TensorDataset(torch.zeros(8, 1, 4, 4), torch.zeros(8, dtype=torch.int64))
    cfg = SearchConfig()
    assert (cfg.workers_for(True), cfg.workers_for(False)) == (2, 0)         # auto
    s = splits_of((ds, DataLoader(ds, num_workers=1)), SearchConfig(loader_workers=3).workers_for(False))
    assert s.train.num_workers == 3 and s.val.num_workers == 1                # a DataLoader keeps its own
    assert sum(len(y) for _, y in s.train.batches(4)) == 8
