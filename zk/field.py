"""Arithmetic in the BLS12-381 scalar field F_r on Python ints and numpy object arrays of them.

Why object arrays: r is 255 bits, too wide for numpy's machine integers; object arrays still let the sumcheck
fold whole tables with one expression per round.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from py_arkworks_bls12381 import G1Point, Scalar

from finlora.zk.commit import GROUP_ORDER, to_scalar

P = GROUP_ORDER


def inv(a: int) -> int:
    if a % P == 0:
        raise ZeroDivisionError("inverse of zero in F_r")
    return pow(a, P - 2, P)


def as_field(values: np.ndarray | Sequence[int]) -> np.ndarray:
    """Values mod r as a 1-d object array of Python ints."""
    out = np.empty(len(values), dtype=object)
    out[:] = [int(v) % P for v in np.asarray(values).reshape(-1).tolist()]
    return out


def tensor(factors: Sequence[tuple[int, int]]) -> np.ndarray:
    """prod_i f_i(b_i) for every b in {0,1}^n, the first factor on the most significant index bit.

    With factors (1 - z_i, z_i) this is eq(z, .), the weights of a multilinear evaluation at z.
    """
    table = np.array([1], dtype=object)
    for f0, f1 in factors:
        table = np.stack([table * (f0 % P) % P, table * (f1 % P) % P], axis=1).reshape(-1)
    return table


def eq_factors(point: Sequence[int]) -> list[tuple[int, int]]:
    return [((1 - z) % P, z % P) for z in point]


def eq_table(point: Sequence[int]) -> np.ndarray:
    return tensor(eq_factors(point))


def dot(a: np.ndarray | Sequence[int], b: np.ndarray | Sequence[int]) -> int:
    return int(sum(int(x) * int(y) for x, y in zip(a, b)) % P)


def poly_eval(coeffs: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % P
    return acc


def coeffs_from_evals(evals: Sequence[int]) -> list[int]:
    """Coefficients (low degree first) of the polynomial with the given values at 0, 1, ..., d (Lagrange)."""
    d = len(evals) - 1
    coeffs = [0] * (d + 1)
    for i, yi in enumerate(evals):
        # basis_i(X) = prod_{j != i} (X - j) / (i - j)
        basis = [1]
        denom = 1
        for j in range(d + 1):
            if j == i:
                continue
            basis = [((basis[k - 1] if k > 0 else 0) - j * (basis[k] if k < len(basis) else 0)) % P
                     for k in range(len(basis) + 1)]
            denom = denom * (i - j) % P
        scale = yi * inv(denom) % P
        for k in range(d + 1):
            coeffs[k] = (coeffs[k] + scale * basis[k]) % P
    return coeffs


def scalars(values: Sequence[int]) -> list[Scalar]:
    return [to_scalar(v) for v in values]


def msm(points: Sequence[G1Point], values: Sequence[int]) -> G1Point:
    """sum_i values_i * points_i (any integers, taken mod r)."""
    if not len(points):
        return G1Point.identity()
    return G1Point.multiexp_unchecked(list(points), scalars(values))
