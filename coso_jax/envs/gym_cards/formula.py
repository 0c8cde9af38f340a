"""Safe, exact evaluation of the points games' formulas.

The reference joined the formula tokens into a string and called Python's `eval`, comparing the
float result with the target. We keep Python's expression grammar over the same characters
(digits, + - * / ( ) and spaces; adjacent number tokens concatenate into one number as in the
joined string; `**` and `//` mean what Python says, unary signs allowed) but evaluate with exact
fractions, so 8 / (3 - 8 / 3) equals 24 (Python floats give 23.999999999999986), and refuse
absurd powers instead of computing them. Anything that is not a number, or that raises, is a
failed formula.
"""
from __future__ import annotations

import ast
from fractions import Fraction
from typing import Sequence

__all__ = ["evaluate", "FormulaError"]

_MAX_EXPONENT = 64
_MAX_BITS = 4096


class FormulaError(ValueError):
    """The formula is not a valid arithmetic expression over the allowed tokens."""


def _eval(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval(node.operand)
        return value if isinstance(node.op, ast.UAdd) else -value
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left), _eval(node.right)
        op = node.op
        if isinstance(op, ast.Add):
            return left + right
        if isinstance(op, ast.Sub):
            return left - right
        if isinstance(op, ast.Mult):
            return left * right
        if isinstance(op, ast.Div):
            if right == 0:
                raise FormulaError("division by zero")
            return left / right
        if isinstance(op, ast.FloorDiv):
            if right == 0:
                raise FormulaError("division by zero")
            return Fraction(left // right)
        if isinstance(op, ast.Pow):
            if right.denominator != 1:
                raise FormulaError("fractional exponent")
            exp = int(right)
            if abs(exp) > _MAX_EXPONENT:
                raise FormulaError(f"exponent {exp} too large")
            if left == 0 and exp < 0:
                raise FormulaError("zero to a negative power")
            bits = max(abs(left.numerator), left.denominator).bit_length()
            if bits * abs(exp) > _MAX_BITS:
                raise FormulaError("power too large")
            return left ** exp
    raise FormulaError(f"unsupported expression element {type(node).__name__}")


def evaluate(tokens: Sequence[str]) -> Fraction:
    """Exact value of the formula `''.join(tokens)`; raises FormulaError when it is not valid."""
    text = "".join(tokens)
    if not text.strip():
        raise FormulaError("empty formula")
    if any(ch not in "0123456789+-*/() " for ch in text):
        raise FormulaError(f"formula has characters outside digits and + - * / ( ): {text!r}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise FormulaError(f"not an expression: {text!r}") from exc
    try:
        return _eval(tree)
    except (RecursionError, ZeroDivisionError, OverflowError) as exc:
        raise FormulaError(str(exc)) from exc
