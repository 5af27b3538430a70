"""Confidence bounds for parity claims, and how rows are drawn for them. numpy and math only
(the device computes the same bounds on its own results).

A parity figure measured on n rows is an estimate; what a gate can certify is a one-sided
bound that holds with the stated confidence for the population the rows were drawn from:

agreement     k of n rows give the reference's top-1 answer. The lower bound is the exact
              Clopper-Pearson bound: the p at which seeing k or more agreeing rows has
              probability alpha (the Beta(alpha; k, n-k+1) quantile). With no flip at all it
              is alpha**(1/n): certifying 99% at 95% takes 299 rows.
accuracy drop the candidate's accuracy minus the reference's on the same labelled rows, a
              paired difference: drop = (b - c) / n, b the rows the reference gets right and
              the candidate wrong (harmful flips), c the reverse. The drop can never exceed
              the share of harmful flips, and b is Binomial(n, p_b) whatever c does, so the
              Clopper-Pearson upper bound on b/n is an exact upper bound on the drop. It is
              conservative when flips also go the other way (c > 0): it gives no credit for
              them. The conditional (McNemar) bound on b of the b + c discordant pairs
              bounds the *ratio* b / (b + c), not the drop, and claims a zero drop when no
              row flipped, whatever n; it is not used.

The binomial tails are summed in log space (log-gamma binomial coefficients, log-sum-exp),
and the bound is found by bisection on p: no scipy on the device. tests/test_proof.py
checks them against scipy.stats.beta on a grid.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

CONFIDENCE = 0.95


def _log_binom_coef(n: int, ks: np.ndarray) -> np.ndarray:
    lg = math.lgamma
    base = lg(n + 1)
    return np.array([base - lg(k + 1) - lg(n - k + 1) for k in ks.tolist()], dtype=np.float64)


def _tail(n: int, lo: int, hi: int):
    """p -> P(lo <= X <= hi) for X ~ Binomial(n, p), summed in log space."""
    ks = np.arange(lo, hi + 1, dtype=np.float64)
    coef = _log_binom_coef(n, ks.astype(np.int64))

    def prob(p: float) -> float:
        if p <= 0.0:
            return 1.0 if lo == 0 else 0.0
        if p >= 1.0:
            return 1.0 if hi == n else 0.0
        terms = coef + ks * math.log(p) + (n - ks) * math.log1p(-p)
        top = terms.max()
        return float(math.exp(top) * np.exp(terms - top).sum())

    return prob


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return _tail(n, 0, k)(p) if k < n else 1.0


def _bisect(f, target: float, increasing: bool, iters: int = 200) -> float:
    """p in [0, 1] with f(p) = target for a monotone f."""
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _check(k: int, n: int, confidence: float) -> None:
    if not (isinstance(n, int | np.integer) and isinstance(k, int | np.integer)) or n < 0 or not 0 <= k <= n:
        raise ValueError(f"counts must be integers with 0 <= k <= n, got k={k!r}, n={n!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence!r}")


def lower_bound(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson lower bound on a proportion seen as k successes in n trials."""
    _check(k, n, confidence)
    if k == 0:
        return 0.0
    alpha = 1.0 - confidence
    if k == n:
        return alpha ** (1.0 / n)
    return _bisect(_tail(n, k, n), alpha, increasing=True)  # P(X >= k) grows with p


def upper_bound(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound on a proportion seen as k successes in n trials."""
    _check(k, n, confidence)
    if n == 0 or k == n:
        return 1.0
    alpha = 1.0 - confidence
    if k == 0:
        return 1.0 - alpha ** (1.0 / n)
    return _bisect(_tail(n, 0, k), alpha, increasing=False)  # P(X <= k) falls as p grows


def rows_needed(limit: float, failures: int = 0, confidence: float = CONFIDENCE, *, upper: bool = False,
                cap: int = 10_000_000) -> int | None:
    """The fewest rows n at which `failures` bad rows (and no more) still certify the limit.

    Agreement (upper=False): the lower bound on (n - failures) / n reaches `limit` (a share
    such as 0.99). Accuracy drop (upper=True): the upper bound on failures / n stays at or
    under `limit` (0.005 = half a point). None when no n up to `cap` would do.
    """
    if upper:
        ok = lambda n: upper_bound(failures, n, confidence) <= limit + 1e-12  # noqa: E731
    else:
        if limit <= 0:
            return max(failures, 1)
        if limit >= 1.0:
            return None
        ok = lambda n: lower_bound(n - failures, n, confidence) >= limit - 1e-12  # noqa: E731
    lo, hi = max(failures, 1), max(failures, 1)
    while not ok(hi):
        lo, hi = hi, hi * 2
        if hi > cap:
            return None
    while lo < hi:  # smallest n in (lo, hi] that certifies; both bounds move monotonically in n
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def parity_bounds(reference: np.ndarray, candidate: np.ndarray, y=None, *, labelled=None,
                  confidence: float = CONFIDENCE) -> dict:
    """Bounds for a candidate's logits against a reference's on the same rows.

    `y`: true labels (None or -1 for an unlabelled row); `labelled`: an optional mask of the
    rows whose labels may judge accuracy (e.g. not the rows the model trained on). Returns
    counts and bounds: rows, agree, flips, agreement_lower; labelled rows, harmful and
    helpful flips, accuracy_drop_upper (None without labelled rows).
    """
    ref_top = np.asarray(reference).argmax(1)
    cand_top = np.asarray(candidate).argmax(1)
    n = int(len(ref_top))
    agree = int((ref_top == cand_top).sum())
    out = {"confidence": confidence, "rows": n, "agree": agree, "flips": n - agree,
           "agreement_lower": lower_bound(agree, n, confidence) if n else 0.0}
    if y is not None:
        y = np.array([-1 if v is None else int(v) for v in y])
        mask = y >= 0
        if labelled is not None:
            mask &= np.asarray(labelled, dtype=bool)
        m = int(mask.sum())
        harmful = int(((ref_top == y) & (cand_top != y) & mask).sum())
        helpful = int(((ref_top != y) & (cand_top == y) & mask).sum())
        out.update(labelled_rows=m, harmful_flips=harmful, helpful_flips=helpful,
                   accuracy_drop_upper=upper_bound(harmful, m, confidence) if m else None)
    return out


def margins(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit per row: how close each answer is to flipping."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape[1] < 2:
        return np.full(len(logits), np.inf)
    part = np.sort(logits, axis=1)
    return part[:, -1] - part[:, -2]


def smallest_margin_rows(reference: np.ndarray, candidate: np.ndarray, n: int = 5,
                         ids: list | None = None) -> list[dict]:
    """The n rows whose reference margin is smallest, and whether the candidate flipped them."""
    m = margins(reference)
    ref_top, cand_top = np.asarray(reference).argmax(1), np.asarray(candidate).argmax(1)
    return [{"row": int(i), **({"id": ids[i]} if ids is not None else {}), "margin": float(m[i]),
             "flipped": bool(ref_top[i] != cand_top[i])} for i in np.argsort(m, kind="stable")[:n]]


def stratified(labels: list, n: int, seed: int = 0) -> list[int]:
    """Up to n row indices drawn across classes (seeded; in proportion to each class's rows,
    every class with at least one row while n allows), never the head of a file. Rows
    without a label (None) form their own group. Returned in file order."""
    groups: dict = {}
    for i, v in enumerate(labels):
        groups.setdefault(v, []).append(i)
    total = len(labels)
    if n >= total:
        return list(range(total))
    rng = np.random.default_rng(seed)
    keys = sorted(groups, key=lambda v: (v is None, str(v)))
    shuffled = {k: [groups[k][j] for j in rng.permutation(len(groups[k]))] for k in keys}
    share = {k: n * len(groups[k]) / total for k in keys}
    take = {k: min(len(groups[k]), max(1 if n >= len(keys) else 0, int(share[k]))) for k in keys}
    # hand out what rounding left, largest remainders first, to classes with rows to spare
    left = n - sum(take.values())
    for k in sorted(keys, key=lambda k: -(share[k] - int(share[k]))) * (left + 1):
        if left <= 0:
            break
        if take[k] < len(groups[k]):
            take[k] += 1
            left -= 1
    while sum(take.values()) > n:  # more classes than rows: drop the largest groups' extra rows
        k = max(keys, key=lambda k: take[k])
        take[k] -= 1
    return sorted(i for k in keys for i in shuffled[k][: take[k]])


def cover_classes(labels: list, n: int, first: list[int] = (), seed: int = 0) -> list[int]:
    """Up to n indices: `first` (e.g. the smallest-margin rows), then round-robin over the
    classes (seeded within each), so every class is there when n allows. In that order."""
    out, seen = [], set()
    for i in first:
        if i not in seen and len(out) < n:
            out.append(int(i))
            seen.add(int(i))
    rng = np.random.default_rng(seed)
    groups: dict = {}
    for i, v in enumerate(labels):
        groups.setdefault(v, []).append(i)
    queues = [[groups[k][j] for j in rng.permutation(len(groups[k]))]
              for k in sorted(groups, key=lambda v: (v is None, str(v)))]
    # classes the first rows did not reach go first
    covered = {labels[i] for i in out}
    queues.sort(key=lambda q: labels[q[0]] in covered)
    while len(out) < n and any(queues):
        for q in queues:
            while q and q[0] in seen:
                q.pop(0)
            if q and len(out) < n:
                seen.add(q[0])
                out.append(q.pop(0))
    return out


def row_id(item) -> str:
    """A short, stable name for a row that does not reveal it: the first 12 hex digits of the
    sha256 of its text (or of its file's bytes, for an image path that exists)."""
    from pathlib import Path

    data = None
    if isinstance(item, Path) or (isinstance(item, str) and len(item) < 4096):
        p = Path(item)
        try:
            if p.is_file():
                data = p.read_bytes()
        except (OSError, ValueError):
            data = None
    if data is None:
        data = str(item).encode("utf-8")
    return hashlib.sha256(data).hexdigest()[:12]


def describe(bounds: dict) -> str:
    """One line: what the bounds rest on."""
    text = (f"agreement {bounds['agree']}/{bounds['rows']} rows, at least "
            f"{100 * bounds['agreement_lower']:.2f}% at {100 * bounds['confidence']:.0f}% confidence")
    if bounds.get("accuracy_drop_upper") is not None:
        text += (f"; accuracy drop at most {100 * bounds['accuracy_drop_upper']:.2f} points "
                 f"({bounds['harmful_flips']} harmful flips in {bounds['labelled_rows']} labelled rows)")
    return text
