"""Your own task: segmentation and detection data in the ordinary formats (derived from
Fashion-MNIST), their metrics, soft targets per output element, pruning / quantization / cost
on torchvision's LRASPP and SSDlite graphs, and both end to end through ``squeezer.search``."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import models

import squeezer
from squeezer import hw_models
from squeezer.compressors.apply import apply_policy_
from squeezer.compressors.distill import UserLossDistiller, elementwise_soft_target_loss, soft_target_loss
from squeezer.compressors.policy import DistillConfig, LayerPolicy, Policy
from squeezer.compressors.pruning import channel_groups
from squeezer.evaluators.datasets import load_dataset
from squeezer.evaluators.derived import write_detection_set, write_image_folder, write_segmentation_set
from squeezer.evaluators.splits import as_split
from squeezer.evaluators.tasks import (
    CocoBoxes,
    ImageMasks,
    detection_loss,
    fixed_input_size_,
    map50,
    miou,
    segmentation_loss,
)
from squeezer.evaluators.train import recalibrate_bn_
from squeezer.evaluators.train import train as train_model
from squeezer.search.sensitivity import measure
from squeezer.search.space import SearchSpace

SEG_PX, DET_PX = 48, 96


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("derived")
    write_segmentation_set(root / "seg_train", 48, SEG_PX)
    write_segmentation_set(root / "seg_val", 16, SEG_PX, split="test", seed=1)
    write_detection_set(root / "det_train", 32, DET_PX)
    write_detection_set(root / "det_val", 12, DET_PX, split="test", seed=1)
    return root


def lraspp() -> nn.Module:
    torch.manual_seed(0)
    return models.get_model("lraspp_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=11)


def ssdlite() -> nn.Module:
    torch.manual_seed(0)
    m = models.get_model("ssdlite320_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=11)
    return fixed_input_size_(m, DET_PX)


def test_derived_sets_read_back_through_the_ordinary_loaders(sets, tmp_path):
    seg = ImageMasks(sets / "seg_train")
    x, y = seg[0]
    assert x.shape == (3, SEG_PX, SEG_PX) and y.shape == (SEG_PX, SEG_PX) and len(seg.classes) == 11
    labels = torch.cat([seg[i][1].unique() for i in range(len(seg))])
    assert labels.min() == 0 and labels.max() <= 10 and len(labels.unique()) > 5
    assert 0.1 < float((y > 0).float().mean()) < 0.9            # item pixels and background
    det = CocoBoxes(sets / "det_train" / "images", sets / "det_train" / "annotations.json")
    x, t = det[0]
    b = t["boxes"]
    assert x.shape == (3, DET_PX, DET_PX) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert len(b) >= 1 and bool((b[:, 2:] > b[:, :2]).all()) and float(b.max()) <= DET_PX
    assert bool(((t["labels"] >= 1) & (t["labels"] <= 10)).all()) and det.classes[1] == "tshirt"
    write_image_folder(tmp_path / "f", 30, 40, n_test=10)
    d = load_dataset(f"imagefolder:{tmp_path / 'f'}", image_size=40, val_size=5)
    assert d.num_classes == 10 and len(d.train) + len(d.val) == 30 and len(d.test) == 10


def test_a_mask_must_have_its_images_size(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "images" / "a.png")
    Image.new("L", (20, 18)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(ValueError, match=r"mask .*a\.png is 20x18 but its image .* is 20x20"):
        ImageMasks(tmp_path)
    Image.new("RGB", (20, 20)).save(tmp_path / "images" / "b.png")
    (tmp_path / "masks" / "a.png").unlink()
    with pytest.raises(ValueError, match="has no mask"):
        ImageMasks(tmp_path)


class Fixed(nn.Module):
    """Returns the given outputs whatever the input (to check a metric against hand-counted values)."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, x):
        return self.outputs


def test_miou_and_map50_on_hand_counted_cases():
    y = torch.tensor([[[0, 0], [1, 1]]])
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 1, :] = 1                                         # perfect
    assert miou(Fixed({"out": logits}), [(None, y)]) == 1.0
    logits[0, 1, 1, 1] = -1                                        # one class-1 pixel called 0
    assert miou(Fixed(logits), [(None, y)]) == pytest.approx((2 / 3 + 1 / 2) / 2)
    gt = {"boxes": torch.tensor([[0., 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([1, 1])}
    hit_miss = {"boxes": torch.tensor([[0., 0, 10, 11], [50, 50, 60, 60]]), "scores": torch.tensor([0.9, 0.8]),
                "labels": torch.tensor([1, 1])}
    assert map50(Fixed([hit_miss]), [([None], [gt])]) == pytest.approx(0.5)  # recall 0.5 at precision 1
    miss_hit = {**hit_miss, "scores": torch.tensor([0.7, 0.8])}
    assert map50(Fixed([miss_hit]), [([None], [gt])]) == pytest.approx(0.25)  # the hit ranks second: precision 1/2
    assert miou.__name__ == "mIoU" and map50.__name__ == "mAP@0.5"


def test_soft_targets_per_output_element():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    assert elementwise_soft_target_loss(s, t, 3.0) == pytest.approx(float(soft_target_loss(s, t, 3.0)), rel=1e-5)
    maps = torch.randn(2, 5, 3, 3)
    per_pixel = torch.stack([soft_target_loss(maps[:, :, i, j], t[:2], 2.0) for i in range(3) for j in range(3)])
    assert elementwise_soft_target_loss(maps, t[:2, :, None, None].expand(2, 5, 3, 3), 2.0) == \
        pytest.approx(float(per_pixel.mean()), rel=1e-5)
    student, teacher = lraspp().train(), lraspp().eval()
    with torch.no_grad():
        teacher.classifier.high_classifier.weight.mul_(3)
    batch = (torch.randn(2, 3, 32, 32), torch.randint(0, 11, (2, 32, 32)))
    torch.manual_seed(1)
    plain = segmentation_loss(student, batch).item()
    for alpha, differs in ((0.0, False), (0.5, True)):
        d = UserLossDistiller(DistillConfig(alpha=alpha, temperature=2.0), student, teacher, segmentation_loss)
        torch.manual_seed(1)
        mixed = d.loss(batch).item()
        d.close()
        assert (abs(mixed - plain) > 1e-4) == differs


def test_distillation_is_switched_off_for_a_detector_with_one_warning(sets, caplog):
    student, teacher = ssdlite().train(), ssdlite().eval()
    det = CocoBoxes(sets / "det_train" / "images", sets / "det_train" / "annotations.json")
    batch = CocoBoxes.collate_fn([det[0], det[1]])
    d = UserLossDistiller(DistillConfig(alpha=0.9), student, teacher, detection_loss)
    with caplog.at_level(logging.WARNING, logger="squeezer"):
        for _ in range(2):
            torch.manual_seed(0)
            loss = d.loss(batch)
    torch.manual_seed(0)
    assert loss.item() == pytest.approx(detection_loss(student, batch).item(), rel=1e-5)
    assert caplog.text.count("distillation off") == 1


@pytest.mark.parametrize("make,shape", [(lraspp, (3, SEG_PX, SEG_PX)), (ssdlite, (3, DET_PX, DET_PX))],
                         ids=["lraspp", "ssdlite"])
def test_pruning_quantization_and_cost_on_segmentation_and_detection_graphs(make, shape):
    m = make().eval()
    cg = channel_groups(m, shape)
    whole = cg.unpruned()
    heads = ["classifier.low_classifier", "classifier.high_classifier"] if make is lraspp else \
        [f"head.{h}_head.module_list.{i}.1" for h in ("classification", "regression") for i in range(6)]
    assert set(heads) == set(cg.outputs) and all(whole[h].startswith("output layer") for h in heads)
    assert len(cg.sizes) > 25                                     # the backbone's groups are pruned
    table = hw_models.trace(m, shape)
    assert table.method == "fx"
    policy = Policy(layers={"_default": LayerPolicy(prune_ratio=0.5, weight_bits=8, act_bits=8)})
    target = hw_models.get_target("arm")
    predicted = hw_models.estimate_table(table, policy, target)
    small = copy.deepcopy(m)
    apply_policy_(small, policy, shape)
    measured = hw_models.estimate_table(hw_models.trace(small, shape), None, target)
    assert predicted.macs == measured.macs < 0.5 * table.macs     # the cost model predicts the pruned shapes
    heads_out = {r.name: r.out_channels for r in hw_models.trace(m, shape) if r.name in heads}
    assert {r.name: r.out_channels for r in hw_models.trace(small, shape) if r.name in heads} == heads_out
    with torch.no_grad():
        out = small.eval()(torch.rand(1, *shape))
    if make is lraspp:
        assert out["out"].shape == (1, 11, *shape[1:])
    else:
        assert set(out[0]) == {"boxes", "scores", "labels"}              # boxes decoded as before


def test_segmentation_end_to_end_through_the_api(sets, tmp_path):
    train, val = ImageMasks(sets / "seg_train", flip=True), ImageMasks(sets / "seg_val")
    base = lraspp()
    torch.manual_seed(0)
    train_model(base, as_split(train), epochs=3, lr=0.05, batch_size=8, loss_fn=segmentation_loss, progress=False)
    result = squeezer.search(base, data=(train, val), metric=miou, loss=segmentation_loss, budget="4MB", target="arm",
                             trials=2, trial_steps=4, final_epochs=0.5, batch_size=8, sensitivity=False,
                             latency_seeds="none", run=str(tmp_path / "seg"), progress=False)
    best, base_m = result.best.metrics, result.base
    assert best["metric"] == base_m["metric"] == "mIoU" and best["size_bytes"] <= 4_000_000
    assert 0.0 <= best["val_metric"] <= 1.0 and base_m["val_metric"] > 0.05   # mIoU, not accuracy
    with torch.no_grad():
        assert result.best.model.eval()(torch.zeros(1, 3, SEG_PX, SEG_PX))["out"].shape == (1, 11, SEG_PX, SEG_PX)


def test_detection_end_to_end_through_the_api(sets, tmp_path, caplog):
    train = CocoBoxes(sets / "det_train" / "images", sets / "det_train" / "annotations.json")
    val = CocoBoxes(sets / "det_val" / "images", sets / "det_val" / "annotations.json")
    with caplog.at_level(logging.INFO, logger="squeezer"):
        result = squeezer.search(ssdlite(), data=(train, val), metric=map50, loss=detection_loss, budget="3MB",
                                 target="arm", trials=2, trial_steps=3, final_epochs=0.2, batch_size=4,
                                 sensitivity=False, latency_seeds="none", run=str(tmp_path / "det"), progress=False)
    best = result.best.metrics
    assert best["metric"] == result.base["metric"] == "mAP@0.5" and best["size_bytes"] <= 3_000_000
    assert 0.0 <= best["val_metric"] <= 1.0
    assert "distillation off" in caplog.text and "output layer: its channels are the model's outputs" in caplog.text
    with torch.no_grad():
        out = result.best.model.eval()([torch.rand(3, DET_PX, DET_PX)])
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_probes_of_a_detector_re_estimate_bn_through_its_loss(sets, caplog):
    train = as_split(CocoBoxes(sets / "det_train" / "images", sets / "det_train" / "annotations.json"))
    val = as_split(CocoBoxes(sets / "det_val" / "images", sets / "det_val" / "annotations.json"))
    model, shape = ssdlite().eval(), (3, DET_PX, DET_PX)
    bn = model.backbone.features[0][0][1]
    with pytest.raises(AssertionError, match="targets should not be none"):   # a detector trains on its targets
        recalibrate_bn_(copy.deepcopy(model), train, batches=1, batch_size=8)
    m = copy.deepcopy(model)
    recalibrate_bn_(m, train, batches=1, batch_size=8, loss_fn=detection_loss)
    stem = m.backbone.features[0][0][1]
    assert stem.num_batches_tracked == 1 and not torch.allclose(stem.running_var, bn.running_var)
    space = SearchSpace.build(model, shape, weight_bits=(8, None), act_bits=(8, None))
    space.layers, space.groups, space.rank_layers = space.layers[:2], space.groups[:2], []
    with caplog.at_level(logging.DEBUG, logger="squeezer"):
        sens = measure(model, space, val, shape, val_size=8, bn_data=train, bn_images=8, metric=map50,
                       loss=detection_loss)
    assert sens["n_probes"] >= 8 and 0.0 <= sens["base_accuracy"] <= 1.0
    assert "probe" not in caplog.text or "failed" not in caplog.text      # every probe ran
