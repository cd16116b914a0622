"""Knowledge distillation: distillation_loss, DecouplingLoss(teacher=...),
DistillationLoss, and train() handing the batch to the teacher."""

import copy

import pytest
import torch
import torch.nn.functional as F

from pydecouple.data import load_dataset
from pydecouple.losses import DecouplingLoss, DistillationLoss, distillation_loss
from pydecouple.models import build
from pydecouple.nn import decouple
from pydecouple.train import evaluate, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_distillation_loss_formula():
    s, t = torch.randn(6, 10), torch.randn(6, 10)
    for temp in (1.0, 4.0):
        p = F.softmax(t / temp, 1)
        expect = (p * (p.log() - F.log_softmax(s / temp, 1))).sum(1).mean() * temp ** 2
        torch.testing.assert_close(distillation_loss(s, t, temp), expect)
    assert distillation_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    s.requires_grad_(True)
    t.requires_grad_(True)
    distillation_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None  # the teacher is a target
    with pytest.raises(ValueError, match="'temperature'"):
        distillation_loss(s, t, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(s, t[:, :5])


def _decoupled_pair():
    teacher = build("tiny_cnn", in_channels=1).eval()
    student = decouple(copy.deepcopy(teacher), logit_norm=True, bias_init=2.0)
    with torch.no_grad():  # a student that differs from its teacher
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return teacher, student


def test_decoupling_loss_with_teacher():
    teacher, student = _decoupled_pair()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    plain = DecouplingLoss(student, 10, lam_m=1.0, lam_s=0.5, rho=0.6)
    kd = DecouplingLoss(student, 10, lam_m=1.0, lam_s=0.5, rho=0.6, teacher=teacher, kd_weight=0.7, kd_temperature=3.0)
    kd.load_state_dict(plain.state_dict())
    student.eval()  # deterministic gates: both losses see the same forward
    logits = student(x)
    t0, terms0 = plain(logits, y)
    t1, terms1 = kd(logits, y, x)
    with torch.no_grad():
        expect_kd = distillation_loss(logits, teacher(x), 3.0)
    torch.testing.assert_close(terms1["kd"], expect_kd)
    rest = t0 - terms0["ce"]
    torch.testing.assert_close(t1, 0.3 * terms0["ce"] + 0.7 * expect_kd + rest)
    # the teacher is not the loss's: not optimised, not checkpointed
    assert not any(k.startswith("_teacher") or "teacher" in k for k in kd.state_dict())
    assert {id(p) for p in kd.parameters()} == {id(c.weight) for c in kd.classifiers}
    assert not any(p.requires_grad for p in teacher.parameters())
    assert kd.describe()["kd_weight"] == 0.7 and "kd_weight" not in plain.describe()
    with pytest.raises(ValueError, match="needs the inputs"):
        kd(logits, y)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(kd_weight=0.5), "'teacher'"), (dict(kd_weight=1.5, teacher="T"), "'kd_weight'"),
    (dict(kd_weight=0.5, kd_temperature=0.0, teacher="T"), "'kd_temperature'"),
    (dict(kd_weight=0.5, teacher="self"), "'teacher'"), (dict(kd_weight=0.5, teacher="junk"), "'teacher'"),
])
def test_bad_distillation_arguments_are_named(kwargs, arg):
    teacher, student = _decoupled_pair()
    kwargs = dict(kwargs)
    if "teacher" in kwargs:
        kwargs["teacher"] = {"T": teacher, "self": student, "junk": 3}[kwargs["teacher"]]
    with pytest.raises((ValueError, TypeError), match=arg) as e:
        DecouplingLoss(student, 10, **kwargs)
    assert "got" in str(e.value)
    with pytest.raises(ValueError, match="'teacher'"):
        DistillationLoss(None)


def test_train_distills_into_a_dense_student():
    """With the labels shuffled and CE switched off (kd_weight=1), the only thing a
    student can learn is its teacher: it must end up agreeing with it on the test
    images far above chance, and a student trained on the shuffled labels must not."""
    x, y, _ = load_dataset("digits", "train")
    xt, yt, _ = load_dataset("digits", "test")
    torch.manual_seed(0)
    teacher = build("tiny_cnn", in_channels=1)
    train(teacher, (x, y), epochs=4, progress=False, seed=0)
    assert evaluate(teacher, xt, yt)["acc"] > 0.7
    teacher.eval()
    calls = []
    teacher.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        t_pred = teacher(xt).argmax(1)
    calls.clear()

    def agreement(student):
        with torch.no_grad():
            return float((student.eval()(xt).argmax(1) == t_pred).float().mean())

    student = build("tiny_cnn", in_channels=1)
    hist = train(student, (x, shuffled), epochs=8, progress=False, seed=0,
                 loss=DistillationLoss(teacher, kd_weight=1.0, kd_temperature=2.0))
    assert calls and calls[0][0] == 128 and "train_kd" in hist[-1]  # the teacher saw every training batch
    control = build("tiny_cnn", in_channels=1)
    train(control, (x, shuffled), epochs=8, progress=False, seed=0)
    assert agreement(student) > 0.6 and agreement(control) < 0.3, (agreement(student), agreement(control))


def test_train_with_decoupling_loss_and_teacher_records_kd(tmp_path):
    x, y, _ = load_dataset("digits", "train")
    teacher, student = _decoupled_pair()
    loss = DecouplingLoss(student, 10, lam_m=1.0, lam_s=0.5, rho=0.6, teacher=teacher, kd_weight=0.5)
    hist = train(student, (x[:256], y[:256]), epochs=1, batch_size=64, lr=0.01, loss=loss, gate_lr_mult=10,
                 progress=False, out_dir=str(tmp_path), meta={"arch": "tiny_cnn"})
    assert hist[-1]["train_kd"] > 0
    from pydecouple import checkpoint

    blob = checkpoint.load(tmp_path / "last.pt")
    assert blob["meta"]["loss"]["kd_weight"] == 0.5
    assert not any("teacher" in k for k in blob["extra"]["loss"])
