"""A small, safe evaluator for model-written arithmetic (docs/design.md, defect 4: never eval()).

Grammar: integers, + - * /, unary minus, parentheses. No `**`, no names, no floats in the
input. Every limit fails fast with None: overlong text, too many digits in a number, deep
nesting, division by zero, an intermediate value beyond MAX_ABS.
"""

from __future__ import annotations

import re

MAX_CHARS = 200
MAX_DIGITS = 9
MAX_DEPTH = 32
MAX_ABS = 1e12

_TOKEN = re.compile(r"\s*(?:(\d+)|(.))")


class _Reject(Exception):
    pass


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    for number, symbol in _TOKEN.findall(text):
        if number:
            if len(number) > MAX_DIGITS:
                raise _Reject
            tokens.append(number)
        elif symbol in "+-*/()":
            tokens.append(symbol)
        elif not symbol.isspace():
            raise _Reject
    return tokens


class _Parser:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.numbers: list[int] = []

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise _Reject
        self.pos += 1
        return token

    @staticmethod
    def _check(value: float) -> float:
        if abs(value) > MAX_ABS:
            raise _Reject
        return value

    def expression(self, depth: int) -> float:
        value = self.term(depth)
        while self._peek() in ("+", "-"):
            op = self._take()
            rhs = self.term(depth)
            value = self._check(value + rhs if op == "+" else value - rhs)
        return value

    def term(self, depth: int) -> float:
        value = self.factor(depth)
        while self._peek() in ("*", "/"):
            op = self._take()
            if self._peek() in ("*", "/"):  # '**' and '//' are not arithmetic we accept
                raise _Reject
            rhs = self.factor(depth)
            if op == "*":
                value = self._check(value * rhs)
            elif rhs == 0:
                raise _Reject
            else:
                value = self._check(value / rhs)
        return value

    def factor(self, depth: int) -> float:
        if depth > MAX_DEPTH:
            raise _Reject
        token = self._take()
        if token == "-":
            return -self.factor(depth + 1)
        if token == "(":
            value = self.expression(depth + 1)
            if self._take() != ")":
                raise _Reject
            return value
        if token.isdigit():
            self.numbers.append(int(token))
            return float(token)
        raise _Reject


def evaluate(text: str) -> tuple[float, list[int]] | None:
    """(value, integers used in order of appearance), or None for anything not acceptable."""
    if len(text) > MAX_CHARS:
        return None
    try:
        tokens = _tokenize(text)
        if not tokens:
            return None
        parser = _Parser(tokens)
        value = parser.expression(0)
        if parser.pos != len(tokens):
            return None
        return value, parser.numbers
    except (_Reject, RecursionError, OverflowError):
        return None
