import pytest

from hh_ray.reward_kl import fit_linear, plot_reward_vs_sqrt_kl


def test_fit_linear_exact_line():
    a, b, r2 = fit_linear([0, 1, 2, 3], [1, 3, 5, 7])
    assert (a, b, r2) == pytest.approx((1.0, 2.0, 1.0))


def test_fit_linear_by_hand():
    # points (0,0), (1,1), (2,1): b = 0.5, a = 1/6, R^2 = 0.75
    a, b, r2 = fit_linear([0, 1, 2], [0, 1, 1])
    assert (a, b, r2) == pytest.approx((1 / 6, 0.5, 0.75))


def test_plot_written(tmp_path):
    rows = [{"kl": k, "reward_pm": 0.1 * k ** 0.5} for k in (0.0, 1.0, 4.0)]
    out = plot_reward_vs_sqrt_kl(rows, tmp_path / "p.png")
    assert out.exists() and out.stat().st_size > 1000
