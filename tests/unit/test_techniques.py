"""Transfer techniques on tiny data: each test shows the technique does what it claims."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transfer import freezing
from transfer.config import FinetuneParams
from transfer.data import ImageTensors, to_float
from transfer.errors import DataError, TransferError
from transfer.models import TransferNet, create_model
from transfer.techniques import (
    TechniqueInputs,
    run_dann,
    run_distill,
    run_l2sp,
    run_multitask,
    run_progressive,
    run_zero_shot,
)
from transfer.techniques.conservative import L2SP, Distillation, distance_to_source
from transfer.techniques.dann import DANN, dann_lambda, grad_reverse, train_dann
from transfer.techniques.gradual import GradualUnfreezing
from transfer.techniques.multitask import (
    MultiTaskNet,
    at_least_labels,
    evaluate_multitask,
    multitask_loss,
    parity_labels,
    train_multitask,
)
from transfer.techniques.progressive import ProgressiveNet
from transfer.techniques.zeroshot import (
    DIGIT_ATTRIBUTES,
    attribute_classifier,
    chance_level,
    class_embeddings,
    conse_embed,
    conse_predict,
    zero_shot_accuracy,
)
from transfer.train import Callback, EpochStats, accuracy, fit, predict_proba, seed_everything

CPU = torch.device("cpu")
SIZE = 12
DIGITS4 = ["0", "1", "2", "3"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is faster and steadier than several on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stripes(n_per: int, classes: list[str], seed: int = 0, horizontal: bool = False,
            size: int = SIZE) -> ImageTensors:
    """Class k = a bright 2-px stripe at band k (vertical, or horizontal), plus noise."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for k in range(len(classes)):
        base = torch.zeros(1, size, size)
        start = k * size // len(classes)
        base[0, :, start:start + 2] = 180
        for _ in range(n_per):
            images.append((base + torch.rand(1, size, size, generator=g) * 60).clamp(0, 255))
            labels.append(k)
    x = torch.stack(images).to(torch.uint8)
    x = x.transpose(2, 3).contiguous() if horizontal else x
    return ImageTensors(x, torch.tensor(labels), classes)


def params(**kw) -> FinetuneParams:
    base = {"epochs": 3, "batch_size": 8, "augment": False, "lr": 1e-2}
    return FinetuneParams(**{**base, **kw})


@pytest.fixture(scope="module")
def source() -> TransferNet:
    """tiny_cnn pretrained on the 4-class vertical-stripes task."""
    seed_everything(0)
    model = create_model("tiny_cnn", 4)
    fit(model, stripes(16, DIGITS4), None, params(epochs=5, batch_size=16), device=CPU, seed=0,
        progress=False)
    return model.eval()


def full_finetune_copy(source: TransferNet, num_classes: int) -> TransferNet:
    seed_everything(0)
    model = copy.deepcopy(source)
    model.reset_classifier(num_classes)
    freezing.apply_freeze(model, "full")
    return model


# --------------------------------------------------------------------------- L2-SP


def test_l2sp_penalty_is_the_formula(source):
    model = full_finetune_copy(source, 3)
    ref = copy.deepcopy(source.state_dict())
    with torch.no_grad():
        for p in model.body.parameters():
            p.add_(0.1)
    body_sq = sum(
        (p - ref[n]).pow(2).sum() for n, p in model.named_parameters() if n.startswith("body.")
    )
    head_sq = sum(p.pow(2).sum() for p in model.head.parameters())
    penalty = L2SP(ref, alpha=0.3, beta=0.7)(model, None, None, None)
    assert torch.allclose(penalty, 0.15 * body_sq + 0.35 * head_sq)


def test_l2sp_treats_a_head_of_the_source_shape_as_new(source):
    model = full_finetune_copy(source, 4)  # same head shape as the source: still new
    l2sp = L2SP(source.state_dict(), 1.0, 1.0)
    assert not l2sp.is_body("head.weight", model.head.weight)
    assert l2sp.is_body("body.stages.block1.0.weight", model.body.stages.block1[0].weight)


def test_l2sp_keeps_weights_closer_to_the_source_than_plain_finetuning(source):
    target = stripes(8, DIGITS4[:3], seed=1, horizontal=True)
    ref = copy.deepcopy(source.state_dict())
    cfg = params(epochs=3, weight_decay=0.0)
    distances = {}
    for alpha in (0.0, 1.0):
        model = full_finetune_copy(source, 3)
        fit(model, target, None, cfg, device=CPU, seed=0, extra_loss=L2SP(ref, alpha, 0.0),
            progress=False)
        distances[alpha] = distance_to_source(model, ref)
    assert distances[0.0] > 0.1
    assert distances[1.0] < 0.6 * distances[0.0]


# --------------------------------------------------------------------------- distillation


def test_distillation_keeps_source_outputs_closer_to_the_teacher(source):
    target = stripes(8, DIGITS4[:3], seed=1, horizontal=True)
    held_out = to_float(stripes(8, DIGITS4[:3], seed=2, horizontal=True).images)
    cfg = params(epochs=6, lr=3e-2, weight_decay=0.0)
    kl = {}
    for weight in (0.0, 5.0):
        model = full_finetune_copy(source, 3)
        distill = Distillation(source, weight, temperature=2.0)
        fit(model, target, None, cfg, device=CPU, seed=0, extra_loss=distill, progress=False)
        distill.close()
        with torch.no_grad():
            student = distill.source_head(model.eval().body(held_out))  # (B, 4)
            teacher = source(held_out)  # (B, 4)
        kl[weight] = F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True,
                              reduction="batchmean").item()
    assert kl[5.0] < 0.6 * kl[0.0]


def test_distillation_reuses_the_forward_pass_features(source):
    model = full_finetune_copy(source, 3)
    calls = []
    model.body.register_forward_hook(lambda *_: calls.append(1))
    distill = Distillation(source, 1.0, 2.0)
    data = stripes(4, DIGITS4[:3], horizontal=True)  # 12 images -> 3 batches of 4
    fit(model, data, None, params(epochs=1, batch_size=4), device=CPU, seed=0, extra_loss=distill,
        progress=False)
    # one body pass per batch, plus one on the first batch, before the tap had its hook
    assert len(calls) == 3 + 1
    distill.close()
    assert not distill.tap._handle


def test_distillation_features_mode_and_teacher_untouched(source):
    before = copy.deepcopy(source.state_dict())
    distill = Distillation(source, 1.0, 2.0, mode="features")
    model = full_finetune_copy(source, 3)
    x = to_float(stripes(2, DIGITS4[:3]).images)
    assert distill(model.eval(), x, None, None).item() == pytest.approx(0.0, abs=1e-10)
    fit(model, stripes(4, DIGITS4[:3], horizontal=True), None, params(epochs=1), device=CPU, seed=0,
        extra_loss=distill, progress=False)
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())
    with pytest.raises(TransferError):
        Distillation(source, 1.0, 2.0, mode="cosine")


# --------------------------------------------------------------------------- gradual unfreezing


class Recorder(Callback):
    def __init__(self) -> None:
        self.trainable, self.groups, self.training = [], [], []

    def on_epoch_start(self, epoch, model, optimizer):
        self.trainable.append([all(p.requires_grad for p in b.parameters()) for b in model.blocks])
        groups = optimizer.param_groups
        self.groups.append([(g.get("name"), g["lr"], g.get("initial_lr")) for g in groups])

    def on_epoch_end(self, stats: EpochStats, model):
        self.training.append([b.training for b in model.blocks])


def test_gradual_unfreezing_schedule_groups_and_lrs(source):
    model = copy.deepcopy(source)
    model.reset_classifier(3)
    freezing.apply_freeze(model, "head")
    bn1 = model.body.stages.block1[1]
    bn1_mean = bn1.running_mean.clone()
    rec, lr, decay = Recorder(), 0.01, 0.5
    bn1_during = []

    class WatchBN(Callback):
        def on_epoch_end(self, stats, model):
            bn1_during.append(torch.equal(bn1.running_mean, bn1_mean))

    fit(model, stripes(4, DIGITS4[:3], horizontal=True), None, params(epochs=4, lr=lr), device=CPU,
        seed=0, param_groups=freezing.param_groups(model, lr),
        callbacks=[GradualUnfreezing(1, lr, decay), rec, WatchBN()], progress=False)
    # epoch 1: head only; 2: + block2 (top); 3 and 4: + block1
    assert rec.trainable == [[False, False], [False, True], [True, True], [True, True]]
    assert [len(g) for g in rec.groups] == [1, 2, 3, 3]
    head, top, bottom = rec.groups[2]
    assert (top[0], bottom[0]) == ("body.block2", "body.block1")
    assert top[2] == pytest.approx(lr * decay) and bottom[2] == pytest.approx(lr * decay**2)
    # a group joins at its decayed LR scaled by where the cosine schedule of the head stands
    assert rec.groups[1][1][1] == pytest.approx(rec.groups[1][0][1] * decay)
    assert bottom[1] == pytest.approx(head[1] * decay**2)
    # BatchNorm: frozen blocks stay in eval mode (fixed stats); unfrozen ones train
    assert rec.training == [[False, False], [False, True], [True, True], [True, True]]
    assert bn1_during == [True, True, False, False]


def test_gradual_unfreezing_rejects_a_zero_period():
    with pytest.raises(TransferError):
        GradualUnfreezing(0, 0.1)


# --------------------------------------------------------------------------- multitask


def test_derived_labels_from_digit_names():
    classes = ["0", "1", "2", "7", "digit_9"]
    labels = torch.tensor([0, 1, 2, 3, 4, -1])
    assert parity_labels(labels, classes).tolist() == [0, 1, 0, 1, 1, -1]
    assert at_least_labels(labels, classes).tolist() == [0, 0, 0, 1, 1, -1]
    assert at_least_labels(labels, classes, threshold=2).tolist() == [0, 0, 1, 1, 1, -1]
    with pytest.raises(DataError):
        parity_labels(labels[:1], ["cat"])


def test_multitask_loss_respects_weights():
    torch.manual_seed(0)
    out = {"a": torch.randn(5, 3), "b": torch.randn(5, 2)}
    tgt = {"a": torch.tensor([0, 1, 2, 0, 1]), "b": torch.tensor([0, 1, 0, 1, 0])}
    ce_a, ce_b = F.cross_entropy(out["a"], tgt["a"]), F.cross_entropy(out["b"], tgt["b"])
    assert torch.allclose(multitask_loss(out, tgt, {"a": 2.0, "b": 0.5}), 2 * ce_a + 0.5 * ce_b)
    assert torch.allclose(multitask_loss(out, tgt, [1.0, 0.0]), ce_a)
    with pytest.raises(TransferError):
        multitask_loss(out, tgt, [1.0])


def _mlp_net() -> MultiTaskNet:
    seed_everything(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 16), nn.ReLU())  # (B, 16)
    return MultiTaskNet(body, 16, {"class": 4, "parity": 2})


def test_multitask_both_heads_learn_and_zero_weight_freezes_a_head():
    data = stripes(8, DIGITS4)
    tasks = {"class": data.labels, "parity": parity_labels(data.labels, data.classes)}
    net = _mlp_net()
    history = train_multitask(net, data, tasks, {"class": 1.0, "parity": 1.0}, epochs=8, lr=1e-2,
                              batch_size=8, seed=0, device=CPU)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    test = stripes(4, DIGITS4, seed=3)
    acc = evaluate_multitask(net, test, {"class": test.labels,
                                         "parity": parity_labels(test.labels, test.classes)})
    assert acc["class"] >= 0.9 and acc["parity"] >= 0.9

    net = _mlp_net()
    parity_before = copy.deepcopy(net.heads["parity"].state_dict())
    train_multitask(net, data, tasks, [1.0, 0.0], epochs=2, lr=1e-2, batch_size=8, seed=0)
    after = net.heads["parity"].state_dict()
    assert all(torch.equal(parity_before[k], v) for k, v in after.items())
    assert net.task("class")(to_float(test.images)).shape == (len(test), 4)


# --------------------------------------------------------------------------- DANN


def test_grad_reverse_is_identity_forward_and_negates_backward_exactly():
    x = torch.randn(4, 3, requires_grad=True)
    y = grad_reverse(x, 0.7)
    assert torch.equal(y, x)
    g = torch.randn(4, 3)
    y.backward(g)
    assert torch.equal(x.grad, -0.7 * g)


def test_dann_lambda_ramp():
    assert dann_lambda(0.0, 2.0) == 0.0
    assert dann_lambda(1.0, 2.0) == pytest.approx(2.0 * (2 / (1 + math.exp(-10)) - 1))
    ramp = [dann_lambda(p / 10, 1.0) for p in range(11)]
    assert ramp == sorted(ramp) and ramp[-1] < 1.0


def blob_domain(n_per: int, brightness: int, seed: int, size: int = 8) -> ImageTensors:
    """Class 'tl' = bright top-left quadrant, 'br' = bright bottom-right; target = brighter."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    h = size // 2
    for k in range(2):
        for _ in range(n_per):
            img = torch.rand(1, size, size, generator=g) * 40 + 20
            if k == 0:
                img[:, :h, :h] += 100
            else:
                img[:, h:, h:] += 100
            images.append((img + brightness).clamp(0, 255))
            labels.append(k)
    return ImageTensors(torch.stack(images).to(torch.uint8), torch.tensor(labels), ["tl", "br"])


def test_dann_confuses_the_domain_classifier_and_keeps_the_label_task():
    # Target = source + 100 brightness. lambda_max=0 is source-only training: the domain
    # classifier still trains but no gradient reaches the body, and the domains stay
    # separable; with the reversed gradient the domain classifier is pushed to chance.
    source, target, test = blob_domain(32, 0, 0), blob_domain(32, 100, 1), blob_domain(32, 100, 2)
    results = {}
    for lambda_max in (0.0, 1.0):
        runs = []
        for seed in (0, 1):
            seed_everything(seed)
            body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())  # (B, 16)
            model = DANN(body, 16, 2)
            history = train_dann(model, source, target, epochs=20, lr=3e-3, batch_size=16,
                                 lambda_max=lambda_max, seed=seed, device=CPU, target_eval=test)
            runs.append({**history[-1], "source_acc": accuracy(model, source, CPU)})
        results[lambda_max] = runs
    only, dann = results[0.0], results[1.0]
    assert all(r["source_acc"] >= 0.95 for r in only + dann)  # the label task is learnt
    assert min(r["target_acc"] for r in dann) >= max(r["target_acc"] for r in only) - 0.05
    assert all(r["domain_acc"] >= 0.95 for r in only)
    assert all(abs(r["domain_acc"] - 0.5) <= 0.1 for r in dann)
    assert dann[-1]["lambda"] == pytest.approx(dann_lambda(79 / 80, 1.0))


def test_run_dann_returns_a_transfernet_trained_without_target_labels(source):
    src = stripes(4, DIGITS4, seed=1)
    target = stripes(4, DIGITS4, seed=2)
    unlabelled = ImageTensors(target.images, torch.full_like(target.labels, -1), target.classes)
    model, history = run_dann(source, src, unlabelled, target, params(epochs=2), CPU, 0)
    assert isinstance(model, TransferNet) and len(history) == 2
    assert {"domain_acc", "lambda", "target_acc"} <= set(history[-1])
    with pytest.raises(TransferError):
        run_dann(source, src, unlabelled, stripes(2, ["a", "b"]), params(epochs=1), CPU, 0)
    scratch, _ = run_dann("tiny_cnn", src, unlabelled, None, params(epochs=1), CPU, 0)
    assert scratch.head.out_features == 4


# --------------------------------------------------------------------------- progressive nets


def test_progressive_net_never_changes_the_source_column(source):
    net = ProgressiveNet(source, 3, (1, SIZE, SIZE))
    probe = to_float(stripes(4, DIGITS4, seed=5).images)
    before_out = net(probe, task="source").clone()
    before_params = copy.deepcopy(net.source.state_dict())
    initial_target = net(probe).clone()
    fit(net, stripes(8, DIGITS4[:3], seed=1, horizontal=True), None, params(epochs=3, lr=3e-2),
        device=CPU, seed=0, progress=False)
    assert net.training and not net.source.training
    assert torch.equal(net.eval()(probe, task="source"), before_out)
    assert all(torch.equal(before_params[k], v) for k, v in net.source.state_dict().items())
    assert not any(p.requires_grad for p in net.source.parameters())
    assert not torch.allclose(net(probe), initial_target)  # the target column did learn
    assert any(a.weight.abs().sum() > 0 for a in net.laterals)  # ... and so did the adapters
    assert torch.equal(net(probe, task="source"), source(probe))  # same as the original model


def test_progressive_net_starts_as_its_target_column(source):
    net = ProgressiveNet(source, 3, (1, SIZE, SIZE)).eval()
    probe = to_float(stripes(1, DIGITS4).images)
    assert torch.allclose(net(probe), net.target(probe))  # zero adapters add nothing
    with pytest.raises(TransferError):
        net(probe, task="other")


def test_progressive_net_state_dict_round_trip(source):
    net = ProgressiveNet(source, 3, (1, SIZE, SIZE))
    with torch.no_grad():
        net.laterals[0].weight.add_(0.5)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    again = ProgressiveNet.empty("tiny_cnn", 4, 3, (1, SIZE, SIZE))
    again.load_state_dict(state)
    probe = to_float(stripes(1, DIGITS4).images)
    assert torch.equal(again.eval()(probe), net.eval()(probe))


# --------------------------------------------------------------------------- zero-shot (ConSE)


def test_conse_embedding_is_the_renormalised_top_t_combination():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    seen = torch.eye(3)
    assert torch.allclose(conse_embed(probs, seen, top_t=2), torch.tensor([[0.625, 0.375, 0.0]]))
    assert torch.allclose(conse_embed(probs, seen, top_t=1), torch.tensor([[1.0, 0.0, 0.0]]))


def test_conse_predicts_the_unseen_class_between_the_seen_ones():
    seen = torch.eye(3)  # A, B, C
    unseen = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])  # AB, BC, AC
    probs = torch.tensor([[0.45, 0.45, 0.1], [0.1, 0.5, 0.4], [0.4, 0.1, 0.5]])
    assert conse_predict(probs, seen, unseen, top_t=2).tolist() == [0, 1, 2]
    assert chance_level(3) == pytest.approx(1 / 3)
    acc = zero_shot_accuracy(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]))
    assert acc == pytest.approx(2 / 3)


def test_digit_attribute_table_is_usable():
    rows = torch.tensor(list(DIGIT_ATTRIBUTES.values()))
    assert rows.shape[0] == 10 and len(set(map(tuple, rows.tolist()))) == 10
    emb = class_embeddings(["digit_3", "8"])
    assert torch.equal(emb[0], torch.tensor(DIGIT_ATTRIBUTES["3"]))
    with pytest.raises(TransferError):
        class_embeddings(["a"], {"b": [1.0]})


class PixelNet(nn.Module):
    """A 'source model' whose body is the raw pixels: features = what the image shows."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Flatten()  # (B, 1, 4, 4) -> (B, 16)


def quadrant_data(n_per: int, seed: int) -> ImageTensors:
    """Seen A/B/C light one quadrant each; unseen AB/BC/AC light both of their parts."""
    parts = {"A": [(0, 0)], "B": [(0, 2)], "C": [(2, 0)], "AB": [(0, 0), (0, 2)],
             "BC": [(0, 2), (2, 0)], "AC": [(0, 0), (2, 0)]}
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for k, quads in enumerate(parts.values()):
        for _ in range(n_per):
            img = torch.rand(1, 4, 4, generator=g) * 60
            for r, c in quads:
                img[:, r:r + 2, c:c + 2] += 150
            images.append(img)
            labels.append(k)
    return ImageTensors(torch.stack(images).to(torch.uint8), torch.tensor(labels), list(parts))


def test_zero_shot_end_to_end_beats_chance():
    table = {"A": [1, 0, 0], "B": [0, 1, 0], "C": [0, 0, 1], "AB": [1, 1, 0], "BC": [0, 1, 1],
             "AC": [1, 0, 1]}
    train, test = quadrant_data(10, 0), quadrant_data(10, 1)
    unseen = ["AB", "BC", "AC"]
    result, history = run_zero_shot(PixelNet(), train, test, unseen, params(epochs=20, lr=5e-2),
                                    CPU, 0, attributes=table, top_t=2)
    assert result["chance"] == pytest.approx(1 / 3) and result["n_test"] == 30
    assert result["accuracy"] >= 0.8 and len(history) == 20
    attr, _ = run_zero_shot(PixelNet(), train, test, unseen, params(), CPU, 0, attributes=table,
                            method="attributes")
    assert attr["accuracy"] >= 0.8
    with pytest.raises(TransferError):
        run_zero_shot(PixelNet(), train, test, ["Z"], params(), CPU, 0, attributes=table)


def test_attribute_classifier_on_separable_features():
    feats = torch.eye(3).repeat_interleave(5, 0) + 0.01 * torch.randn(15, 3)
    labels = torch.arange(3).repeat_interleave(5)
    seen, unseen = torch.eye(3), torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    test = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    assert attribute_classifier(feats, labels, seen, test, unseen, ridge=1e-3).tolist() == [0, 1]


# --------------------------------------------------------------------------- uniform entry


@pytest.mark.parametrize("technique", [run_l2sp, run_distill, run_progressive, run_multitask],
                         ids=lambda fn: fn.__name__)
def test_each_technique_gives_a_target_classifier_and_leaves_the_source_alone(source, technique):
    before = copy.deepcopy(source.state_dict())
    train = stripes(4, DIGITS4[:3], seed=1, horizontal=True)
    val = stripes(2, DIGITS4[:3], seed=2, horizontal=True)
    cfg = params(epochs=2, unfreeze_every=1)
    model, history = technique(source, TechniqueInputs(train, val, cfg, CPU, 0))
    assert len(history) == 2 and history[-1]["val_acc"] is not None
    probs = predict_proba(model, val, CPU)
    assert probs.shape == (len(val), 3)
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())
