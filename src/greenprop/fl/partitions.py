"""Client partitions: IID and Dirichlet(alpha) label skew, deterministic from a seed."""

from __future__ import annotations

import numpy as np

from greenprop.errors import GreenpropError

__all__ = ["dirichlet_partition", "iid_partition", "parse_partition", "partition"]


def _check_clients(num_clients: int, n: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise GreenpropError(f"fl option clients={num_clients!r}: must be an integer >= 1")
    if num_clients > n:
        raise GreenpropError(f"fl option clients={num_clients!r}: more clients than the {n} examples")


def iid_partition(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into ``num_clients`` near-equal parts."""
    _check_clients(num_clients, n)
    order = np.random.default_rng([seed, 0]).permutation(n)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Label-skewed split: each class's examples go to clients in Dirichlet(alpha) proportions.

    The usual construction (Hsu et al. 2019): for every class draw client shares
    ``p ~ Dir(alpha * 1)`` and cut that class's shuffled indices at ``cumsum(p)``. Small
    ``alpha`` gives few classes per client. Redrawn (at most 100 times, deterministically)
    until every client has ``min_size`` examples.
    """
    labels = np.asarray(labels)
    _check_clients(num_clients, len(labels))
    if not (isinstance(alpha, int | float) and np.isfinite(alpha) and alpha > 0):
        raise GreenpropError(f"fl option partition=dirichlet:{alpha!r}: alpha must be a number > 0")
    rng = np.random.default_rng([seed, 1])
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise GreenpropError(
        f"fl option partition=dirichlet:{alpha!r}: no split gave every one of {num_clients} "
        f"clients {min_size} example(s) in 100 draws; use fewer clients or a larger alpha"
    )


def parse_partition(spec: str) -> tuple[str, float | None]:
    """``"iid"`` -> ("iid", None); ``"dirichlet:0.6"`` -> ("dirichlet", 0.6)."""
    text = str(spec).strip().lower()
    if text == "iid":
        return "iid", None
    kind, _, value = text.partition(":")
    if kind == "dirichlet":
        try:
            alpha = float(value)
        except ValueError:
            alpha = float("nan")
        if np.isfinite(alpha) and alpha > 0:
            return "dirichlet", alpha
    raise GreenpropError(f"fl option partition={spec!r}: use iid or dirichlet:ALPHA with ALPHA > 0")


def partition(spec: str, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Indices of every client's examples for a ``--partition`` spec."""
    kind, alpha = parse_partition(spec)
    if kind == "iid":
        return iid_partition(len(labels), num_clients, seed)
    assert alpha is not None
    return dirichlet_partition(labels, num_clients, alpha, seed)
