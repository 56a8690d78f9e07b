"""The study's statistics: Student-t quantiles, mean and t-interval over seeds, paired
differences, and the verdict an interval supports.

No scipy: the t distribution's CDF is 1 - I_x(df/2, 1/2) / 2 with x = df / (df + t^2), I the
regularized incomplete beta function (continued fraction, Lentz's method), and the quantile is
found by bisection on it. Exact to ~1e-10 for the degrees of freedom a study has (1 to ~100).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

CONFIDENCE = 0.95


def _beta_cf(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz); converges for x < (a+1)/(a+b+2)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a > 0 and b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    if not df > 0:
        raise ValueError(f"df must be positive, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df degrees of freedom (t_{0.975, 4} = 2.776...)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_interval(values: Sequence[float], level: float = CONFIDENCE) -> Dict[str, Optional[float]]:
    """The values, their mean, sample standard deviation and the two-sided t-interval of the
    mean. With one value the spread and the interval are undefined (None)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = math.fsum(values) / n
    out = {"values": list(values), "n": n, "mean": mean, "sd": None, "t": None,
           "half_width": None, "lo": None, "hi": None, "level": level}
    if n > 1:
        sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
        t = t_quantile(0.5 + level / 2.0, n - 1)
        half = t * sd / math.sqrt(n)
        out.update(sd=sd, t=t, half_width=half, lo=mean - half, hi=mean + half)
    return out


def paired(a: Dict[int, float], b: Dict[int, float], level: float = CONFIDENCE) -> dict:
    """a - b over the seeds both have (same seed: same initialisation and data order): the
    seeds, a's and b's values, the differences ("values") and the t-interval of their mean
    (also relative to b's mean, in percent), how many seeds had a lower, and the verdict."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("paired() needs at least one seed in common")
    diffs = [a[s] - b[s] for s in seeds]
    stats = mean_interval(diffs, level)
    base = math.fsum(b[s] for s in seeds) / len(seeds)
    rel = {k: (None if stats[k] is None else 100.0 * stats[k] / base)
           for k in ("mean", "lo", "hi")}
    return {"seeds": seeds, "a_values": [a[s] for s in seeds],
            "b_values": [b[s] for s in seeds], **stats, "relative_percent": rel,
            "a_lower": sum(d < 0 for d in diffs), "verdict": verdict(stats)}


def verdict(stats: dict) -> str:
    """What an interval of a difference a - b says: "a < b" (entirely below 0), "a > b"
    (entirely above), or "not distinguishable" (it holds 0, or there is one seed only)."""
    if stats.get("lo") is None:
        return "not distinguishable"
    if stats["hi"] < 0:
        return "a < b"
    if stats["lo"] > 0:
        return "a > b"
    return "not distinguishable"


def pareto_front(points: List[dict], x: str, y: str) -> List[dict]:
    """The points no other point beats on both x and y (lower is better on both), by x."""
    front = []
    for p in sorted(points, key=lambda q: (q[x], q[y])):
        if not front or p[y] < front[-1][y]:
            front.append(p)
    return front
