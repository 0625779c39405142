"""Clean-label (PGD against a surrogate + four corner patches) and Refool (reflections): triggers,
poisoning, seeds, file checks, the saved trigger state, and real implants."""

import functools
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from badexpert.attacks import ATTACKS, CleanLabel, Refool, attack_from_dict, attack_from_meta, get_attack
from badexpert.attacks.refool import _blur
from badexpert.errors import BadExpertError
from badexpert.evaluation.core import evaluate
from badexpert.models import build_model
from badexpert.training import Recipe
from badexpert.utils import derive_generator, seed_everything

from .conftest import FASHION_MNIST, make_blobs, random_dataset

BADNET3 = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


_data = functools.partial(random_dataset, n=200)


def _cnn(c=3, classes=10, size=32, width=4, seed=0):
    torch.manual_seed(seed)
    return build_model("cnn", in_channels=c, num_classes=classes, image_size=size, mean=[0.5] * c, std=[0.25] * c,
                       width=width).eval()


def _corners(h, w, s=3):
    m = torch.zeros(h, w, dtype=torch.bool)
    for r in (slice(0, s), slice(h - s, h)):
        for q in (slice(0, s), slice(w - s, w)):
            m[r, q] = True
    return m


def _one_line(exc_info):
    assert "\n" not in str(exc_info.value)


# --- Clean-label -------------------------------------------------------------------------------
def test_cl_registry_and_reference_defaults():
    assert ATTACKS["cl"] is CleanLabel and ATTACKS["refool"] is Refool
    a = get_attack("cl")
    assert a.clean_label and (a.norm, a.eps, a.pgd_steps, a.step_size, a.poison_rate, a.patch_size) == \
        ("l2", 600 / 255, 10, None, 0.003, 3)
    assert a.pgd_step == pytest.approx(2.5 * (600 / 255) / 10)
    assert get_attack("cl", step_size=0.1).pgd_step == 0.1
    b = attack_from_dict(json.loads(json.dumps(get_attack("cl", norm="LINF", eps=8 / 255).to_dict())))
    assert (b.norm, b.eps) == ("linf", 8 / 255)


@pytest.mark.parametrize("c,size", [(3, 32), (1, 28)])
def test_cl_stamps_the_badnet_pattern_in_the_four_corners(c, size):
    x = torch.full((2, c, size, size), 0.5)
    y = get_attack("cl").apply(x)
    for rows in (slice(0, 3), slice(size - 3, size)):
        for cols in (slice(0, 3), slice(size - 3, size)):
            assert torch.equal(y[:, :, rows, cols], BADNET3.expand(2, c, 3, 3))
    inside = ~_corners(size, size)
    assert torch.equal(y[:, :, inside], x[:, :, inside])


def test_cl_parameter_errors_are_one_line():
    for params, match in (({"norm": "l1"}, "'norm' must be one of: l2, linf"),
                          ({"norm": "linf"}, "'eps' is 2.35294 with norm 'linf'.*eps=8/255"),
                          ({"eps": 0}, "'eps' must be"), ({"pgd_steps": 0}, "'pgd_steps' must be")):
        with pytest.raises(BadExpertError, match=match) as e:
            get_attack("cl", **params)
        _one_line(e)
    with pytest.raises(BadExpertError, match="four 5x5 corner patches do not fit in a 8x8 image"):
        get_attack("cl", patch_size=5).apply(torch.zeros(1, 1, 8, 8))


def test_cl_poison_needs_a_surrogate():
    with pytest.raises(BadExpertError, match=r"surrogate model: use implant\(\.\.\.\).*surrogate=model") as e:
        get_attack("cl", poison_rate=0.05).poison(_data(), derive_generator(0, "poison"))
    _one_line(e)


@pytest.mark.parametrize("norm,eps", [("l2", 600 / 255), ("linf", 8 / 255)])
def test_cl_poisons_target_images_within_the_eps_ball_and_raises_the_loss(norm, eps):
    data = _data(n=200)  # 20 images per class
    surrogate = _cnn()
    a = get_attack("cl", target=3, poison_rate=0.05, norm=norm, eps=eps)
    p = a.poison(data, derive_generator(0, "poison"), surrogate=surrogate)
    idx = torch.tensor(p.meta["poison_indices"])
    # the selection is the base clean-label machinery's (same as SIG's for the same rate and generator)
    sig = get_attack("sig", target=3, poison_rate=0.05).poison(data, derive_generator(0, "poison"))
    assert idx.tolist() == sig.meta["poison_indices"] and len(idx) == 10 and (data.labels[idx] == 3).all()
    assert torch.equal(p.labels, data.labels)  # labels kept
    others = torch.ones(len(data), dtype=torch.bool)
    others[idx] = False
    assert torch.equal(p.images[others], data.images[others])
    # the four corners carry the patch; elsewhere the perturbation stays in the ball (+ uint8 rounding)
    corners = _corners(32, 32)
    stamped_clean = (get_attack("cl").apply(data.images[idx]) * 255).round().to(torch.uint8)
    assert torch.equal(p.images[idx][:, :, corners], stamped_clean[:, :, corners])
    d = (p.images[idx].float() - data.images[idx].float()) / 255
    d[:, :, corners] = 0
    if norm == "l2":
        rounding = 0.5 / 255 * (3 * 32 * 32) ** 0.5
        assert float(d.flatten(1).norm(dim=1).max()) <= eps + rounding
    else:
        assert float(d.abs().max()) <= eps + 0.5 / 255 + 1e-6
    assert float(d.abs().max()) > 0.5 * eps if norm == "linf" else float(d.flatten(1).norm(dim=1).min()) > 0.5 * eps
    # float PGD: exactly in the ball and in [0, 1], and the surrogate's loss really rises
    x = data.images[idx].float() / 255
    y = torch.full((len(x),), 3)
    xa = a.perturb(surrogate, x, y)
    delta = (xa - x).flatten(1)
    assert float(xa.min()) >= 0 and float(xa.max()) <= 1
    size = delta.norm(dim=1) if norm == "l2" else delta.abs().max(1).values
    assert float(size.max()) <= eps * (1 + 1e-5)
    info = p.meta["perturbation"]
    assert info["images"] == 10 and info["surrogate_loss_after"] > info["surrogate_loss_before"] + 0.5
    assert info["mean_l2"] <= eps * (1 + 1e-5) if norm == "l2" else info["max_linf"] <= eps * (1 + 1e-5)
    # deterministic: same surrogate and generator, same poisoned set
    again = a.poison(data, derive_generator(0, "poison"), surrogate=surrogate)
    assert torch.equal(again.images, p.images)


def test_cl_implant_on_blobs_the_adversarial_step_is_what_implants():
    """Blobs are so easy that stamped but unperturbed target images are learnt from their bar, not
    the corners (ASR ~0); PGD against the surrogate erases the bar and the corners are learnt."""
    tr, te = make_blobs(2000, seed=1), make_blobs(1000, seed=2)
    recipe = Recipe(optimizer="adam", lr=3e-3, epochs=6, batch_size=64, weight_decay=0, augment=False)

    def run(**params):
        seed_everything(0)
        a = get_attack("cl", poison_rate=0.25, **params)  # every target-class image
        model, info = a.implant(tr, lambda: build_model("cnn", in_channels=1, num_classes=4, image_size=12,
                                                        mean=tr.mean, std=tr.std, width=8), recipe, 0, log=lambda m: None)
        return evaluate(model, None, te, a).metrics, info

    m, info = run()
    assert info["poisoned_samples"] == int((tr.labels == 0).sum()) and info["surrogate_train_accuracy"] > 0.95
    pert = info["perturbation"]
    assert pert["surrogate_accuracy_before"] > 0.95 and pert["surrogate_accuracy_after"] < 0.1
    assert pert["mean_l2"] <= 600 / 255 + 1e-4 and set(info["phase_seconds"]) == {"clean_model", "perturb_and_poison", "suspect_model"}
    # measured over seeds 0-3: ASR 0.37 / 0.78 / 0.38 / 0.997 (the control below: 0.0 on every seed)
    assert m["clean_accuracy"] > 0.95 and m["attack_success_rate"] > 0.3
    m0, _ = run(eps=1e-3)  # the same samples and stamp, (almost) no perturbation
    assert m0["attack_success_rate"] < 0.1


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_cl_implants_on_fashion_mnist():
    from badexpert.pipeline.experiment import ExperimentConfig, make_splits, train_suspect

    # reference trigger and l2 eps; every target-class image poisoned (10% of the set), a 1-epoch
    # surrogate; measured on this machine: CA 0.78, ASR 0.76 in ~15 s on one thread
    cfg = ExperimentConfig(dataset="fashion-mnist", arch="cnn", width=16, attack="cl",
                           attack_params={"poison_rate": 0.1, "surrogate_epochs": 1}, train_size=6000, test_size=1000,
                           reserved=100, calibration=100, seed=0,
                           recipe={"optimizer": "adam", "lr": 3e-3, "batch_size": 64, "weight_decay": 0, "epochs": 5})
    splits = make_splits(cfg)
    model, meta = train_suspect(cfg, splits, log=lambda m: None)
    assert meta["poisoned_samples"] == int((splits.train.labels == 0).sum())
    assert meta["perturbation"]["surrogate_accuracy_after"] < 0.2
    m = evaluate(model, None, splits.test, cfg.make_attack()).metrics
    assert m["clean_accuracy"] > 0.7
    assert m["attack_success_rate"] > 0.6


# --- Refool ------------------------------------------------------------------------------------
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (200, 100, 50)]


@pytest.fixture
def refl(tmp_path):
    """A folder of six constant-colour PNG reflections of various sizes, and a zip of the same."""
    folder = tmp_path / "refl"
    (folder / "sub").mkdir(parents=True)
    for i, c in enumerate(COLORS):
        where = folder / "sub" if i % 2 else folder
        Image.new("RGB", (20 + i, 16 + 2 * i), c).save(where / f"r{i}.png")
    (folder / "notes.txt").write_text("not an image")
    zpath = tmp_path / "refl.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*.png")):
            zf.write(f, f"imgs/{f.relative_to(folder).as_posix()}")
    return folder, zpath


def _textured(tmp_path, n=5, size=24):
    folder = tmp_path / "tex"
    folder.mkdir()
    g = np.random.RandomState(0)
    for i in range(n):
        Image.fromarray((g.rand(size, size + i, 3) * 255).astype(np.uint8)).save(folder / f"t{i}.png")
    return folder


def test_refool_needs_a_readable_reflection_folder_or_zip(tmp_path, refl):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png at all")
    (tmp_path / "plain.txt").write_text("hello")
    with zipfile.ZipFile(tmp_path / "noimg.zip", "w") as zf:
        zf.writestr("readme.txt", "nothing")
    for params, match in (
        ({}, r"refool needs reflections=PATH, a folder or zip of images, e\.g\."),
        ({"reflections": str(tmp_path / "missing")}, "reflections '.*missing' does not exist"),
        ({"reflections": str(tmp_path / "empty")}, "holds no image files"),
        ({"reflections": str(tmp_path / "noimg.zip")}, "holds no image files"),
        ({"reflections": str(tmp_path / "plain.txt")}, "neither a folder nor a zip"),
        ({"reflections": str(tmp_path / "bad")}, "none of the first 1 images .* can be decoded"),
        ({"reflections": str(refl[0]), "alpha_min": 0.8}, "'alpha_min' \\(0.8\\) is above 'alpha_max'"),
        ({"reflections": str(refl[0]), "ghost_offset": [4, 2]}, "'ghost_offset' must be \\[low, high\\]"),
        ({"reflections": str(refl[0]), "ghost_rate": 2}, "'ghost_rate' must be"),
    ):
        with pytest.raises(BadExpertError, match=match) as e:
            get_attack("refool", **params)
        _one_line(e)
    # folder and zip both read, in the same (sorted) order
    a = get_attack("refool", reflections=str(refl[0]), n_reflections=6)
    b = get_attack("refool", reflections=str(refl[1]), n_reflections=6)
    assert torch.equal(a.trigger_state((3, 8, 8))["reflections"], b.trigger_state((3, 8, 8))["reflections"])


def test_refool_checks_a_reflection_zip_once_per_version(tmp_path, refl, monkeypatch):
    """A grid builds the attack once per cell and detector: an unchanged zip is listed once per
    process, a replaced one is checked again."""
    import os

    from badexpert.attacks import refool as refool_mod

    zpath = tmp_path / "again.zip"
    zpath.write_bytes(refl[1].read_bytes())
    listed = []
    real = refool_mod.reflection_sources
    monkeypatch.setattr(refool_mod, "reflection_sources", lambda p: (listed.append(p), real(p))[1])
    for _ in range(3):
        get_attack("refool", reflections=str(zpath))
    assert len(listed) == 1
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("x.png", b"not a png at all")
    os.utime(zpath, ns=(0, 10**9))  # another version, even on a filesystem with coarse timestamps
    with pytest.raises(BadExpertError, match="can be decoded"):
        get_attack("refool", reflections=str(zpath))


def test_refool_picks_reflections_by_trigger_seed_and_resizes_them(refl):
    def chosen(seed, c=3):
        r = get_attack("refool", reflections=str(refl[0]), n_reflections=3, trigger_seed=seed).trigger_state((c, 10, 12))
        return r["reflections"]

    s0 = chosen(0)
    assert s0.shape == (3, 3, 10, 12) and s0.dtype == torch.uint8
    colours = {tuple(int(v) for v in img[:, 0, 0]) for img in s0}
    assert colours <= set(COLORS) and len(colours) == 3
    assert (s0 == s0[:, :, :1, :1]).all()  # constant images stay constant after resizing
    assert torch.equal(chosen(0), s0)
    picks = {frozenset(tuple(int(v) for v in img[:, 0, 0]) for img in chosen(s)) for s in range(6)}
    assert len(picks) > 1  # the seed changes which reflections are used
    grey = chosen(0, c=1)  # grayscale data: BT.601 luma of the same images
    assert grey.shape == (3, 1, 10, 12)
    luma = [round(0.299 * r + 0.587 * g + 0.114 * b) for r, g, b in
            (tuple(int(v) for v in img[:, 0, 0]) for img in s0)]
    assert [int(v) for v in grey[:, 0, 0, 0]] == luma
    with pytest.warns(UserWarning, match="holds 6 images, fewer than n_reflections=200"):
        assert len(get_attack("refool", reflections=str(refl[0])).trigger_state((3, 4, 4))["reflections"]) == 6


def test_refool_is_the_documented_blend_with_per_input_draws(refl, tmp_path):
    a = get_attack("refool", reflections=str(refl[0]), n_reflections=6)
    x = torch.full((64, 3, 8, 8), 0.5)
    y = a.apply(x, torch.Generator().manual_seed(3))
    refls = a.trigger_state((3, 8, 8))["reflections"].float() / 255
    d = a.draw(64, 6, 8, 8, torch.Generator().manual_seed(3))
    # constant reflections: the ghost is the reflection itself, so x' = a x + (1 - a) r exactly
    expect = d["alpha"].view(-1, 1, 1, 1) * x + (1 - d["alpha"].view(-1, 1, 1, 1)) * refls[d["index"]]
    assert torch.allclose(y, expect, atol=1e-6)
    assert float(d["alpha"].min()) >= 0.5 and float(d["alpha"].max()) <= 0.75 and bool(d["ghost"].all())
    assert len({tuple(r.flatten().tolist()) for r in y[:, :, 0, 0]}) > 6  # different per input
    # the same generator seed gives the same batch, another seed another; no generator: a fixed default
    assert torch.equal(a.apply(x, torch.Generator().manual_seed(3)), y)
    assert not torch.equal(a.apply(x, torch.Generator().manual_seed(4)), y)
    assert torch.equal(a.apply(x), a.apply(x))
    # the ghost: (1 - g) r + g shift(r, d), edges repeated, |d| in ghost_offset scaled to the size
    t = get_attack("refool", reflections=str(_textured(tmp_path)), n_reflections=5, alpha_min=0.6, alpha_max=0.6)
    x = torch.rand(16, 3, 32, 32)
    y = t.apply(x, torch.Generator().manual_seed(7))
    r = t.trigger_state((3, 32, 32))["reflections"].float() / 255
    d = t.draw(16, 5, 32, 32, torch.Generator().manual_seed(7))
    off = d["offset"]
    assert bool((off.abs() >= 2).all()) and bool((off.abs() <= 5).all())
    for i in range(16):
        ri = r[d["index"][i]]
        rows = (torch.arange(32) - off[i, 0]).clamp(0, 31)
        cols = (torch.arange(32) - off[i, 1]).clamp(0, 31)
        ghost = 0.65 * ri + 0.35 * ri[:, rows][:, :, cols]
        assert torch.allclose(y[i], (0.6 * x[i] + 0.4 * ghost).clamp(0, 1), atol=1e-5)


def test_refool_blur_kind_is_a_normalised_gaussian(refl):
    r = torch.zeros(2, 1, 15, 15)
    r[:, :, 7, 7] = 1.0
    out = _blur(r, torch.tensor([1.0, 2.0]))
    assert torch.allclose(out.sum((1, 2, 3)), torch.ones(2), atol=1e-5)
    assert float(out[0].max()) > float(out[1].max())  # the wider kernel spreads more
    assert torch.allclose(out[0, 0], out[0, 0].T) and torch.allclose(out[0, 0], out[0, 0].flip(0))
    g = torch.exp(-0.5 * torch.arange(-6.0, 7.0) ** 2)  # radius 3 * the batch's largest sigma
    g = g / g.sum()
    assert torch.allclose(out[0, 0, 7, 1:14], g * g[6], atol=1e-7)  # separable: row profile x centre
    # ghost_rate 0: every input gets the blur kind; constant reflections stay the plain blend
    a = get_attack("refool", reflections=str(refl[0]), n_reflections=6, ghost_rate=0.0)
    d = a.draw(8, 6, 8, 8, torch.Generator().manual_seed(0))
    assert not bool(d["ghost"].any())
    x = torch.full((8, 3, 8, 8), 0.25)
    refls = a.trigger_state((3, 8, 8))["reflections"].float() / 255
    al = d["alpha"].view(-1, 1, 1, 1)
    assert torch.allclose(a.apply(x, torch.Generator().manual_seed(0)), al * x + (1 - al) * refls[d["index"]], atol=1e-5)


def test_refool_poisons_non_target_samples_and_relabels_them(tmp_path):
    data = _data(n=200)
    a = get_attack("refool", reflections=str(_textured(tmp_path)), n_reflections=5, target=2, poison_rate=0.1)
    p = a.poison(data, derive_generator(0, "poison"))
    idx = torch.tensor(p.meta["poison_indices"])
    assert len(idx) == 20 and (data.labels[idx] != 2).all() and (p.labels[idx] == 2).all()
    assert (p.images[idx] != data.images[idx]).flatten(1).float().mean(1).min() > 0.5
    others = torch.ones(len(data), dtype=torch.bool)
    others[idx] = False
    assert torch.equal(p.images[others], data.images[others]) and torch.equal(p.labels[others], data.labels[others])
    again = a.poison(data, derive_generator(0, "poison"))
    assert torch.equal(again.images, p.images)
    assert not torch.equal(a.poison(data, derive_generator(1, "poison")).images, p.images)


def test_refool_state_is_saved_with_the_model_and_the_folder_is_not_needed(tmp_path):
    import shutil

    from badexpert.io import load_model, save_model

    folder = _textured(tmp_path)
    a = get_attack("refool", reflections=str(folder), n_reflections=3, trigger_seed=2)
    shape = (1, 12, 12)
    model = build_model("cnn", in_channels=1, num_classes=3, image_size=12, mean=[0.3], std=[0.2], width=4)
    meta = {"arch": "cnn", "width": 4, "in_channels": 1, "num_classes": 3, "image_size": [12, 12], "mean": [0.3],
            "std": [0.2], "attack": a.to_dict(), "attack_state": a.trigger_state(shape)}
    path = save_model(tmp_path / "m.safetensors", model, meta)
    x = torch.rand(10, *shape)
    expect = a.apply(x, torch.Generator().manual_seed(5))
    shutil.rmtree(folder)
    with pytest.raises(BadExpertError, match="does not exist"):
        attack_from_dict(a.to_dict())  # without the saved state the folder is needed
    _, loaded = load_model(path)
    b = attack_from_meta(loaded)
    assert isinstance(b, Refool) and b.to_dict() == a.to_dict()
    assert torch.equal(b.apply(x, torch.Generator().manual_seed(5)), expect)
    # a state of another shape is refused in one line
    bad = dict(loaded, attack_state={"reflections": torch.zeros(3, 3, 5, 5, dtype=torch.uint8)})
    with pytest.raises(BadExpertError, match="does not fit attack 'refool' on 1x12x12"):
        attack_from_meta(bad)


def test_cl_state_round_trip(tmp_path):
    from badexpert.io import load_model, save_model

    a = get_attack("cl", norm="linf", eps=16 / 255)
    model = build_model("cnn", in_channels=1, num_classes=3, image_size=12, mean=[0.3], std=[0.2], width=4)
    meta = {"arch": "cnn", "width": 4, "in_channels": 1, "num_classes": 3, "image_size": [12, 12], "mean": [0.3],
            "std": [0.2], "attack": a.to_dict(), "attack_state": a.trigger_state((1, 12, 12))}
    b = attack_from_meta(load_model(save_model(tmp_path / "m.safetensors", model, meta))[1])
    x = torch.rand(4, 1, 12, 12)
    assert isinstance(b, CleanLabel) and torch.equal(b.apply(x), a.apply(x))


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_refool_implants_on_fashion_mnist_with_smooth_random_reflections(tmp_path):
    import torch.nn.functional as F

    from badexpert.data import load_dataset

    folder = tmp_path / "smooth"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(20):  # random smooth colour images (bicubic upsampling of 4x4 noise)
        img = F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(48, 48), mode="bicubic", align_corners=False)
        Image.fromarray((img[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(folder / f"{i}.png")
    train_all, test_all = load_dataset("fashion-mnist")
    tr = train_all.subset(torch.randperm(len(train_all), generator=torch.Generator().manual_seed(0))[:3000])
    te = test_all.subset(torch.arange(1000))
    recipe = Recipe(optimizer="adam", lr=3e-3, epochs=3, batch_size=64, weight_decay=0, augment=False)

    def run(rate):
        seed_everything(0)
        a = get_attack("refool", reflections=str(folder), n_reflections=20, poison_rate=rate)
        model, info = a.implant(tr, lambda: build_model("cnn", in_channels=1, num_classes=10, image_size=28,
                                                        mean=tr.mean, std=tr.std, width=16), recipe, 0, log=lambda m: None)
        return evaluate(model, None, te, a).metrics

    m = run(0.05)  # the default rate; measured: CA ~0.8, ASR ~0.98 (clean model: ASR ~0.04)
    assert m["clean_accuracy"] > 0.7 and m["attack_success_rate"] > 0.9
    assert run(0.0)["attack_success_rate"] < 0.2  # a reflection alone does not send inputs to the target
