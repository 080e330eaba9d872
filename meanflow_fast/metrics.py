"""Distribution distances: the Fréchet distance between Gaussians fitted to features."""
import numpy as np

__all__ = ["feature_stats", "frechet_distance"]


def feature_stats(features: np.ndarray):
    """Mean and covariance (unbiased) of (n, d) features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (n, d) with n ≥ 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}).

    tr((Σ1 Σ2)^{1/2}) = tr((Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}): the inner matrix is symmetric PSD, so its
    square root comes from a symmetric eigendecomposition (no complex parts to discard).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {s1.shape}, sigma2 {s2.shape}")
    w, V = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (V * np.sqrt(np.clip(w, 0, None))) @ V.T
    m = root1 @ s2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)
    return max(fd, 0.0)  # ≥ 0 in exact arithmetic; identical inputs give about −1e−12 in floating point
