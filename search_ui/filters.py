"""The filter language of ``--where`` (CLI), ``where`` (HTTP API, gradio_client) and the page's filter box.

A filter is parsed and checked here, against the table's columns, before the query engine sees it;
what reaches LanceDB is the canonical SQL :func:`parse_filter` re-emits from the parsed tree (every
column backquoted, every literal re-quoted), never the caller's text. A filter is refused with one
:class:`~indexer.errors.UserError` sentence naming what was refused.

The language (keywords in any case)::

    filter     := or
    or         := and ( OR and )*
    and        := not ( AND not )*
    not        := NOT not | predicate
    predicate  := value [ compare value
                        | [NOT] IN ( literal, ... )
                        | [NOT] LIKE 'pattern'
                        | [NOT] BETWEEN value AND value
                        | IS [NOT] NULL | IS [NOT] TRUE | IS [NOT] FALSE ]
    value      := term ( (+ | -) term )*          (numbers only)
    term       := unary ( (* | /) unary )*        (numbers only)
    unary      := - unary | column | literal | ( or )
    compare    := = | != | <> | < | <= | > | >=
    column     := name | `any name` | "any name"  (a column of the table; `` and "" escape the quote)
    literal    := 'string' ('' escapes a quote) | number (12, -3.5, 1e-3) | TRUE | FALSE | NULL

``%`` and ``_`` are LIKE's wildcards. A boolean column is a condition by itself (``blue_circles AND
split = 'test'``). Types are checked: a number column is compared with numbers, a string column with
strings (a date or timestamp column with strings too), LIKE applies to strings.

Nothing else: no function calls (``repeat(id, 100000000)``, ``regexp_match``, ``cast``), no
subqueries, ``CASE``, ``;`` or comments. So a filter's cost is a scan of the table's small columns
with an expression of at most :data:`MAX_NODES` operations (an ``IN`` list is one hash lookup), and
it is bounded further (nesting matters twice: LanceDB's SQL parser takes time exponential in the
parenthesis depth, ~45 ms at 26 levels and minutes at 40, so the canonical SQL parenthesises only
where precedence needs it and its depth is bounded too): :data:`MAX_FILTER_CHARS` characters, nesting :data:`MAX_DEPTH` deep,
:data:`MAX_IN_ITEMS` values in one ``IN``, strings of :data:`MAX_STRING_CHARS` characters, LIKE
patterns of :data:`MAX_LIKE_CHARS` with at most :data:`MAX_LIKE_WILDCARDS` wildcards; and its
evaluation stops after :data:`FILTER_SECONDS` (:func:`matching_row_ids`).
"""

from __future__ import annotations

import difflib
import math
import re
import time
from dataclasses import dataclass

import pyarrow as pa

from indexer import schema as S
from indexer.errors import UserError

#: Bounds on one filter (each refusal says which was passed).
MAX_FILTER_CHARS = 20_000
MAX_DEPTH = 16
MAX_NODES = 256
MAX_IN_ITEMS = 1000
MAX_STRING_CHARS = 1000
MAX_LIKE_CHARS = 200
MAX_LIKE_WILDCARDS = 20
#: The filter language in one line, for --help texts and the API schema.
FILTER_HELP = ("a filter over the table's columns: comparisons (= != < <= > >=), AND, OR, NOT, IN (...), LIKE, "
               "BETWEEN x AND y, IS [NOT] NULL, + - * /; strings in 'single quotes', odd column names in "
               "`backquotes`; no functions, e.g. \"split = 'test' AND loss > 1\" (README, Filters)")
#: Evaluating one filter over the table stops after this many seconds (one refusal sentence).
FILTER_SECONDS = 20.0

_KEYWORDS = {"AND", "OR", "NOT", "IN", "LIKE", "IS", "NULL", "BETWEEN", "TRUE", "FALSE"}
#: Words of SQL that are not in the language, named in the refusal when used as a column name.
_SQL_WORDS = {"SELECT", "FROM", "WHERE", "UNION", "CASE", "WHEN", "THEN", "ELSE", "END", "CAST", "EXISTS",
              "INTERVAL", "ILIKE", "SIMILAR", "REGEXP", "RLIKE", "ESCAPE", "DISTINCT", "ANY", "ALL", "ARRAY",
              "ORDER", "LIMIT", "GROUP", "JOIN", "WITH", "VALUES", "DROP", "DELETE", "INSERT", "UPDATE"}

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<bquote>`(?:[^`]|``)*`)
  | (?P<dquote>"(?:[^"]|"")*")
  | (?P<string>'(?:[^']|'')*')
  | (?P<op><=|>=|<>|!=|=|<|>|\(|\)|,|\+|-|\*|/)
""", re.VERBOSE)


@dataclass(frozen=True)
class _Tok:
    kind: str  # number, name, column (quoted name), string, op, end
    text: str  # the value (unquoted for strings and quoted names)
    pos: int


@dataclass(frozen=True)
class Filter:
    """A checked filter: ``text`` as given, ``sql`` the canonical SQL sent to LanceDB, ``columns``
    the columns it reads."""

    text: str
    sql: str
    columns: tuple[str, ...]

    def __str__(self) -> str:
        return self.sql


def _refuse(text: str, why: str) -> UserError:
    shown = text if len(text) <= 120 else text[:117] + "..."
    return UserError(f"--where {shown!r} is refused: {why}; a filter compares columns with values, "
                     "like \"split = 'test' AND loss > 1\" (README, Filters).")


def _tokens(text: str) -> list[_Tok]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            ch = text[pos]
            what = {";": "a `;` (a filter is one expression, not statements)",
                    "'": "a string without its closing quote", "`": "a column name without its closing `",
                    '"': "a column name without its closing \""}.get(ch, f"the character {ch!r}")
            raise _refuse(text, f"{what} at position {pos + 1} is not part of the filter language")
        kind, tok = m.lastgroup, m.group()
        if kind == "bquote" or kind == "dquote":
            q = tok[0]
            out.append(_Tok("column", tok[1:-1].replace(q + q, q), pos))
        elif kind == "string":
            out.append(_Tok("string", tok[1:-1].replace("''", "'"), pos))
        elif kind != "space":
            out.append(_Tok(kind, tok, pos))
        pos = m.end()
    out.append(_Tok("end", "", len(text)))
    return out


def _column_kind(field: pa.Field) -> str | None:
    t = field.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "num"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_temporal(t):
        return "time"
    return None  # lists, vectors, structs, binary: not filterable


_KIND_WORDS = {"str": "a string", "num": "a number", "bool": "a boolean", "time": "a date or time",
               "null": "NULL"}


def _compatible(a: str, b: str) -> bool:
    return a == b or "null" in (a, b) or {a, b} == {"time", "str"}


#: Precedences, loosest first: what the canonical SQL parenthesises (only a looser operand).
_OR, _AND, _NOT, _PRED, _ADD, _MUL, _NEG, _ATOM = range(1, 9)


def _wrap(e: tuple[str, str, int], prec: int) -> str:
    """The SQL of expression ``e`` (sql, kind, precedence) as an operand of precedence ``prec``."""
    return e[0] if e[2] >= prec else f"({e[0]})"


def _paren_depth(sql: str) -> int:
    """The deepest parenthesis nesting of ``sql`` outside quotes."""
    depth = most = 0
    quote = None
    for ch in sql:
        if quote:
            quote = None if ch == quote else quote  # a doubled quote closes and reopens: same depth
        elif ch in "'`":
            quote = ch
        elif ch == "(":
            depth += 1
            most = max(most, depth)
        elif ch == ")":
            depth -= 1
    return most


def _sql_string(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


class _Parser:
    """Recursive descent over the tokens; each method returns (canonical SQL, kind)."""

    def __init__(self, text: str, schema: pa.Schema):
        self.text, self.toks, self.i = text, _tokens(text), 0
        self.fields = {f.name: f for f in schema}
        self.depth = self.nodes = 0
        self.columns: list[str] = []

    # ---- helpers
    def refuse(self, why: str) -> UserError:
        return _refuse(self.text, why)

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def word(self, *words: str) -> bool:
        t = self.tok
        return t.kind == "name" and t.text.upper() in words

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def expect(self, kind: str, text: str | None = None, what: str = "") -> _Tok:
        t = self.tok
        ok = t.kind == kind and (text is None or t.text.upper() == text)
        if not ok:
            raise self.refuse(f"expected {what or text or kind} at {self.where(t)}")
        return self.take()

    def where(self, t: _Tok) -> str:
        return "the end" if t.kind == "end" else f"position {t.pos + 1} ({self.text[t.pos:t.pos + 20]!r})"

    def node(self) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.refuse(f"it has more than {MAX_NODES} operations and values (not counting IN lists)")

    def nest(self, step: int) -> None:
        self.depth += step
        if self.depth > MAX_DEPTH:
            raise self.refuse(f"it nests more than {MAX_DEPTH} levels deep")

    def need(self, kind: str, want: str, sql: str, role: str) -> None:
        if kind != want and kind != "null":
            raise self.refuse(f"{role} needs {_KIND_WORDS[want]}, but {sql} is {_KIND_WORDS.get(kind, kind)}")

    # ---- grammar: each rule returns (canonical SQL, kind, precedence), parenthesised only where needed
    def parse(self) -> str:
        if self.tok.kind == "end":
            raise self.refuse("it is empty")
        sql, kind, _ = self.or_()
        if self.tok.kind != "end":
            raise self.refuse(f"unexpected {self.where(self.tok)} after a complete condition")
        if kind == "num" or kind == "str" or kind == "time":
            raise self.refuse(f"{sql} is {_KIND_WORDS[kind]}, not a condition (compare it: loss > 1)")
        return sql

    def _logic(self, op: str, prec: int, sub):
        first = sub()
        parts = [first]
        while self.word(op):
            self.take()
            self.node()
            parts.append(sub())
        if len(parts) == 1:
            return first
        for s, k, _ in parts:
            self.need(k, "bool", s, op)
        return f" {op} ".join(_wrap(e, prec) for e in parts), "bool", prec

    def or_(self):
        return self._logic("OR", _OR, self.and_)

    def and_(self):
        return self._logic("AND", _AND, self.not_)

    def not_(self):
        if self.word("NOT"):
            self.take()
            self.node()
            self.nest(1)
            e = self.not_()
            self.nest(-1)
            self.need(e[1], "bool", e[0], "NOT")
            return f"NOT {_wrap(e, _NOT)}", "bool", _NOT
        return self.predicate()

    def predicate(self):
        left = self.value()
        lsql, kind = _wrap(left, _ADD), left[1]
        t = self.tok
        if t.kind == "op" and t.text in ("=", "!=", "<>", "<", "<=", ">", ">="):
            self.take()
            self.node()
            right = self.value()
            if not _compatible(kind, right[1]):
                raise self.refuse(f"it compares {left[0]} ({_KIND_WORDS[kind]}) with {right[0]} "
                                  f"({_KIND_WORDS[right[1]]})")
            op = "!=" if t.text == "<>" else t.text
            return f"{lsql} {op} {_wrap(right, _ADD)}", "bool", _PRED
        if self.word("IS"):
            self.take()
            self.node()
            neg = ""
            if self.word("NOT"):
                self.take()
                neg = " NOT"
            what = self.expect("name", what="NULL, TRUE or FALSE").text.upper()
            if what not in ("NULL", "TRUE", "FALSE"):
                raise self.refuse(f"IS{neg} must be followed by NULL, TRUE or FALSE, not {what}")
            if what != "NULL":
                self.need(kind, "bool", left[0], f"IS{neg} {what}")
            return f"{lsql} IS{neg} {what}", "bool", _PRED
        neg = ""
        if self.word("NOT") and self.toks[self.i + 1].kind == "name" and \
                self.toks[self.i + 1].text.upper() in ("IN", "LIKE", "BETWEEN"):
            self.take()
            neg = "NOT "
        if self.word("IN"):
            self.take()
            self.node()
            return self.in_list(left, lsql, neg)
        if self.word("LIKE"):
            self.take()
            self.node()
            self.need(kind, "str", left[0], "LIKE")
            t = self.expect("string", what="a quoted pattern after LIKE, like 'cat%'")
            if len(t.text) > MAX_LIKE_CHARS:
                raise self.refuse(f"its LIKE pattern is {len(t.text)} characters long (at most {MAX_LIKE_CHARS})")
            if sum(t.text.count(c) for c in "%_") > MAX_LIKE_WILDCARDS:
                raise self.refuse(f"its LIKE pattern has more than {MAX_LIKE_WILDCARDS} wildcards (% and _)")
            return f"{lsql} {neg}LIKE {_sql_string(t.text)}", "bool", _PRED
        if self.word("BETWEEN"):
            self.take()
            self.node()
            lo = self.value()
            self.expect("name", "AND", "AND between the two bounds of BETWEEN")
            hi = self.value()
            for s, k, _ in (lo, hi):
                if not _compatible(kind, k):
                    raise self.refuse(f"BETWEEN compares {left[0]} ({_KIND_WORDS[kind]}) with {s} ({_KIND_WORDS[k]})")
            return f"{lsql} {neg}BETWEEN {_wrap(lo, _ADD)} AND {_wrap(hi, _ADD)}", "bool", _PRED
        if neg:
            raise self.refuse(f"NOT must be followed by IN, LIKE or BETWEEN at {self.where(self.tok)}")
        return left

    def in_list(self, left, lsql: str, neg: str):
        self.expect("op", "(", "( after IN")
        items = []
        while True:
            if len(items) >= MAX_IN_ITEMS:
                raise self.refuse(f"its IN list has more than {MAX_IN_ITEMS} values")
            sql, k = self.literal(in_list=True)
            if not _compatible(left[1], k):
                raise self.refuse(f"IN compares {left[0]} ({_KIND_WORDS[left[1]]}) with {sql} ({_KIND_WORDS[k]})")
            items.append(sql)
            if self.tok.kind == "op" and self.tok.text == ",":
                self.take()
                continue
            self.expect("op", ")", ", or ) in the IN list")
            return f"{lsql} {neg}IN ({', '.join(items)})", "bool", _PRED

    def _arith(self, ops: tuple[str, ...], prec: int, sub):
        e = sub()
        while self.tok.kind == "op" and self.tok.text in ops:
            op = self.take().text
            self.node()
            right = sub()
            self.need(e[1], "num", e[0], f"`{op}`")
            self.need(right[1], "num", right[0], f"`{op}`")
            # left-associative: a chain a + b + c needs no parentheses; a right operand of the same
            # precedence does (a - (b - c))
            e = f"{_wrap(e, prec)} {op} {_wrap(right, prec + 1)}", "num", prec
        return e

    def value(self):
        return self._arith(("+", "-"), _ADD, self.term)

    def term(self):
        return self._arith(("*", "/"), _MUL, self.unary)

    def unary(self):
        t = self.tok
        if t.kind == "op" and t.text == "-":
            self.take()
            self.node()
            if self.tok.kind == "number":
                sql, kind = self.literal()
                return "-" + sql, kind, _ATOM
            self.nest(1)
            e = self.unary()
            self.nest(-1)
            self.need(e[1], "num", e[0], "`-`")
            return f"- {_wrap(e, _NEG)}", "num", _NEG  # the space: "--" would start a comment
        if t.kind == "op" and t.text == "(":
            self.take()
            self.nest(1)
            e = self.or_()
            self.expect("op", ")", "a closing )")
            self.nest(-1)
            return e
        if t.kind == "column" or (t.kind == "name" and t.text.upper() not in ("TRUE", "FALSE", "NULL")):
            return (*self.column(), _ATOM)
        return (*self.literal(), _ATOM)

    def column(self):
        t = self.take()
        self.node()
        nxt = self.tok
        if t.kind == "name" and nxt.kind == "op" and nxt.text == "(":
            raise self.refuse(f"it calls the function {t.text}(...), and a filter calls no functions")
        if t.kind == "name" and t.text.upper() in _KEYWORDS:
            raise self.refuse(f"{t.text.upper()} at {self.where(t)} has no value before it")
        field = self.fields.get(t.text)
        if field is None:
            if t.kind == "name" and t.text.upper() in _SQL_WORDS:
                raise self.refuse(f"{t.text.upper()} is SQL outside the filter language (no subqueries, CASE, "
                                  "casts or other statements)")
            close = difflib.get_close_matches(t.text, list(self.fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (a string takes single quotes: {_sql_string(t.text)})"
            cols = [n for n, f in self.fields.items() if _column_kind(f)]
            more = f" and {len(cols) - 20} more" if len(cols) > 20 else ""
            raise self.refuse(f"the table has no column {t.text!r}{hint}; its columns are {', '.join(cols[:20])}{more}")
        kind = _column_kind(field)
        if kind is None:
            why = "vectors" if field.name == S.EMBEDDING else f"values of type {field.type}"
            raise self.refuse(f"the column {field.name} holds {why}, which a filter cannot compare")
        self.columns.append(field.name)
        return "`" + field.name.replace("`", "``") + "`", kind

    def literal(self, in_list: bool = False):
        t = self.take()
        if not in_list:
            self.node()
        if t.kind == "string":
            if len(t.text) > MAX_STRING_CHARS:
                raise self.refuse(f"a string in it is {len(t.text)} characters long (at most {MAX_STRING_CHARS})")
            return _sql_string(t.text), "str"
        if t.kind == "number":
            return self.number(t), "num"
        if in_list and t.kind == "op" and t.text == "-" and self.tok.kind == "number":
            return "-" + self.number(self.take()), "num"
        if t.kind == "name" and t.text.upper() in ("TRUE", "FALSE"):
            return t.text.upper(), "bool"
        if t.kind == "name" and t.text.upper() == "NULL":
            return "NULL", "null"
        want = "a value (a 'string', a number, TRUE, FALSE or NULL)" if in_list else "a column or a value"
        raise self.refuse(f"expected {want} at {self.where(t)}")

    def number(self, t: _Tok) -> str:
        if len(t.text) > 40:
            raise self.refuse(f"the number {t.text[:20]}... is {len(t.text)} digits long")
        if re.fullmatch(r"\d+", t.text):
            if int(t.text) >= 2**63:
                raise self.refuse(f"the number {t.text} is larger than a 64-bit integer")
            return str(int(t.text))
        x = float(t.text)
        if not math.isfinite(x):
            raise self.refuse(f"the number {t.text} is not finite")
        return repr(x)


def parse_filter(text: str | Filter | None, schema: pa.Schema) -> Filter | None:
    """``text`` checked against ``schema`` (the table's Arrow schema) -> a :class:`Filter` whose
    ``sql`` is safe to hand LanceDB; None for a blank filter. Refused: a UserError sentence."""
    if isinstance(text, Filter):
        return text
    if text is None:
        return None
    if not isinstance(text, str):
        raise UserError(f"--where must be a string, not {type(text).__name__}; write one like \"split = 'test'\".")
    if not text.strip():
        return None
    if len(text) > MAX_FILTER_CHARS:
        raise _refuse(text, f"it is {len(text):,} characters long (at most {MAX_FILTER_CHARS:,})")
    if "\x00" in text:
        raise _refuse(text, "it holds a NUL character")
    p = _Parser(text, schema)
    sql = p.parse()
    if _paren_depth(sql) > MAX_DEPTH:  # LanceDB's SQL parser takes exponential time in nesting
        raise _refuse(text, f"it nests more than {MAX_DEPTH} levels deep")
    return Filter(text=text, sql=sql, columns=tuple(dict.fromkeys(p.columns)))


def matching_row_ids(dataset, flt: Filter, seconds: float | None = None) -> pa.Array:
    """Lance row ids (uint64) of the rows of ``dataset`` (a ``lance.LanceDataset``) matching ``flt``,
    scanned batch by batch so that the scan stops, refused in one sentence, after ``seconds``
    (default :data:`FILTER_SECONDS`)."""
    limit = FILTER_SECONDS if seconds is None else float(seconds)
    t0 = time.monotonic()
    parts = []
    scanner = dataset.scanner(columns=[], filter=flt.sql, with_row_id=True)
    for batch in scanner.to_batches():
        parts.append(batch.column("_rowid"))
        if time.monotonic() - t0 > limit:
            raise UserError(f"--where {flt.text!r} took more than {limit:g} s to evaluate over "
                            f"{dataset.count_rows():,} rows and was stopped; write a simpler filter.")
    return pa.concat_arrays(parts) if parts else pa.array([], pa.uint64())
