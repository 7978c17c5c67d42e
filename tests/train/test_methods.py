"""Method losses: config round trip, the wiring of each method against its parts, training signal."""

import pytest
import torch

from tmkt.models import ModelConfig, build_model
from tmkt.train.losses import alignment_loss, linear_cka_per_step, mag_loss, mrp_loss, tet_loss
from tmkt.train.method import METHODS, MethodConfig, build_method
from tmkt.train.tsm import time_step_mixup

B, T, K, H = 8, 4, 4, 16

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(backbone="small", num_classes=K, input_size=(H, H)))


def _batch(seed: int = 0):
    """Static: a class-specific bright square repeated over T; events: its noisy edges. [B, T, 2, H, W]."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(B) % K
    img = torch.zeros(B, 2, H, H)
    for b, k in enumerate(labels.tolist()):
        r, c = 2 + 6 * (k // 2), 2 + 6 * (k % 2)
        img[b, :, r : r + 6, c : c + 6] = 1.0
    static = img.unsqueeze(1).repeat(1, T, 1, 1, 1)
    edges = (img - torch.roll(img, 1, dims=-1)).abs()
    events = ((edges.unsqueeze(1) * torch.rand(B, T, 2, H, H, generator=g)) > 0.3).float()
    events = torch.maximum(events, (torch.rand(B, T, 2, H, H, generator=g) < 0.02).float())
    return static, events, labels


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_config_round_trip_and_validation():
    cfg = MethodConfig(name="ekt", align_weight=0.25, mix_ratio_schedule="progress")
    assert MethodConfig.from_dict(cfg.to_dict()) == cfg
    assert MethodConfig.from_dict({"name": "dvs", "mag_weight": 1}) == MethodConfig(name="dvs", mag_weight=1.0)
    with pytest.raises(ValueError, match="unknown"):
        MethodConfig.from_dict({"name": "tmkt", "align_wieght": 0.5})
    with pytest.raises(ValueError, match="align_weight"):
        MethodConfig.from_dict({"align_weight": "0.5"})
    with pytest.raises(ValueError, match="mag_weight"):
        MethodConfig.from_dict({"mag_weight": True})
    with pytest.raises(ValueError, match="name"):
        MethodConfig(name="mixup")
    with pytest.raises(ValueError, match="mix_ratio"):
        MethodConfig(mix_ratio_min=0.8, mix_ratio_max=0.2)
    with pytest.raises(ValueError, match="finetune_switch"):
        MethodConfig(finetune_switch=1.5)
    with pytest.raises(ValueError, match="source_head"):
        MethodConfig(source_head="static")
    with pytest.raises(ValueError, match="bn_stats"):
        MethodConfig(bn_stats="static")


def test_paper_preset_reproduces_the_papers_settings_field_by_field():
    """The `paper` preset against the settings written down from the TMKT paper and EKT's code
    (shared/METHOD-NOTES.md, docs/method.md), one field at a time."""
    from tmkt.train.method import method_preset

    papers = {
        "name": "tmkt",  # TMKT: time-step mixup of static and event frames
        "source_head": "mixed",  # EKT's two classifiers (rgb_fc / dvs_fc); the event head is evaluated
        "bn_stats": "both",  # EKT's code: both calls per step update BatchNorm running statistics
        "mix_ratio_schedule": "uniform", "mix_ratio_min": 0.0, "mix_ratio_max": 1.0,  # r ~ U(0, 1) per sample
        "tet_lambda": 1e-3, "tet_target": 1.0, "label_smoothing": 0.1,  # EKT's TET and timm smoothing
        "event_loss_weight": 1.0, "static_loss_weight": 1.0,  # EKT: loss_rgb + loss_dvs
        "align_weight": 0.5, "eta_init": 1.0,  # EKT: --domain-loss-coefficient 0.5, eta initialised at 1
        "mag_weight": 0.1, "mrp_weight": 0.1,  # TMKT's "lightweight" auxiliaries (weights are ours)
    }
    cfg = method_preset("paper")
    for key, value in papers.items():
        assert getattr(cfg, key) == value, key
    assert method_preset("paper", name="ekt").name == "ekt"
    with pytest.raises(ValueError, match="unknown method preset"):
        method_preset("nope")


def test_dvs_is_tet_on_the_event_head():
    model = _model()
    static, events, labels = _batch()
    cfg = MethodConfig(name="dvs")
    loss, logs = build_method(cfg, T)(model, None, events, labels, 0.5, _gen())
    logits = model(events.transpose(0, 1), head="event")["logits"]
    want = tet_loss(logits, labels, lam=cfg.tet_lambda, target=cfg.tet_target, label_smoothing=cfg.label_smoothing)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert logs["acc_event"] == pytest.approx(float((logits.mean(0).argmax(-1) == labels).float().mean()))


def test_finetune_switches_from_static_to_events():
    model = _model()
    static, events, labels = _batch()
    method = build_method(MethodConfig(name="finetune", finetune_switch=0.5), T)
    early, logs_early = method(model, static, events, labels, 0.49, _gen())
    early_other, _ = method(model, static, torch.zeros_like(events), labels, 0.49, _gen())
    assert logs_early["static_phase"] == 1.0
    assert early.item() == pytest.approx(early_other.item(), rel=1e-6)  # events unused before the switch
    late, logs_late = method(model, static, events, labels, 0.5, _gen())
    late_other, _ = method(model, torch.zeros_like(static), events, labels, 0.5, _gen())
    assert logs_late["static_phase"] == 0.0
    assert late.item() == pytest.approx(late_other.item(), rel=1e-6)  # static unused after it
    dvs, _ = build_method(MethodConfig(name="dvs"), T)(model, None, events, labels, 0.5, _gen())
    assert late.item() == pytest.approx(dvs.item(), rel=1e-6)
    with pytest.raises(ValueError, match="static"):
        method(model, None, events, labels, 0.1, _gen())


def _two_stream_reference(model, cfg, method, src, ev, labels, aux):
    out_s = model(src, head=cfg.source_head, aux=aux)
    out_e = model(ev, head="event")
    w = torch.sigmoid(method.eta)
    cka = linear_cka_per_step(out_s["membrane"], out_e["membrane"])
    kw = dict(lam=cfg.tet_lambda, target=cfg.tet_target, label_smoothing=cfg.label_smoothing)
    loss = (
        cfg.static_loss_weight * tet_loss(out_s["logits"], labels, **kw)
        + cfg.event_loss_weight * tet_loss(out_e["logits"], labels, step_weights=1 - w, **kw)
        + cfg.align_weight * alignment_loss(cka, w)
    )
    return loss, out_s


def test_ekt_wiring_and_replacement_extremes():
    model = _model()
    static, events, labels = _batch()
    st, ev = static.transpose(0, 1), events.transpose(0, 1)
    cfg = MethodConfig(name="ekt")
    method = build_method(cfg, T)
    with torch.no_grad():
        method.eta.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    # progress 0: nothing replaced, the source stream is the static one
    loss0, logs0 = method(model, static, events, labels, 0.0, _gen())
    want0, _ = _two_stream_reference(model, cfg, method, st, ev, labels, aux=False)
    assert logs0["replace_prob"] == 0.0
    assert loss0.item() == pytest.approx(want0.item(), rel=1e-5)
    # progress 1: every sample replaced, both streams are the event stream: CKA = 1, no alignment loss
    loss1, logs1 = method(model, static, events, labels, 1.0, _gen())
    want1, _ = _two_stream_reference(model, cfg, method, ev, ev, labels, aux=False)
    assert logs1["align"] == pytest.approx(0.0, abs=1e-5)
    assert loss1.item() == pytest.approx(want1.item(), rel=1e-5)
    # in between, the replaced samples are those with u < progress^3, u drawn from the generator
    progress = 0.8
    u = torch.rand(B, generator=_gen(5))
    replace = (u < progress**3).view(1, B, 1, 1, 1)
    assert 0 < int(replace.sum()) < B
    want_mid, _ = _two_stream_reference(model, cfg, method, torch.where(replace, ev, st), ev, labels, aux=False)
    loss_mid, _ = method(model, static, events, labels, progress, _gen(5))
    assert loss_mid.item() == pytest.approx(want_mid.item(), rel=1e-5)


def test_tmkt_wiring_against_its_parts():
    model = _model()
    static, events, labels = _batch()
    st, ev = static.transpose(0, 1), events.transpose(0, 1)
    cfg = MethodConfig(name="tmkt", mag_weight=0.7, mrp_weight=0.3, mix_ratio_min=0.2, mix_ratio_max=0.9)
    method = build_method(cfg, T)
    loss, logs = method(model, static, events, labels, 0.3, _gen(9))
    g = _gen(9)
    ratio = 0.2 + 0.7 * torch.rand(B, generator=g, dtype=torch.float64)
    mix = time_step_mixup(st, ev, ratio, g)
    base, out_m = _two_stream_reference(model, cfg, method, mix.mixed, ev, labels, aux=True)
    want = base + 0.7 * mag_loss(out_m["mag"], mix.frame_labels) + 0.3 * mrp_loss(out_m["mrp"], mix.mix_ratio)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert logs["mix_ratio"] == pytest.approx(mix.mix_ratio.mean().item())


def test_shared_source_head_uses_the_event_classifier():
    model = _model()
    static, events, labels = _batch()
    st, ev = static.transpose(0, 1), events.transpose(0, 1)
    cfg = MethodConfig(name="ekt", source_head="event")
    method = build_method(cfg, T)
    loss, logs = method(model, static, events, labels, 0.0, _gen())
    want, out_s = _two_stream_reference(model, cfg, method, st, ev, labels, aux=False)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(out_s["logits"], model.event_head(out_s["features"]))


def _bn_running(model):
    return [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


@pytest.mark.parametrize("name", ["ekt", "tmkt"])
def test_bn_running_stats_follow_the_event_stream_only_by_default(name):
    static, events, labels = _batch()
    only_events = _model()
    only_events(events.transpose(0, 1), head="event")
    want = _bn_running(only_events)
    for mode, equal in (("event", True), ("both", False)):
        model = _model()
        build_method(MethodConfig(name=name, bn_stats=mode), T)(model, static, events, labels, 0.0, _gen())
        got = _bn_running(model)
        assert all(torch.allclose(a, b) for a, b in zip(got, want)) == equal
        assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_tmkt_with_all_event_frames_has_no_alignment_loss():
    model = _model()
    static, events, labels = _batch()
    method = build_method(MethodConfig(name="tmkt", mix_ratio_min=1.0, mix_ratio_max=1.0), T)
    _, logs = method(model, static, events, labels, 0.5, _gen())
    assert logs["mix_ratio"] == 1.0
    assert logs["align"] == pytest.approx(0.0, abs=1e-5)
    # progress schedule: r = progress^power for the whole batch; progress 0 keeps the static stream
    method = build_method(MethodConfig(name="tmkt", mix_ratio_schedule="progress"), T)
    _, logs = method(model, static, events, labels, 0.0, _gen())
    assert logs["mix_ratio"] == 0.0


@pytest.mark.parametrize("name", METHODS)
def test_loss_falls_on_a_fixed_batch(name):
    model = _model(1)
    static, events, labels = _batch(1)
    method = build_method(MethodConfig(name=name), T)
    opt = torch.optim.Adam(list(model.parameters()) + list(method.parameters()), lr=5e-3)
    losses = []
    for _ in range(12):
        loss, logs = method(model, static, events, labels, 0.6, _gen(3))  # same draws every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        # Logs are floats (schedule values) or detached 0-d tensors, which never hold the graph.
        assert all(isinstance(v, float) or (v.ndim == 0 and not v.requires_grad) for v in logs.values())
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses


@pytest.mark.parametrize("name", ["ekt", "tmkt"])
def test_eta_gets_gradients(name):
    model = _model()
    static, events, labels = _batch()
    method = build_method(MethodConfig(name=name), T)
    loss, _ = method(model, static, events, labels, 0.5, _gen())
    loss.backward()
    assert method.eta.grad is not None
    assert torch.all(method.eta.grad != 0)


@pytest.mark.parametrize("cfg", [
    {"name": "dvs"}, {"name": "finetune"}, {"name": "ekt"}, {"name": "ekt", "source_head": "event"},
    {"name": "tmkt", "source_head": "mixed"}, {"name": "tmkt", "source_head": "event"},
])
def test_method_says_truly_whether_a_step_leaves_parameters_unused(cfg):
    """What DDP's find_unused_parameters is set from: checked against the gradients of a real step."""
    model = _model()
    static, events, labels = _batch()
    method = build_method(MethodConfig(**cfg), T)
    loss, _ = method(model, static, events, labels, 0.9, _gen())
    loss.backward()
    params = list(model.parameters()) + list(method.parameters())
    unused = any(p.grad is None for p in params)
    assert method.unused_parameters_possible == unused
    assert method.needs_static_images == (cfg["name"] != "dvs")


@pytest.mark.parametrize("name", METHODS)
def test_deterministic_for_a_fixed_generator(name):
    static, events, labels = _batch()
    method = build_method(MethodConfig(name=name), T)
    a, logs_a = method(_model(), static, events, labels, 0.4, _gen(21))
    b, logs_b = method(_model(), static, events, labels, 0.4, _gen(21))
    assert a.item() == b.item()
    assert logs_a == logs_b


def test_rejects_wrong_shapes():
    model = _model()
    static, events, labels = _batch()
    method = build_method(MethodConfig(name="tmkt"), T)
    with pytest.raises(ValueError, match="events"):
        method(model, static, events[:, :2], labels, 0.5, _gen())
    with pytest.raises(ValueError, match="differ"):
        method(model, static[:, :, :1], events, labels, 0.5, _gen())


@pytest.mark.parametrize("name", METHODS)
def test_compiled_core_is_one_graph_and_matches_eager(name):
    """`compile_core` traces both streams and every loss as one graph (fullgraph: a graph break
    raises) and, run through AOTAutograd (aot_eager, no codegen), gives the eager loss, logs,
    gradients and BatchNorm statistics bit for bit, without recompiling across steps whose
    draws and progress differ."""
    import copy

    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    static, events, labels = _batch(2)
    runs = []
    for compiled in (False, True):
        model = _model(4)
        method = build_method(MethodConfig(name=name), T)
        if compiled:
            method.compile_core(backend="aot_eager")
        for progress in (0.2, 0.7):  # finetune switches phase between these (two graphs)
            loss, logs = method(model, static, events, labels, progress, _gen(5))
            loss.backward()
        grads = [p.grad.clone() for p in list(model.parameters()) + list(method.parameters()) if p.grad is not None]
        runs.append((float(loss.detach()), {k: float(v) for k, v in logs.items()}, grads, copy.deepcopy(list(model.buffers()))))
    (l0, logs0, g0, b0), (l1, logs1, g1, b1) = runs
    assert l0 == l1 and logs0 == logs1
    assert len(g0) == len(g1) > 0 and all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert all(torch.equal(a, b) for a, b in zip(b0, b1))
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames == (2 if name == "finetune" else 1), frames


def test_compiled_core_falls_back_to_pieces_on_a_graph_break():
    """A model torch.compile cannot capture whole warns and still trains, with eager's loss."""
    import torch._dynamo

    class Breaking(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, **kw):
            torch._dynamo.graph_break()
            return self.inner(x, **kw)

    torch._dynamo.reset()
    static, events, labels = _batch(3)
    eager_loss, _ = build_method(MethodConfig(name="tmkt"), T)(_model(6), static, events, labels, 0.5, _gen(7))
    method = build_method(MethodConfig(name="tmkt"), T).compile_core(backend="aot_eager")
    model = Breaking(_model(6))
    with pytest.warns(RuntimeWarning, match="in pieces"):
        loss, _ = method(model, static, events, labels, 0.5, _gen(7))
    loss.backward()
    assert float(loss.detach()) == float(eager_loss.detach())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the core is already compiled in pieces
        again, _ = method(model, static, events, labels, 0.5, _gen(7))
    assert float(again.detach()) == float(eager_loss.detach())
