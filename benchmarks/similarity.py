"""Image similarity for the acceleration levels' quality cost: PSNR and SSIM, in numpy.

Written here rather than taken from scikit-image (which has both) to keep the benchmark's dependencies to what
the server already installs; LPIPS is not used because its network weights would have to be downloaded.
SSIM follows Wang et al. 2004 (Gaussian window, sigma 1.5, K1 0.01, K2 0.03) on the luma channel, as
scikit-image's `structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`;
tests/test_speed_benchmark.py checks a known case.
"""

from __future__ import annotations

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (inf when identical)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))


def _luma(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float64)
    if image.ndim == 3:
        image = image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114
    return image


def _gaussian_filter(image: np.ndarray, sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    padded = np.pad(image, radius, mode="reflect")
    rows = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="valid"), 1, padded)
    return np.apply_along_axis(lambda c: np.convolve(c, kernel, mode="valid"), 0, rows)


def ssim(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Mean structural similarity of two uint8 images' luma (1.0 when identical)."""
    x, y = _luma(a), _luma(b)
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mx, my = _gaussian_filter(x), _gaussian_filter(y)
    vx = _gaussian_filter(x * x) - mx * mx
    vy = _gaussian_filter(y * y) - my * my
    cxy = _gaussian_filter(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    radius = int(3.5 * 1.5 + 0.5)  # as scikit-image: the border, where the window leaves the image, is left out
    return float(s[radius:-radius, radius:-radius].mean())
