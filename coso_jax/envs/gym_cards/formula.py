"""Safe evaluation of the points games' formulas: exact by default, the reference's float power on request.

The reference (RL4VLM gym_cards, `reference_envs.md` §1.2-1.3) joined the formula tokens into one
string, called Python's `eval` on it and compared the result with the target; any exception
counted as a failed formula. We keep Python's expression grammar over the same characters (digits,
+ - * / ( ) and spaces; adjacent number tokens concatenate into one number as in the joined string;
`**` and `//` mean what Python says, unary signs allowed) but never call `eval`:

- Exact mode (always tried first): the formula is evaluated with exact fractions, so
  8 / (3 - 8 / 3) equals 24 (Python floats give 23.999999999999986) and 3 ** -1 * 72 is exactly 24.
  A power whose exponent is not an integer is refused (`FractionalPowerError`), and so are absurd
  integer powers (|exponent| > 64, or a result over about 4096 bits): the reference would compute
  them, or hang on a power tower such as 10 ** 10 ** 10. No reward changes: every number token is a
  card, an exponent above 64 needs two cards and its base a third, and the one card left cannot turn
  such a power into 12 or 24; the bit cap is out of reach of four cards.
- Reference float power (`allow_fractional_powers=True`): a formula that holds a power with a
  non-integer exponent is evaluated again, as a whole, with Python's own number semantics, which is
  what the reference's `eval` did: int literals, `/` true division to float, `**` with a float
  operand a float power (a negative base gives a complex number, which never equals the target),
  `//` floor division. So 4 ** (3 / 2) * 3 gives 24.0, as in the reference. Integer powers keep the
  size caps above. Formulas without a fractional power are still exact.

Anything that is not a number, or that raises (division by zero, float overflow, `//` of a complex
number), is a failed formula: `FormulaError`.
"""
from __future__ import annotations

import ast
from fractions import Fraction
from typing import Sequence, Union

__all__ = ["evaluate", "FormulaError", "FractionalPowerError", "Value"]

_MAX_EXPONENT = 64
_MAX_BITS = 4096

# The value of a formula: a Fraction in exact mode; float or complex when a fractional power was
# evaluated the reference's way (`allow_fractional_powers=True`).
Value = Union[Fraction, float, complex]


class FormulaError(ValueError):
    """The formula is not a valid arithmetic expression over the allowed tokens, or it raised."""


class FractionalPowerError(FormulaError):
    """The formula raises a number to a non-integer power (refused unless `allow_fractional_powers`)."""


def _check_int_power(base_bits: int, exp: int, base_is_zero: bool) -> None:
    """Refuses integer powers that are absurdly large (see the module docstring)."""
    if abs(exp) > _MAX_EXPONENT:
        raise FormulaError(f"exponent {exp} too large")
    if base_is_zero and exp < 0:
        raise FormulaError("zero to a negative power")
    if base_bits * abs(exp) > _MAX_BITS:
        raise FormulaError("power too large")


def _nonzero(divisor: Fraction) -> Fraction:
    if divisor == 0:
        raise FormulaError("division by zero")
    return divisor


def _exact_power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise FractionalPowerError(f"fractional exponent {exponent}")
    exp = int(exponent)
    _check_int_power(max(abs(base.numerator), base.denominator).bit_length(), exp, base == 0)
    return base ** exp


def _python_power(base, exponent):
    if type(base) is int and type(exponent) is int:
        _check_int_power(abs(base).bit_length(), exponent, base == 0)
    return base ** exponent


# Two arithmetics over the same expression tree: exact Fractions (the default), and Python's own numbers
# (the reference's `eval`) for a formula with a fractional power. Each: (constant, {operator: function}).
_EXACT = (Fraction, {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / _nonzero(b), ast.FloorDiv: lambda a, b: Fraction(a // _nonzero(b)),
    ast.Pow: _exact_power})
_PYTHON = (int, {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Pow: _python_power})


def _eval(node: ast.AST, arithmetic: tuple) -> Value | int:
    """The value of a parsed formula in `arithmetic` (`_EXACT` or `_PYTHON`)."""
    constant, operators = arithmetic
    if isinstance(node, ast.Expression):
        return _eval(node.body, arithmetic)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return constant(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval(node.operand, arithmetic)
        return +value if isinstance(node.op, ast.UAdd) else -value
    if isinstance(node, ast.BinOp) and type(node.op) in operators:
        return operators[type(node.op)](_eval(node.left, arithmetic), _eval(node.right, arithmetic))
    raise FormulaError(f"unsupported expression element {type(node).__name__}")


def _parse(tokens: Sequence[str]) -> ast.Expression:
    text = "".join(tokens)
    if not text.strip():
        raise FormulaError("empty formula")
    if any(ch not in "0123456789+-*/() " for ch in text):
        raise FormulaError(f"formula has characters outside digits and + - * / ( ): {text!r}")
    try:
        return ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise FormulaError(f"not an expression: {text!r}") from exc


def evaluate(tokens: Sequence[str], *, allow_fractional_powers: bool = False) -> Value:
    """The value of the formula `''.join(tokens)` (rules in the module docstring).

    Args:
      tokens: the formula's tokens ("1".."10", operators, parentheses; " " blanks allowed).
      allow_fractional_powers: evaluate a formula holding a power with a non-integer exponent the
        reference's way (Python floats) instead of refusing it.

    Returns:
      a `Fraction` (exact mode), or a float / complex for a fractional power with
      `allow_fractional_powers=True`.

    Raises:
      FractionalPowerError: a non-integer exponent and `allow_fractional_powers=False`.
      FormulaError: anything else that is not a valid, finite value.
    """
    tree = _parse(tokens)
    try:
        return _eval(tree, _EXACT)
    except FractionalPowerError:
        if not allow_fractional_powers:
            raise
    except (RecursionError, ZeroDivisionError, OverflowError) as exc:
        raise FormulaError(str(exc)) from exc
    try:
        return _eval(tree, _PYTHON)
    except (RecursionError, ArithmeticError, TypeError, ValueError) as exc:
        if isinstance(exc, FormulaError):
            raise
        raise FormulaError(str(exc)) from exc
