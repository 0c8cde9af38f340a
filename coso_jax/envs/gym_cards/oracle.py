"""Oracle policies of the gym_cards games.

- NumberLine: move toward the target (optimal: reaches it in |target - current| steps, return +1).
- Blackjack: basic strategy for hit/stand only (infinite deck, dealer stands on soft 17, no
  doubling or splitting): hard 12 stands against 4-6, hard 13-16 against 2-6, hard 17+ always;
  soft 18 stands against 2-8, soft 19+ always; everything else hits.
- EZPoints / Points24: an exact solver. `solutions(numbers, target, ops)` enumerates every
  expression that combines all the numbers with the allowed binary operators (every bracketing,
  every order), evaluated with exact fractions, and prints each with the fewest parentheses.
  The oracle picks the shortest solution (ties: alphabetical by token string) that extends the
  formula entered so far and emits it token by token, then "="; when no solution exists (or the
  formula entered so far cannot be completed) it says so and presses "=" at once, which ends the
  episode with the smallest loss (-1).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

from coso_jax.envs.gym_cards.formula import evaluate
from coso_jax.envs.gym_cards.points import BLANK, EZPOINTS_ACTIONS, POINTS24_ACTIONS

__all__ = [
    "numberline_action",
    "blackjack_action",
    "solutions",
    "points_plan",
    "oracle_action",
    "EZPOINTS_OPS",
    "POINTS24_OPS",
]

EZPOINTS_OPS: tuple[str, ...] = ("+", "*")
POINTS24_OPS: tuple[str, ...] = ("+", "-", "*", "/")
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


# --- NumberLine ----------------------------------------------------------------------------------
def numberline_action(current: int, target: int) -> int:
    """1 ('+') when the current number is below the target, else 0 ('-')."""
    return 1 if current < target else 0


# --- Blackjack -----------------------------------------------------------------------------------
def blackjack_action(player_sum: int, usable_ace: bool, dealer_showing: int) -> int:
    """Basic strategy, hit/stand only: 1 = hit, 0 = stand. `dealer_showing` is 1 for an ace."""
    up = 11 if dealer_showing == 1 else int(dealer_showing)
    if usable_ace:
        if player_sum >= 19:
            return 0
        if player_sum == 18:
            return 0 if 2 <= up <= 8 else 1
        return 1
    if player_sum >= 17:
        return 0
    if 13 <= player_sum <= 16:
        return 0 if 2 <= up <= 6 else 1
    if player_sum == 12:
        return 0 if 4 <= up <= 6 else 1
    return 1


# --- points games --------------------------------------------------------------------------------
def _all_formulas(numbers: tuple[int, ...], ops: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    """Every formula over all `numbers` (each once) with binary `ops`, mapped to its float value.

    Dynamic programming over subsets of the card positions: the formulas of a subset combine the
    formulas of each ordered split (A, B) with each operator. Each formula is printed with the
    fewest parentheses (the right operand of - and / is bracketed at equal precedence too).
    Floats are only a filter; `solutions` re-checks every candidate exactly.
    """
    n = len(numbers)
    table: dict[int, dict[tuple[str, ...], tuple[float, int]]] = {
        1 << i: {(str(v),): (float(v), _ATOM)} for i, v in enumerate(numbers)}
    for mask in sorted(range(1, 1 << n), key=lambda m: bin(m).count("1")):
        if mask in table:
            continue
        out: dict[tuple[str, ...], tuple[float, int]] = {}
        a = (mask - 1) & mask
        while a:
            b = mask ^ a
            for ta, (va, pa) in table[a].items():
                for tb, (vb, pb) in table[b].items():
                    for op in ops:
                        prec = _PREC[op]
                        if op == "/":
                            if vb == 0.0:
                                continue
                            value = va / vb
                        elif op == "+":
                            value = va + vb
                        elif op == "-":
                            value = va - vb
                        else:
                            value = va * vb
                        left = ("(",) + ta + (")",) if pa < prec else ta
                        right = ("(",) + tb + (")",) if (pb < prec or (pb == prec and op in "-/")) else tb
                        out[left + (op,) + right] = (value, prec)
            a = (a - 1) & mask
        table[mask] = out
    return {tokens: value for tokens, (value, _) in table[(1 << n) - 1].items()}


@functools.lru_cache(maxsize=4096)
def _solutions_cached(numbers: tuple[int, ...], target: int, ops: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    candidates = [t for t, v in _all_formulas(numbers, ops).items() if abs(v - target) < 1e-6]
    found = [t for t in candidates if evaluate(t) == target]
    return tuple(sorted(found, key=lambda t: (len(t), " ".join(t))))


def solutions(numbers: Sequence[int], target: int, ops: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """Every formula (token tuple) using all `numbers` once with `ops` that equals `target`.

    Sorted shortest first (ties alphabetical); empty when the deal has no solution. Parentheses
    appear only where the operator precedence needs them.
    """
    bad = [op for op in ops if op not in _PREC]
    if bad:
        raise ValueError(f"unsupported operators {bad}; use a subset of {tuple(_PREC)}")
    return _solutions_cached(tuple(sorted(int(v) for v in numbers)), int(target), tuple(ops))


def points_plan(numbers: Sequence[int], formula: Sequence[str], target: int,
                ops: Sequence[str]) -> tuple[tuple[str, ...] | None, str]:
    """(the solution being followed or None, the next token) for a points game state.

    The next token is the solution's next token, or "=" when the formula is complete, when the deal
    has no solution, or when the formula entered so far starts no solution.
    """
    prefix = tuple(t for t in formula if t != BLANK)
    for sol in solutions(numbers, target, ops):
        if sol[:len(prefix)] == prefix:
            return sol, (sol[len(prefix)] if len(prefix) < len(sol) else "=")
    return None, "="


# --- dispatch ------------------------------------------------------------------------------------
def oracle_action(env_name: str, info: Mapping[str, Any]) -> int:
    """The oracle's env action for the state described by `info` (env given by short name)."""
    if env_name == "NumberLine":
        return numberline_action(int(info["current"]), int(info["target"]))
    if env_name == "Blackjack":
        return blackjack_action(int(info["player_sum"]), bool(info["usable_ace"]), int(info["dealer_showing"]))
    if env_name == "EZPoints":
        _, token = points_plan(info["numbers"], info["formula"], 12, EZPOINTS_OPS)
        return EZPOINTS_ACTIONS.index(token)
    if env_name == "Points24":
        _, token = points_plan(info["numbers"], info["formula"], 24, POINTS24_OPS)
        return POINTS24_ACTIONS.index(token)
    raise ValueError(f"no oracle for env {env_name!r}; known: NumberLine, EZPoints, Points24, Blackjack")
