import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
import torch.nn.functional as F

import src.metrics.digits_classifier as dc
from src.metrics import (
    DigitsFrechetDistance,
    classifier_accuracy,
    frechet_distance,
    gaussian_statistics,
    load_digits_classifier,
    random_unit_directions,
    sliced_wasserstein_distance,
    train_digits_classifier,
)


def random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    b = rng.standard_normal((d, d))
    return b @ b.T + 0.1 * np.eye(d)


# ---------------------------------------------------------------- Fréchet distance


def test_frechet_diagonal_gaussians_match_closed_form():
    """Commuting (diagonal) covariances: FD = sum (m1-m2)^2 + sum (s1-s2)^2 with s the std devs."""
    rng = np.random.default_rng(0)
    m1, m2 = rng.standard_normal(7), rng.standard_normal(7)
    s1, s2 = rng.uniform(0.1, 3, 7), rng.uniform(0.1, 3, 7)
    s1[0] = 0.0  # a singular covariance must still work
    expected = np.sum((m1 - m2) ** 2) + np.sum((s1 - s2) ** 2)
    got = frechet_distance(m1, np.diag(s1**2), m2, np.diag(s2**2))
    assert got == pytest.approx(expected, rel=1e-10)
    # torch inputs give the same answer
    got_t = frechet_distance(
        torch.tensor(m1), torch.tensor(np.diag(s1**2)), torch.tensor(m2), torch.tensor(np.diag(s2**2))
    )
    assert got_t == pytest.approx(expected, rel=1e-10)
    assert isinstance(got_t, float)


def test_frechet_full_covariances_match_scipy_sqrtm():
    rng = np.random.default_rng(1)
    for d in (1, 3, 16):
        m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
        c1, c2 = random_spd(d, rng), random_spd(d, rng)
        covmean = scipy.linalg.sqrtm(c1 @ c2).real
        expected = np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean)
        assert frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-8)


def test_frechet_identical_stats_zero_and_symmetric():
    g = torch.Generator().manual_seed(0)
    # N < d: rank-deficient covariance, the case where a naive sqrtm goes complex/singular
    f1 = torch.randn(40, 64, generator=g) @ torch.randn(64, 64, generator=g)
    f2 = torch.randn(500, 64, generator=g) * 2 + 1
    mu1, s1 = gaussian_statistics(f1)
    mu2, s2 = gaussian_statistics(f2)
    scale = float(torch.trace(s1))
    assert frechet_distance(mu1, s1, mu1, s1) < 1e-8 * scale
    assert frechet_distance(mu2, s2, mu2, s2) < 1e-8 * float(torch.trace(s2))
    a, b = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert a > 1.0
    assert a == pytest.approx(b, rel=1e-7)  # equal in exact arithmetic; S1 singular: not to the last bit


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_gaussian_statistics_match_numpy():
    rng = np.random.default_rng(2)
    f = rng.standard_normal((300, 12)).astype(np.float32) * 3 + 5
    mu, sigma = gaussian_statistics(torch.from_numpy(f))
    assert mu.dtype == sigma.dtype == torch.float64
    assert mu.shape == (12,) and sigma.shape == (12, 12)
    f64 = f.astype(np.float64)
    np.testing.assert_allclose(mu.numpy(), f64.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(f64, rowvar=False), rtol=1e-10, atol=1e-12)
    mu_np, _ = gaussian_statistics(f)  # numpy input
    np.testing.assert_allclose(mu_np.numpy(), mu.numpy())
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_statistics(f[:1])


# ---------------------------------------------------------------- sliced Wasserstein


def test_swd_identical_samples_is_zero():
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein_distance(x, x.clone(), generator=torch.Generator().manual_seed(1)) < 1e-12


def test_swd_of_a_shift_matches_exact_expectation():
    """y = x + v shifts each 1-D projection by v.u: SWD_2^2 = mean_u (v.u)^2 -> |v|^2 E[cos^2] = |v|^2/2."""
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
    v = torch.tensor([3.0, -1.5])
    num = 2048
    swd = sliced_wasserstein_distance(
        x, x + v, num_projections=num, generator=torch.Generator().manual_seed(7)
    )
    u = random_unit_directions(num, 2, torch.Generator().manual_seed(7))
    exact = math.sqrt(float(((u @ v.double()) ** 2).mean()))
    assert swd == pytest.approx(exact, rel=1e-9)
    # Monte-Carlo over directions: std of mean cos^2 is sqrt(1/8 / num) ~ 0.8% of 1/2 here
    assert swd == pytest.approx(float(v.norm()) / math.sqrt(2), rel=0.03)
    assert torch.allclose(u.norm(dim=1), torch.ones(num, dtype=torch.float64))


def test_swd_unequal_sizes_matches_scipy_in_1d():
    """In 1-D every direction is +-1, so SWD_1 is the exact W_1 that scipy computes from the CDFs."""
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal(37), rng.exponential(size=23) + 0.5
    got = sliced_wasserstein_distance(
        x[:, None], y[:, None], num_projections=5, p=1, generator=torch.Generator().manual_seed(0)
    )
    assert got == pytest.approx(scipy.stats.wasserstein_distance(x, y), rel=1e-10)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_swd_unequal_sizes_equals_replicated_equal_sizes(p):
    """Empirical measures are unchanged by repeating every point k times: 6 vs 4 points == 12 vs 12 points,
    and the equal-size case is the plain sorted pairing."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 2, generator=g), torch.randn(4, 2, generator=g) + 1
    a = sliced_wasserstein_distance(x, y, 64, torch.Generator().manual_seed(11), p=p)
    b = sliced_wasserstein_distance(
        x.repeat(2, 1), y.repeat(3, 1), 64, torch.Generator().manual_seed(11), p=p
    )
    assert a > 0.1
    assert a == pytest.approx(b, rel=1e-10)


def test_swd_deterministic_with_seeded_generator():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 2, generator=g), torch.randn(200, 2, generator=g) * 2
    a = sliced_wasserstein_distance(x, y, generator=torch.Generator().manual_seed(3))
    b = sliced_wasserstein_distance(x, y, generator=torch.Generator().manual_seed(3))
    c = sliced_wasserstein_distance(x, y, generator=torch.Generator().manual_seed(4))
    assert a == b
    assert a != c
    with pytest.raises(ValueError, match="same d"):
        sliced_wasserstein_distance(x, torch.randn(5, 3))


def test_swd_separates_toy_distributions():
    from src.data import Toy2DDataModule

    gaussians = Toy2DDataModule("eight_gaussians")
    ref = gaussians.sample_reference(2000, seed=0)
    same = sliced_wasserstein_distance(
        ref, gaussians.sample_reference(1500, seed=1), generator=torch.Generator().manual_seed(0)
    )
    other = sliced_wasserstein_distance(
        ref,
        Toy2DDataModule("two_moons").sample_reference(1500, seed=1),
        generator=torch.Generator().manual_seed(0),
    )
    assert same < 0.1 < other
    assert other > 3 * same


# ---------------------------------------------------------------- digits classifier and its Fréchet distance


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ddpm-cache")


@pytest.fixture(scope="module")
def trained():
    """(model, test accuracy) of the default training run, shared by the tests below (a few seconds)."""
    return train_digits_classifier(seed=0)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_digits_classifier_accuracy_and_shapes(trained):
    model, acc = trained
    assert acc >= 0.95
    assert acc == classifier_accuracy(model, "test")
    assert not model.training
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    feats = model.features(x)
    assert feats.shape == (5, 128) and (feats >= 0).all()  # after ReLU
    assert model(x).shape == (5, 10)
    with pytest.raises(ValueError, match="1, 8, 8"):
        model(torch.zeros(2, 1, 16, 16))


def test_training_is_deterministic_given_the_seed():
    a, acc_a = train_digits_classifier(seed=3, epochs=1)
    b, acc_b = train_digits_classifier(seed=3, epochs=1)
    c, _ = train_digits_classifier(seed=4, epochs=1)
    assert same_weights(a, b) and acc_a == acc_b
    assert not same_weights(a, c)


def test_classifier_cache_round_trip(trained, tmp_path, monkeypatch):
    model, _ = trained
    cache_dir = tmp_path / "cache"
    path = cache_dir / "digits_classifier_v1.pt"
    assert not path.exists()
    calls = []

    def fake_training(seed=0, **kwargs):  # stands in for the run the `trained` fixture already did
        calls.append(seed)
        return model, 1.0

    monkeypatch.setattr(dc, "train_digits_classifier", fake_training)
    first = load_digits_classifier(cache_dir)  # "trains" with seed 0 and writes the file
    assert calls == [0] and path.is_file()
    assert same_weights(first, model)
    assert not first.training and not any(p.requires_grad for p in first.parameters())

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been read, not retrained")

    monkeypatch.setattr(dc, "train_digits_classifier", no_training)
    assert same_weights(load_digits_classifier(cache_dir), model)
    monkeypatch.setenv("DDPM_CACHE_DIR", str(cache_dir))
    assert same_weights(load_digits_classifier(), model)  # default location comes from the env var

    good_bytes = path.read_bytes()
    monkeypatch.setattr(dc, "train_digits_classifier", fake_training)
    for bad in (b"not a checkpoint", good_bytes[: len(good_bytes) // 2]):
        path.write_bytes(bad)
        with pytest.warns(UserWarning, match="unreadable"):
            reloaded = load_digits_classifier(cache_dir)
        assert same_weights(reloaded, model)
        state = torch.load(path, weights_only=True)  # the bad file was replaced by a valid one
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert calls == [0, 0, 0]
    assert not list(cache_dir.glob("*.tmp"))  # atomic writes leave no temp files behind


@pytest.fixture(scope="module")
def digits_fd(trained, cache_dir):
    return DigitsFrechetDistance(cache_dir=cache_dir, classifier=trained[0])


def test_digits_fd_reference_statistics_cached(trained, cache_dir, digits_fd, monkeypatch):
    model, _ = trained
    assert DigitsFrechetDistance.key == "fd_digits_classifier"
    assert "FID" not in DigitsFrechetDistance.name
    stats_files = list(cache_dir.glob("digits_fd_stats_v1_test_seed0_*.pt"))
    assert len(stats_files) == 1
    # the reference split scored against itself is exactly the zero distance
    x_test, _ = dc.digits_split("test", 0)
    assert digits_fd(x_test) < 1e-6

    # a second instance reads the statistics instead of recomputing them, and loads the classifier by default
    def no_data(*args, **kwargs):
        raise AssertionError("reference statistics should come from the cache")

    monkeypatch.setattr(dc, "digits_split", no_data)
    monkeypatch.setattr(dc, "train_digits_classifier", lambda seed=0, **kw: (model, 1.0))
    again = DigitsFrechetDistance(cache_dir=cache_dir)
    assert torch.equal(again.mu, digits_fd.mu) and torch.equal(again.sigma, digits_fd.sigma)
    assert same_weights(again.classifier, model)


def test_digits_fd_orders_real_blurred_shuffled_noise(digits_fd):
    x, _ = dc.digits_split("val", 0)  # held out from both the classifier and the reference
    n = len(x)
    g = torch.Generator().manual_seed(0)
    floor = digits_fd.reference_fd_of_real_data(n)
    real = digits_fd(x)
    blurred = digits_fd(F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1))
    perm = torch.stack([torch.randperm(64, generator=g) for _ in range(n)])
    shuffled = digits_fd(torch.gather(x.flatten(1), 1, perm).view_as(x))
    noise = digits_fd(torch.randn(x.shape, generator=g).clamp(-1, 1))
    print(
        f"\nfd_digits_classifier (N={n}): floor {floor:.1f}, real {real:.1f}, blurred {blurred:.1f}, "
        f"shuffled {shuffled:.1f}, noise {noise:.1f}"
    )
    assert 0 < floor and real < 3 * floor  # real held-out digits sit near the real-vs-real floor
    assert noise > 10 * max(floor, real)
    assert max(floor, real) < blurred < noise
    assert max(floor, real) < shuffled < noise
    # increasing pixel noise gives increasing distance
    eps = torch.randn(x.shape, generator=g)
    scores = [digits_fd((x + s * eps).clamp(-1, 1)) for s in (0.0, 0.2, 0.5, 1.0)]
    assert scores == sorted(scores) and scores[0] == pytest.approx(real)


def test_reference_fd_of_real_data_arguments(digits_fd):
    full = digits_fd.reference_fd_of_real_data()
    assert full < digits_fd.reference_fd_of_real_data(100)  # the small-N bias of the estimate
    with pytest.raises(ValueError, match="n must be"):
        digits_fd.reference_fd_of_real_data(10**6)
    with pytest.raises(ValueError, match="1, 8, 8"):
        digits_fd(torch.zeros(4, 3, 8, 8))


# ---------------------------------------------------------------- class accuracy of conditional samples
DIGITS_DATA = {"_target_": "src.data.digits.DigitsDataModule", "seed": 0}


def test_class_accuracy_scores_the_requested_class_and_counts_saturated_pixels():
    from src.metrics.sample_quality import class_accuracy

    x, y = dc.digits_split("test", 0)
    right = class_accuracy(x, y, DIGITS_DATA)
    # real digits with their own labels: the classifier's accuracy on the test split (the same images)
    assert right["class_accuracy"] == pytest.approx(right["class_accuracy_real_digits"])
    assert right["class_accuracy"] > 0.9
    assert right["extreme_pixels"] == right["extreme_pixels_real_digits"]
    assert sorted(k for k in right if k.startswith("class_accuracy_") and k[-1].isdigit()) == [
        f"class_accuracy_{k}" for k in range(10)]
    wrong = class_accuracy(x, (y + 1) % 10, DIGITS_DATA)  # every sample "drawn for" another class
    assert wrong["class_accuracy"] < 0.05
    saturated = class_accuracy(torch.where(x > 0, 1.0, -1.0), y, DIGITS_DATA)
    assert saturated["extreme_pixels"] == 1.0 > right["extreme_pixels"]
    with pytest.raises(ValueError, match="class-conditional checkpoint"):
        class_accuracy(x, None, DIGITS_DATA)
    with pytest.raises(ValueError, match="8x8 digits"):
        class_accuracy(torch.zeros(4, 3, 32, 32), torch.zeros(4), {"_target_": "src.data.cifar10.CIFAR10DataModule"})
