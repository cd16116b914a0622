"""pydecouple.prune: the pruned model is physically smaller, computes exactly the
original with the pruned channels zeroed, counts its FLOPs and parameters right,
refuses bad arguments by name, and survives a checkpoint round trip."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pydecouple.flops import flops as count_flops
from pydecouple import checkpoint
from pydecouple.models import build
from pydecouple.prune import (apply_plan, channel_scores, keep_for_flops, load_pruned, make_plan, parameter_count,
                              prunable_groups, prune, pruned_meta, resize, slimming_l1)


class TVBottleneck(nn.Module):
    """torchvision's Bottleneck, reproduced (torchvision is not a dependency)."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class TVStyleNet(nn.Module):
    """A torchvision-style ResNet stem and stage, with a conv head that feeds the output."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        ds = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.layer1 = nn.Sequential(TVBottleneck(16, 8, 2, ds), TVBottleneck(32, 8))
        self.head = nn.Conv2d(32, 10, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.pool(self.head(x)).flatten(1)


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)

pytestmark = pytest.mark.usefixtures("one_thread")


class TVVGG(nn.Module):
    """torchvision's VGG layout: features, avgpool to k x k, flatten, an MLP classifier
    (so the last conv's channels reach a Linear as blocks of k*k features)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(24 * 4, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _randomize(model):
    _randomize_bn(model)
    with torch.no_grad():  # gammas of both signs and spread magnitudes, so rankings mean something
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.randn_like(m.weight))
    return model.eval()


def _masked_forward(model, plan, x):
    """The original model with every pruned channel zeroed right after its conv's BN
    (or its conv where there is none): an independent statement of what pruning computes."""
    mods = dict(model.named_modules())
    hooks = []
    for name, kept in plan.kept.items():
        g = plan.groups[name]
        where = mods[g.bn] if g.bn else mods[name]
        mask = torch.zeros(g.channels)
        mask[kept] = 1
        hooks.append(where.register_forward_hook(lambda m, i, o, mask=mask: o * mask.view(1, -1, 1, 1)))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in hooks:
            h.remove()


CASES = {
    "small_vgg": (lambda: build("small_vgg"), (3, 32)),
    "tiny_cnn": (lambda: build("tiny_cnn", in_channels=1), (1, 8)),
    "resnet20": (lambda: build("resnet20"), (3, 32)),
    "tv_vgg": (TVVGG, (3, 16)),
    "tv_bottleneck": (TVStyleNet, (3, 16)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("criterion,scope", [("bn_gamma", "global"), ("l1", "layer"), ("l1", "global")])
def test_pruned_equals_masked_original(case, criterion, scope):
    make, (cin, hw) = CASES[case]
    model = _randomize(make())
    pruned = prune(model, 0.5, criterion, scope)
    plan = pruned.prune_plan
    assert plan.kept and any(len(v) < plan.groups[k].channels for k, v in plan.kept.items())
    x = torch.rand(4, cin, hw, hw)
    with torch.no_grad():
        out = pruned(x)
    torch.testing.assert_close(out, _masked_forward(model, plan, x), rtol=1e-4, atol=1e-4)
    # ...and pruning did change the function (the check above can fail):
    with torch.no_grad():
        assert not torch.allclose(out, model(x), atol=1e-3)


def test_shapes_small_vgg():
    model = _randomize(build("small_vgg"))
    pruned = prune(model, 0.5, "l1", "layer")
    f = pruned.features
    convs = [m for m in f if isinstance(m, nn.Conv2d)]
    bns = [m for m in f if isinstance(m, nn.BatchNorm2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert [c.in_channels for c in convs] == [3, 32, 32, 64, 64, 128]
    assert [tuple(c.weight.shape[:2]) for c in convs] == [(32, 3), (32, 32), (64, 32), (64, 64), (128, 64), (128, 128)]
    assert all(b.num_features == c.out_channels == b.running_mean.numel() == b.weight.numel() for b, c in zip(bns, convs))
    assert pruned.classifier.in_features == 128 and pruned.classifier.weight.shape == (10, 128)
    # the original is untouched
    assert [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)] == [64, 64, 128, 128, 256, 256]


def test_kept_channels_are_the_largest_by_the_criterion():
    model = _randomize(build("small_vgg"))
    plan = make_plan(model, 0.25, "bn_gamma", "layer")
    gam = model.features[1].weight.detach().abs()
    assert sorted(plan.kept["features.0"]) == sorted(torch.topk(gam, 16).indices.tolist())
    l1 = channel_scores(model, "l1")["features.3"]
    assert torch.allclose(l1, model.features[3].weight.detach().abs().sum((1, 2, 3)).double())
    # global: one threshold over every layer's |gamma|
    plan = make_plan(model, 0.3, "bn_gamma", "global")
    allg = torch.cat([model.get_submodule(plan.groups[k].bn).weight.detach().abs() for k in plan.kept])
    thr = torch.sort(allg, descending=True).values[round(0.3 * len(allg)) - 1]
    for k, kept in plan.kept.items():
        g = model.get_submodule(plan.groups[k].bn).weight.detach().abs()
        assert set(kept) == set(torch.nonzero(g >= thr).flatten().tolist()) or len(kept) == 1


def test_flops_and_parameter_counts():
    model = _randomize(build("small_vgg"))
    pruned = prune(model, 0.5, "l1", "layer")
    x = torch.rand(2, 3, 32, 32)
    widths = [(3, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128)]
    sizes = [32, 32, 16, 16, 8, 8]
    macs = sum(ci * co * 9 * s * s for (ci, co), s in zip(widths, sizes)) + 128 * 10
    assert count_flops(pruned, x).total == macs
    dense = count_flops(model, x).total
    assert 0.24 < macs / dense < 0.27  # each conv ~ a quarter; the first keeps its 3 inputs
    params = sum(ci * co * 9 + 2 * co for ci, co in widths) + 128 * 10 + 10
    assert parameter_count(pruned) == params


def test_keep_for_flops_hits_the_target():
    model = _randomize(build("small_vgg"))
    x = torch.rand(2, 3, 32, 32)
    for target in (0.3, 0.5):
        keep = keep_for_flops(model, target, x, "l1", "layer")
        ratio = count_flops(prune(model, keep, "l1", "layer"), x).total / count_flops(model, x).total
        assert abs(ratio - target) < 0.02, (target, keep, ratio)


def test_resnet_prunes_only_inside_blocks():
    groups, skipped = prunable_groups(build("resnet20"))
    names = [g.conv for g in groups]
    assert names == [f"layer{i}.{j}.conv1" for i in (1, 2, 3) for j in range(3)]
    assert "residual" in skipped["conv1"] and "residual" in skipped["layer2.0.conv2"]
    assert "residual" in skipped["layer2.0.downsample.0"]
    groups, skipped = prunable_groups(TVStyleNet())
    # the stem feeds only convs here (block 0's conv1 and its projection shortcut): prunable too
    assert {g.conv for g in groups} == {"conv1"} | {f"layer1.{i}.conv{j}" for i in (0, 1) for j in (1, 2)}
    stem = next(g for g in groups if g.conv == "conv1")
    assert sorted(stem.consumers) == [("layer1.0.conv1", 0), ("layer1.0.downsample.0", 0)]
    assert "output" in skipped["head"]


def test_state_dict_round_trip(tmp_path):
    model = _randomize(build("small_vgg"))
    pruned = prune(model, 0.4)
    meta = {"arch": "small_vgg", "num_classes": 10, "in_channels": 3, "decoupled": False}
    path = checkpoint.save(tmp_path / "p.pt", pruned, pruned_meta(pruned, meta))
    loaded, m2 = load_pruned(path)
    assert m2["prune"]["widths"] == pruned.prune_plan.widths
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned.eval()(x))
    # a plain state_dict loads into the resized skeleton, and not into the unpruned model
    skel = resize(build("small_vgg"), pruned.prune_plan.widths)
    skel.load_state_dict(pruned.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        build("small_vgg").load_state_dict(pruned.state_dict())
    with pytest.raises(checkpoint.CheckpointError, match="not a pruned-model checkpoint"):
        load_pruned(checkpoint.save(tmp_path / "d.pt", model, meta))


def test_pruned_model_trains():
    from pydecouple.train import train

    model = build("tiny_cnn", in_channels=1)
    pruned = prune(model, 0.5, "l1", "layer")
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    before = pruned.features[0].weight.detach().clone()
    hist = train(pruned, (x, y), epochs=1, batch_size=32, progress=False)
    assert hist[0]["train_ce"] > 0 and not torch.equal(before, pruned.features[0].weight)


def test_slimming_l1_adds_the_subgradient():
    model = build("tiny_cnn", in_channels=1)
    _randomize(model).train()
    x = torch.rand(8, 1, 8, 8)
    model(x).sum().backward()
    g0 = model.features[1].weight.grad.clone()
    model.zero_grad()
    h = slimming_l1(model, 0.1)
    model(x).sum().backward()
    gam = model.features[1].weight.detach()
    torch.testing.assert_close(model.features[1].weight.grad, g0 + 0.1 * torch.sign(gam))
    h.remove()
    model.zero_grad()
    model(x).sum().backward()
    torch.testing.assert_close(model.features[1].weight.grad, g0)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(keep=0.0), "'keep'"), (dict(keep=1.5), "'keep'"), (dict(keep="half"), "'keep'"),
    (dict(keep=0.5, criterion="l2"), "'criterion'"), (dict(keep=0.5, scope="block"), "'scope'"),
    (dict(keep=0.5, min_channels=0), "'min_channels'"), (dict(keep=0.5, round_to=0), "'round_to'"),
    (dict(keep=0.5, min_fraction=2.0), "'min_fraction'"), (dict(keep={"features.0": 0.0}), "'keep\\['features.0'\\]'"),
])
def test_bad_arguments_are_named(kwargs, arg):
    with pytest.raises(ValueError, match=arg) as e:
        prune(build("small_vgg"), **kwargs)
    assert "got" in str(e.value)


def test_bad_models_and_plans_are_named():
    with pytest.raises(KeyError, match="'keep'"):
        prune(build("small_vgg"), {"classifier": 0.5})
    with pytest.raises(ValueError, match="'model'.*decoupled"):
        prune(build("small_vgg", decoupled=True), 0.5)
    with pytest.raises(TypeError, match="'model'"):
        prune("small_vgg", 0.5)

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + x

    with pytest.raises(ValueError, match="no prunable conv.*addition"):
        prune(Residual(), 0.5)
    plan = make_plan(build("small_vgg"), 0.5)
    with pytest.raises(ValueError, match="'plan' was made for another model"):
        apply_plan(build("vgg16"), plan)  # same conv names and widths, but features.17 feeds a conv there
    with pytest.raises(ValueError, match="'plan' was made for another model"):
        apply_plan(build("resnet20"), plan)
    with pytest.raises(ValueError, match="'widths\\['features.0'\\]'"):
        resize(build("small_vgg"), {"features.0": 65})
    with pytest.raises(ValueError, match="'strength'"):
        slimming_l1(build("small_vgg"), -1.0)
    with pytest.raises(ValueError, match="'target'"):
        keep_for_flops(build("small_vgg"), 1.5, torch.rand(2, 3, 32, 32))


def test_recalibrate_bn_matches_the_eval_time_statistics():
    from pydecouple.prune import recalibrate_bn

    model = _randomize(build("tiny_cnn", in_channels=1))
    x = torch.rand(96, 1, 8, 8)
    pruned = prune(model, 0.5, "l1", "layer")
    recalibrate_bn(pruned, x, batch_size=32)
    assert not pruned.training
    with torch.no_grad():
        h = pruned.features[0](pruned.normalize(x))
    torch.testing.assert_close(pruned.features[1].running_mean, h.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert pruned.features[1].momentum == 0.1  # restored
    # a decoupled model: the gates' logit-norm statistics are left alone by default
    # logit norm with threshold 0: about half the gates closed per image
    dec = build("tiny_cnn", in_channels=1, decoupled=True, decouple_kwargs=dict(logit_norm=True, bias_init=0.0))
    from pydecouple.nn import gate_modules

    g = gate_modules(dec)[0][1]
    before = g.norm.running_mean.clone()
    recalibrate_bn(dec, x, batch_size=96)
    assert torch.equal(g.norm.running_mean, before)
    # its BN statistics are those of the dense conv output (what training normalises), not of
    # the sparse op's output, where deselected filters are zeros
    conv1 = dec.features[3]
    with torch.no_grad():
        dec.eval()
        h = dec.features[2](dec.features[1](dec.features[0](dec.normalize(x))))
        dense_out = conv1._conv_forward(h, conv1.weight, conv1.bias)
    torch.testing.assert_close(dec.features[4].running_mean, dense_out.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert conv1.use_sparse_op
    recalibrate_bn(dec, x, batch_size=32, include_gates=True)
    assert not torch.equal(g.norm.running_mean, before)
    with pytest.raises(ValueError, match="'batch_size'"):
        recalibrate_bn(dec, x, batch_size=1)


COMPARE = Path(__file__).resolve().parents[1] / "benchmarks" / "prune" / "compare.py"


def test_compare_script_trains_times_and_retimes(tmp_path):
    """benchmarks/prune/compare.py end to end on digits, a few steps per epoch: every arm
    trains from the base, the table and the plot are written, and --time-only rebuilds
    them from the saved checkpoints alone."""
    import csv
    import json
    import subprocess
    import sys

    runs, out = tmp_path / "runs", tmp_path / "res" / "digits"
    args = [sys.executable, str(COMPARE), "--data", "digits", "--runs", str(runs), "--out", str(out),
            "--arms", "dense", "prune@0.5", "dec@0.65+kd=0.5/4", "--dtypes", "float32", "bfloat16", "--repeats", "1",
            "--min-time", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(args + ["--quick", "2"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((runs / "prune_0.5_s0" / "result.json").read_text())
    assert abs(res["flops_ratio"] - 0.5) < 0.02 and res["widths"] and "test_acc_recal" in res
    dec = json.loads((runs / "dec_0.65_kd_0.5_4_s0" / "result.json").read_text())
    assert dec["history"][-1]["train_kd"] > 0 and 0 < dec["flops_ratio"] <= 1.01
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [r["arm"] for r in rows] == ["dense", "prune@0.5", "dec@0.65+kd=0.5/4"]
    assert all(float(r["float32_b32_ms"]) > 0 for r in rows) and out.with_suffix(".png").stat().st_size > 10000
    out.with_suffix(".csv").unlink()
    proc = subprocess.run(args + ["--time-only"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [r["acc_mean"] for r in again] == [r["acc_mean"] for r in rows]  # read back, not retrained
    bad = subprocess.run(args[:2] + ["--data", "digits", "--arms", "dec@0.5+crit=l1"], capture_output=True, text=True)
    assert bad.returncode != 0 and "option 'crit'" in bad.stderr
