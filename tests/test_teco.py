"""TeCo and its 15 corruptions: the corruptions' contract, TeCo's score by hand, determinism,
parameters and persistence. (The shared detector contract runs TeCo in test_detectors.py.)"""

import pytest
import torch
from torch import nn

from badexpert.detectors import DETECTORS, TeCo, get_detector, load_detector
from badexpert.detectors.corruptions import CORRUPTIONS, IMAGENET_C, RANDOM, corrupt, frost_texture, plasma_fractal
from badexpert.errors import BadExpertError

FAST = ("brightness", "contrast", "pixelate")  # deterministic and cheap
#: this package's first TeCo: CIFAR-10-C constants, every severity applied to the input itself
#: (the by-hand tests below are written for it; the default is the authors' cumulative ImageNet-C)
FIRST = dict(strength="cifar10-c", procedure="independent")


def pink(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Natural-looking test images: 1/f noise, each image stretched to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    f = torch.fft.fftfreq(size)
    radius = (f[:, None] ** 2 + f[None, :] ** 2).sqrt().clamp_min(1 / size)
    re, im = torch.randn(2, n, channels, size, size, generator=g)
    x = torch.fft.ifft2(torch.complex(re, im) / radius).real
    x = x - x.amin(dim=(2, 3), keepdim=True)
    return x / x.amax(dim=(2, 3), keepdim=True)


def gens(n: int, offset: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(offset + k) for k in range(n)]


def run(x: torch.Tensor, name: str, severity: int, offset: int = 0) -> torch.Tensor:
    return corrupt(x, name, severity, gens(len(x), offset))


def rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).mean(dim=(1, 2, 3)).sqrt()


# --- the corruptions ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (4, 1, 12, 12), (3, 1, 28, 28), (2, 3, 8, 11)])
def test_every_corruption_keeps_shape_dtype_and_range(shape):
    x = pink(shape[0], shape[1], max(shape[2:]))[..., : shape[2], : shape[3]].contiguous()
    for dtype in (torch.float32, torch.float64):
        xd = x.to(dtype)
        for name in CORRUPTIONS:
            for s in (1, 5):
                y = run(xd, name, s)
                assert y.shape == x.shape and y.dtype == dtype, name
                assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1, name
                assert not torch.equal(y, xd), f"{name} at severity {s} left the images unchanged"


def test_extreme_images_stay_in_range():
    x = torch.cat([torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16)])
    for name in CORRUPTIONS:
        for s in (1, 3, 5):
            y = run(x, name, s)
            assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1, name


# Mean RMS distance to the original over 32 CIFAR-size images, per severity. For these
# corruptions every CIFAR-10-C constant grows with severity, so the distance does too.
L2_MONOTONE = [c for c in CORRUPTIONS if c not in ("glass_blur", "frost", "elastic_transform", "motion_blur")]


@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28)])
def test_higher_severity_changes_the_image_more(channels, size):
    x = pink(32, channels, size, seed=1)
    for name in CORRUPTIONS:
        d = torch.stack([rms(run(x, name, s), x).mean() for s in range(1, 6)])
        if name in L2_MONOTONE:
            assert (d[1:] > d[:-1]).all(), f"{name}: {d.tolist()}"
        assert d[-1] > d[0] or name in ("glass_blur", "elastic_transform"), f"{name}: {d.tolist()}"


def test_motion_blur_grows_except_where_the_reference_radius_changes_nothing():
    """CIFAR-10-C's motion blur severities 3 and 4 differ only in the kernel radius (6 vs 8 pixels),
    and the Gaussian weights (sigma 2) beyond 4 sigma are negligible: the two are the same blur."""
    x = pink(16, 3, 32, seed=2)
    ys = [run(x, "motion_blur", s) for s in range(1, 6)]
    d = torch.stack([rms(y, x).mean() for y in ys])
    assert d[0] < d[1] < d[2] and d[3] < d[4]
    assert torch.equal(ys[2], ys[3])


def test_frost_replaces_more_of_the_image_at_higher_severity():
    """Frost is ``a * x + b * texture`` with b/a = 0.2, 0.3, 0.44, 0.47, 0.6: the image's share falls
    at every severity (the RMS distance need not grow from 3 to 4: a drops while b stays)."""
    x = pink(32, 3, 32, seed=3)

    def decorrelation(y):
        a, b = x.flatten(1) - x.flatten(1).mean(1, keepdim=True), y.flatten(1) - y.flatten(1).mean(1, keepdim=True)
        return 1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))

    d = torch.stack([decorrelation(run(x, "frost", s)).mean() for s in range(1, 6)])
    assert (d[1:] > d[:-1]).all(), d.tolist()


def test_glass_blur_shuffles_more_and_blurs_more():
    """Glass blur's constants (sigma 0.05, 0.25, 0.4, 0.25, 0.4; 1, 1, 1, 2, 2 shuffling passes) trade
    blur for shuffling, and blurring a shuffled image brings it back towards the original, so no
    pixel distance grows at every step. Each ingredient does: at equal blur, two passes move the
    image further than one; at equal passes, more blur leaves a smoother image."""
    x = pink(32, 3, 32, seed=4)
    ys = [run(x, "glass_blur", s) for s in range(1, 6)]
    d = [rms(y, x).mean() for y in ys]
    assert d[3] > d[1] and d[4] > d[2]

    def roughness(y):
        return (y[..., 1:, :] - y[..., :-1, :]).abs().mean() + (y[..., :, 1:] - y[..., :, :-1]).abs().mean()

    r = [roughness(y) for y in ys]
    assert r[0] > r[1] > r[2] and r[3] > r[4]


def test_elastic_transform_distorts_locally_more_at_higher_severity():
    """CIFAR-10-C's elastic transform shrinks its random affine warp (8% .. 3% of the size) while its
    local elastic field grows (alpha / sigma): the local distortion is what grows. Read the sampling
    map off coordinate-ramp images (bilinear sampling of a linear ramp returns the coordinate),
    fit an affine map to it per image; the residual grows with severity, the affine part shrinks."""
    n, size = 24, 32
    ramp = torch.linspace(0, 1, size)
    x = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                     torch.full((size, size), 0.5)])[None].expand(n, 3, size, size).contiguous()
    c = slice(10, 22)  # the centre, where no sample reaches a border
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64)[c], torch.arange(size, dtype=torch.float64)[c],
                            indexing="ij")
    design = torch.stack([xs.flatten(), ys.flatten(), torch.ones(xs.numel(), dtype=torch.float64)], dim=1)
    residual, affine = [], []
    for s in range(1, 6):
        y = run(x, "elastic_transform", s).double() * (size - 1)
        target = torch.stack([y[:, 0, c, c].flatten(1), y[:, 1, c, c].flatten(1)], dim=2)  # [n, P, 2]: sampled (x, y)
        coef = torch.linalg.lstsq(design.expand(n, -1, -1), target).solution
        fit = design @ coef
        residual.append((target - fit).pow(2).sum(2).mean().sqrt())
        affine.append((fit - design[:, :2]).pow(2).sum(2).mean().sqrt())
    assert residual[0] < 1e-3  # severity 1: the affine warp alone
    assert all(b > a for a, b in zip(residual, residual[1:])), residual
    assert all(b < a for a, b in zip(affine, affine[1:])), affine


def test_each_severity_is_applied_to_the_original():
    """Severity s of a corruption is the same whether computed alone or after the others, and
    nothing is modified in place."""
    x = pink(4, 3, 16, seed=5)
    keep = x.clone()
    sweep = {(name, s): run(x, name, s) for name in CORRUPTIONS for s in range(1, 6)}
    assert torch.equal(x, keep)
    for name in CORRUPTIONS:
        for s in (5, 2, 4, 1, 3):
            assert torch.equal(run(x, name, s), sweep[(name, s)]), (name, s)
    # and not cumulatively: severity 2 of the sweep is not severity 2 applied to severity 1
    for name in ("contrast", "gaussian_noise", "defocus_blur"):
        twice = run(run(x, name, 1), name, 2)
        assert not torch.allclose(twice, sweep[(name, 2)]), name


def test_random_corruptions_are_reproducible_and_differ_across_inputs():
    x = pink(1, 3, 16, seed=6).expand(3, 3, 16, 16).contiguous()  # three copies of one image
    for name in CORRUPTIONS:
        a = corrupt(x, name, 3, gens(3))
        assert torch.equal(a, corrupt(x, name, 3, gens(3))), name  # same generators, same output
        if name in RANDOM:
            assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2]), name  # one generator per input
            assert not torch.equal(a, corrupt(x, name, 3, gens(3, offset=10))), name
            # an image's corruption depends on its own generator only, not on its batch
            assert torch.equal(corrupt(x[1:2], name, 3, gens(1, offset=1)), a[1:2]), name
        else:
            assert torch.equal(a[0], a[1]) and torch.equal(a[1], a[2]), name


def test_gray_and_rgb():
    """1-channel images work throughout; a gray image copied into 3 channels gets the same result
    on every channel for the channel-blind corruptions, and gray-consistent results for the others."""
    g = pink(3, 1, 20, seed=7)
    rgb = g.expand(3, 3, 20, 20).contiguous()
    for name in CORRUPTIONS:
        yg, yc = run(g, name, 4), run(rgb, name, 4)
        assert yg.shape == g.shape and yc.shape == rgb.shape
        if name in ("defocus_blur", "motion_blur", "zoom_blur", "glass_blur", "elastic_transform", "pixelate",
                    "contrast", "brightness", "fog", "snow"):
            # neither draws per channel nor mixes channels: equal to the gray result on every channel
            assert torch.allclose(yc, yg.expand_as(yc), atol=1e-5), name


def test_constants_by_hand():
    x = torch.full((1, 1, 8, 8), 0.5)
    x[..., :, :4] = 0.3
    assert torch.allclose(corrupt(x, "brightness", 5), x + 0.3)
    m = x.mean()
    assert torch.allclose(corrupt(x, "contrast", 5), (x - m) * 0.15 + m)
    # RGB brightness adds to the HSV value and keeps hue and saturation: the pixel scales
    px = torch.tensor([0.2, 0.4, 0.5]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    assert torch.allclose(corrupt(px, "brightness", 3), px * (0.65 / 0.5))
    black = torch.zeros(1, 3, 8, 8)
    assert torch.allclose(corrupt(black, "brightness", 2), torch.full_like(black, 0.1))
    # gaussian noise: x + 0.1 * z with the generator's z
    y = corrupt(torch.full((1, 1, 8, 8), 0.5), "gaussian_noise", 5, gens(1))
    z = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(y[0], (0.5 + 0.1 * z).clamp(0, 1))
    # impulse noise replaces about 7% of values by exactly 0 or 1
    big = torch.full((1, 3, 64, 64), 0.5)
    hit = (corrupt(big, "impulse_noise", 5, gens(1)) != 0.5).float().mean()
    assert 0.05 < hit < 0.09
    # JPEG leaves a flat 8x8-aligned image flat; pixelate leaves a flat image as it is
    flat = torch.full((2, 3, 16, 16), 100 / 255)
    assert torch.allclose(corrupt(flat, "jpeg_compression", 5), flat, atol=1.5 / 255)
    assert torch.allclose(corrupt(flat, "pixelate", 5), flat)


def test_imagenet_c_constants_by_hand():
    """The ImageNet-C strengths (the imagecorruptions package's, which TeCo's authors call)."""
    assert set(IMAGENET_C) == set(CORRUPTIONS) and all(len(v) == 5 for v in IMAGENET_C.values())
    x = torch.full((1, 1, 8, 8), 0.5)
    x[..., :, :4] = 0.3
    m = x.mean()
    assert torch.allclose(corrupt(x, "contrast", 5, strength="imagenet-c"), (x - m) * 0.05 + m)
    assert torch.allclose(corrupt(x, "brightness", 1, strength="imagenet-c"), x + 0.1)
    y = corrupt(torch.full((1, 1, 8, 8), 0.5), "gaussian_noise", 5, gens(1), strength="imagenet-c")
    z = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(y[0], (0.5 + 0.38 * z).clamp(0, 1))
    big = torch.full((1, 3, 64, 64), 0.5)
    hit = (corrupt(big, "impulse_noise", 5, gens(1), strength="imagenet-c") != 0.5).float().mean()
    assert 0.24 < hit < 0.30
    # every corruption is at least as strong as its CIFAR-10-C severity (here: moves the image more)
    img = pink(4, 3, 32, seed=9)
    for name in CORRUPTIONS:
        a = rms(corrupt(img, name, 3, gens(4), strength="imagenet-c"), img).mean()
        b = rms(corrupt(img, name, 3, gens(4), strength="cifar10-c"), img).mean()
        assert a >= b - 1e-6, name
    with pytest.raises(BadExpertError, match="unknown corruption strength 'imagenet'"):
        corrupt(img, "contrast", 1, strength="imagenet")


def test_jpeg_quantises_more_at_lower_quality():
    x = pink(8, 3, 32, seed=8)
    d = [rms(corrupt(x, "jpeg_compression", s), x).mean() for s in range(1, 6)]
    assert all(b > a for a, b in zip(d, d[1:]))
    g = pink(8, 1, 24, seed=8)
    y = corrupt(g, "jpeg_compression", 5)
    assert (y * 255 - (y * 255).round()).abs().max() < 1e-4  # decoded to 8-bit levels
    assert 0.005 < rms(y, g).mean() < 0.1


def test_procedural_textures():
    tex = frost_texture(gens(4), 32, 32)
    assert tex.shape == (4, 1, 32, 32) and tex.min() >= 0 and tex.max() <= 1
    assert 0.2 < tex.mean() < 0.7 and tex.std() > 0.1
    assert torch.equal(tex, frost_texture(gens(4), 32, 32)) and not torch.equal(tex[0], tex[1])
    smooth, rough = plasma_fractal(gens(2), 32, 3.0), plasma_fractal(gens(2), 32, 1.75)
    for p in (smooth, rough):
        assert p.shape == (2, 32, 32) and p.amin(dim=(1, 2)).eq(0).all() and p.amax(dim=(1, 2)).eq(1).all()
    tv = lambda p: (p[:, 1:] - p[:, :-1]).abs().mean()  # noqa: E731
    assert tv(rough) > tv(smooth)  # smaller decay: rougher fog
    with pytest.raises(BadExpertError, match="power of two"):
        plasma_fractal(gens(1), 24, 2.0)


def test_corrupt_errors_are_one_line():
    x = torch.rand(2, 3, 16, 16)
    cases = [
        (lambda: corrupt(x, "rain", 1), "unknown corruption 'rain'; choose one of: brightness"),
        (lambda: corrupt(x, "fog", 6, gens(2)), "severity must be an integer from 1 to 5"),
        (lambda: corrupt(x, "fog", 2), "is random: pass one torch.Generator per image"),
        (lambda: corrupt(x, "fog", 2, gens(1)), r"per image \(2\), got 1"),
        (lambda: corrupt(torch.rand(2, 2, 16, 16), "contrast", 1), "1-channel .* or 3-channel"),
        (lambda: corrupt(torch.rand(2, 3, 7, 16), "contrast", 1), "at least 8x8"),
        (lambda: corrupt((x * 255).to(torch.uint8), "contrast", 1), "float images"),
    ]
    for call, message in cases:
        with pytest.raises(BadExpertError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


# --- TeCo -------------------------------------------------------------------------------------------
class MeanRange(nn.Module):
    """A classifier whose predictions are known by hand: class 1 if the image mean is in
    (0.64, 0.68], else class 2 if its range (max - min) is below 0.22, else class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # a weight, for the model fingerprint
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        flat = x.flatten(1)
        mean, spread = flat.mean(1), flat.amax(1) - flat.amin(1)
        cls = torch.where((mean > 0.64) & (mean <= 0.68), 1, torch.where(spread < 0.22, 2, 0))
        return nn.functional.one_hot(cls, 3).float() + self.anchor


def halves(left: float, right: float) -> torch.Tensor:
    x = torch.full((1, 1, 12, 12), right)
    x[..., :, :6] = left
    return x


def fitted(det: TeCo, model: nn.Module | None = None) -> TeCo:
    model = model or MeanRange()
    clean = (torch.cat([halves(0.3, 0.8), halves(0.1, 0.3)]), torch.tensor([0, 2]))
    det.fit(model, clean)
    return det


def test_score_by_hand():
    """Image A (halves 0.3 | 0.8): mean 0.55, range 0.5, class 0. Brightness adds 0.05, 0.1, ...:
    the mean enters (0.64, 0.68] at severity 2 (0.65). Contrast scales the range by 0.75, 0.5, 0.4, ...: below 0.22
    at severity 3 (0.2). Pixelate keeps mean and range: never (6). Flip severities (2, 3, 6):
    score = population std = 1.6997. Image B (0.1 | 0.3) is class 2 and stays so: (6, 6, 6), 0."""
    det = fitted(TeCo(corruptions=("brightness", "contrast", "pixelate"), **FIRST))
    x = torch.cat([halves(0.3, 0.8), halves(0.1, 0.3)])
    flips = det.flip_severities(x)
    assert flips.tolist() == [[2.0, 3.0, 6.0], [6.0, 6.0, 6.0]]
    expected = torch.tensor([2.0, 3.0, 6.0]).std(unbiased=False).item()
    assert expected == pytest.approx(1.6997, abs=1e-4)
    scores = det.score(x)
    assert scores.tolist() == pytest.approx([expected, 0.0])
    details = det.score_details(x)
    assert details["score"].tolist() == pytest.approx(scores.tolist()) and details["flip_severities"].shape == (2, 3)
    # fewer severities: the first tried whose prediction differs; never -> max + 1. With (1, 4),
    # brightness skips the window (mean 0.6, then 0.75): image A never flips under it
    sub = fitted(TeCo(corruptions=("brightness", "contrast", "pixelate"), severities=(1, 4), **FIRST))
    assert sub.flip_severities(x).tolist() == [[5.0, 4.0, 5.0], [5.0, 5.0, 5.0]]
    # the guard's shared pass: the clean logits come from the caller
    logits = MeanRange()(x)
    assert torch.equal(det.score_given_logits(x, logits), scores)


def test_first_flip_counts_even_if_the_prediction_comes_back():
    """Image C (0.45 | 0.75): mean 0.6, range 0.3, class 0. Brightness: mean 0.65 at severity 1
    (class 1), 0.7 from severity 2 on (class 0 again): the flip is at 1. Contrast: range 0.225 at
    severity 1 (class 0), 0.15 at 2 (class 2). So (1, 2); score 0.5."""
    det = fitted(TeCo(corruptions=("brightness", "contrast"), **FIRST))
    x = halves(0.45, 0.75)
    assert det.flip_severities(x).tolist() == [[1.0, 2.0]]
    assert det.score(x).item() == pytest.approx(0.5)


def test_teco_corrupts_the_original_input_at_every_severity():
    """The model sees the clean batch, then each corruption at each severity computed from the clean
    batch with a freshly seeded generator (never cumulatively)."""
    model = MeanRange()
    det = fitted(TeCo(corruptions=("gaussian_noise", "contrast", "elastic_transform"), severities=(1, 3, 5),
                      **FIRST), model)
    x = torch.cat([halves(0.3, 0.8), halves(0.2, 0.6), halves(0.5, 0.7)])
    model.seen.clear()
    det.score(x)
    assert len(model.seen) == 1 + 3 * 3
    assert torch.equal(model.seen[0], x)
    k = 1
    for name in det.corruptions:
        for s in det.severities:
            fresh = det.input_generators(x, f"teco/{name}")
            assert torch.equal(model.seen[k], corrupt(x, name, s, fresh, strength="cifar10-c")), (name, s)
            k += 1


@pytest.mark.parametrize("strength", ["imagenet-c", "cifar10-c"])
def test_teco_by_default_accumulates_severities_like_the_authors_code(strength):
    """Cumulative (the default): severity s corrupts severity s - 1's output rounded to 8 bits
    (severity 1 the input), and the random corruptions keep drawing from one generator."""
    model = MeanRange()
    det = fitted(TeCo(corruptions=("gaussian_noise", "contrast", "elastic_transform"), severities=(1, 3, 5),
                      strength=strength), model)
    assert det.procedure == "cumulative" and TeCo().strength == "imagenet-c"
    x = torch.cat([halves(0.3, 0.8), halves(0.2, 0.6), halves(0.5, 0.7)])
    model.seen.clear()
    det.score(x)
    assert len(model.seen) == 1 + 3 * 3
    k = 1
    for name in det.corruptions:
        g = det.input_generators(x, f"teco/{name}")
        current = x
        for s in det.severities:
            current = corrupt(current, name, s, g, strength=strength).mul(255).round().div(255)
            assert torch.equal(model.seen[k], current), (name, s)
            k += 1


def test_cumulative_contrast_by_hand():
    """Image A (0.3 | 0.8), range 0.5. CIFAR-10-C contrast scales the range by 0.75, 0.5, 0.4:
    one at a time the range is 0.375, 0.25, 0.2 (below 0.22 at severity 3); cumulatively it is
    0.376 (8-bit), then 0.188 at severity 2. ImageNet-C contrast (0.4 first) gives 0.2 at severity 1."""
    x = halves(0.3, 0.8)
    assert fitted(TeCo(corruptions=FAST, **FIRST)).flip_severities(x)[0, 1].item() == 3.0
    assert fitted(TeCo(corruptions=FAST, strength="cifar10-c")).flip_severities(x)[0, 1].item() == 2.0
    assert fitted(TeCo(corruptions=FAST)).flip_severities(x)[0, 1].item() == 1.0


def test_scores_do_not_depend_on_batch_size_order_or_dtype(backdoored):
    model, attack, _, te = backdoored
    clean = te.subset(range(0, 64))
    det = TeCo(corruptions=("gaussian_noise", "glass_blur", "snow", "frost", "fog", "elastic_transform", "contrast"),
               seed=3).fit(model, clean)
    x = torch.cat([te.images[100:112], attack.apply(te.images[112:124]).mul(255).round().to(torch.uint8)])
    a = det.score(x)  # (batch size, order and dtype independence: the contract kit, tests/test_detectors.py)
    # the backdoor shows on this model: triggered inputs spread their flip severities more
    assert a[12:].mean() > a[:12].mean()


def test_cost_and_registry():
    det = TeCo()
    assert det.cost == {"forward": 76, "backward": 0} and not det.needs_gradients
    assert TeCo.forward_passes_per_input == 76
    assert TeCo(corruptions=("snow", "fog"), severities=(1, 3)).cost == {"forward": 5, "backward": 0}
    assert DETECTORS["teco"] is TeCo and det.corruptions == CORRUPTIONS and det.severities == (1, 2, 3, 4, 5)
    made = get_detector("teco", corruptions=["snow", "fog"], severities=[2, 4])
    assert made.corruptions == ("snow", "fog") and made.severities == (2, 4)


@pytest.mark.parametrize("params,message", [
    (dict(corruptions=("snow", "rain")), r"unknown corruption\(s\) 'rain'; choose from: gaussian_noise, shot_noise"),
    (dict(corruptions=("snow",)), "at least two different corruptions"),
    (dict(corruptions=("snow", "snow")), "at least two different corruptions"),
    (dict(corruptions="snow"), "'corruptions' must be a list of"),
    (dict(severities=(3, 1)), "'severities' must be increasing levels from 1 to 5"),
    (dict(severities=()), "'severities' must be increasing"),
    (dict(severities=(1, 6)), "'severities' must be a list of"),
    (dict(batch_size=0), "'batch_size'"),
    (dict(strength="imagenet"), "'strength'"),
    (dict(procedure="accumulate"), "'procedure'"),
])
def test_bad_parameters_are_one_line_errors(params, message):
    with pytest.raises(BadExpertError, match=message) as info:
        TeCo(**params)
    assert "\n" not in str(info.value)
    with pytest.raises(BadExpertError, match=message):
        get_detector("teco", **params)
    det = TeCo()
    with pytest.raises(BadExpertError):
        det.set_params(**params)
    assert det.corruptions == CORRUPTIONS and det.severities == (1, 2, 3, 4, 5)  # a refused change is undone


def test_images_teco_cannot_corrupt():
    with pytest.raises(BadExpertError, match="1-channel .* or 3-channel .* at least 8x8"):
        model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 2))
        TeCo().fit(model, (torch.rand(4, 2, 6, 6), torch.tensor([0, 1, 0, 1])))


def test_nonfinite_inputs_get_nan(tmp_path):
    det = fitted(TeCo(corruptions=FAST, **FIRST))
    x = torch.cat([halves(0.3, 0.8), halves(0.1, 0.3)])
    x[1, 0, 0, 0] = float("nan")
    s = det.score(x)
    assert s[0].item() == pytest.approx(1.6997, abs=1e-4) and torch.isnan(s[1])
    assert torch.isnan(det.flip_severities(x)[1]).all()


def test_save_load_round_trip(tmp_path):
    model = MeanRange()
    det = fitted(TeCo(corruptions=("brightness", "contrast", "gaussian_noise"), severities=(1, 2, 4), seed=5), model)
    calib = torch.cat([halves(0.31 + 0.01 * k, 0.8) for k in range(30)])  # disjoint from the fitting images
    det.calibrate(calib, fpr=0.1, population="all")
    x = torch.cat([halves(0.3, 0.8), halves(0.45, 0.75), halves(0.1, 0.3)])
    path = det.save(tmp_path / "teco.safetensors")
    loaded = load_detector(path, model)
    # (same params, threshold, scores and decisions: the contract kit) its corruptions come back
    assert loaded.corruptions == ("brightness", "contrast", "gaussian_noise") and loaded.severities == (1, 2, 4)
    assert torch.equal(loaded.flip_severities(x), det.flip_severities(x))


def test_fidelity_teco_robustness_gap_between_clean_and_triggered(backdoored):
    """The paper's claim (Liu et al., CVPR 2023): a clean input flips at similar severities under
    every corruption, a triggered one does not, so its deviation is larger. BadNet's patch on the
    tiny CNN, the authors' procedure (cumulative ImageNet-C): measured mean deviation 1.37 clean vs
    2.38 triggered, AUROC 1.00."""
    from badexpert.metrics import auroc

    model, attack, _, te = backdoored
    clean = te.subset(range(1600, 1700))
    triggered = attack.apply(clean.images[attack.counts(clean.labels)][:60])
    det = TeCo(seed=0).fit(model, te.subset(range(0, 50)))
    sc, st = det.score(clean.images[:60]), det.score(triggered)
    assert st.mean() > sc.mean() + 0.5
    assert auroc(sc.numpy(), st.numpy()) >= 0.9
