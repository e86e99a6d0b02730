"""Metadata filters: the declared fields, the filter language, and its evaluation, both per
document (:func:`matches`) and over a whole retriever at once (:class:`MetadataColumns`).

An index declares its filterable fields and their types (``fields:`` in the configuration)::

    fields: {tenant: keyword, year: integer, score: float, published: datetime,
             open_access: boolean, tags: keywords}

A filter is a JSON object; its keys are ANDed. A key is a declared field with a condition, or
one of ``and`` / ``or`` (a list of filters) and ``not`` (one filter)::

    {"tenant": "acme"}                                  equality (shorthand of {"eq": "acme"})
    {"tags": {"in": ["oncology", "genetics"]}}          any of the values
    {"year": {"gte": 2015, "lt": 2020}}                 range: gt, gte, lt, lte (numbers, datetimes)
    {"doi": {"exists": true}}                           the document has a value (false: has none)
    {"or": [{"tenant": "acme"}, {"public": true}]}      and / or / not

A ``keywords`` field (a list of strings) matches ``eq`` when the list contains the value and
``in`` when it contains any of them. A ``datetime`` is an ISO 8601 string (a time without a
zone is UTC) and compares as an instant. ``not`` includes the documents that lack the field,
as Elasticsearch's ``must_not`` does. A document whose value has the wrong type for its field
is stored but has no value for that field (writes refuse it: :func:`check_metadata`).

Every part of a filter is checked against the declared fields before anything runs: an
unknown field, an operator that its type does not have, or a value of the wrong type is a
:class:`FilterError` (422 at the HTTP edge) naming the path of the problem, e.g.
``filter.and[1].year.gte``. A parsed filter is an immutable, hashable tree of
:class:`Condition` and :class:`Logic` nodes that the retrievers evaluate inside their search,
before their top-k, so a filtered search returns k documents whenever k documents match.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from serve_app.arrays import GrowingArray
from serve_app.errors import InputRejected

#: The types a field may be declared with.
FIELD_TYPES = ("keyword", "keywords", "integer", "float", "datetime", "boolean")
#: Names a field may not have (the logical operators of the language).
RESERVED = frozenset({"and", "or", "not"})
RANGE_OPS = ("gt", "gte", "lt", "lte")
_OPS_OF_TYPE = {
    "keyword": ("eq", "in", "exists"),
    "keywords": ("eq", "in", "exists"),
    "boolean": ("eq", "exists"),
    "integer": ("eq", "in", "exists", *RANGE_OPS),
    "float": ("eq", "in", "exists", *RANGE_OPS),
    "datetime": ("eq", "exists", *RANGE_OPS),
}


class FilterError(InputRejected, ValueError):
    """A filter (or a document's metadata) that the declared fields refuse; the message names the
    path of the problem. Answered 422 (``invalid_filter``)."""


@dataclass(frozen=True)
class FilterLimits:
    """How large a filter may be (``filters:`` in the configuration)."""

    max_conditions: int = 64
    max_depth: int = 8
    max_in_values: int = 1024


@dataclass(frozen=True)
class Condition:
    """``field op value`` on a field declared with type ``typ``; ``value`` is normalised: a tuple
    for ``in``, a float for numbers and datetimes (epoch seconds), a bool for ``exists``."""

    field: str
    op: str
    value: Any
    typ: str


@dataclass(frozen=True)
class Logic:
    """``and`` / ``or`` over ``children``; ``not`` over its single child."""

    op: str
    children: tuple["Node", ...]


Node = Union[Condition, Logic]


# --------------------------------------------------------------------------- fields


def parse_fields(spec: Optional[Mapping[str, Any]]) -> dict[str, str]:
    """The declared fields ``{name: type}``, checked (raises ``ValueError`` naming the problem)."""
    out: dict[str, str] = {}
    for name, typ in dict(spec or {}).items():
        if not isinstance(name, str) or not name or len(name) > 128:
            raise ValueError(f"fields: a field name must be a string of 1 to 128 characters, got {name!r}")
        if name in RESERVED:
            raise ValueError(f"fields: {name!r} is an operator of the filter language and cannot name a field")
        if typ not in FIELD_TYPES:
            raise ValueError(f"fields.{name}: unknown type {typ!r}; expected one of {', '.join(FIELD_TYPES)}")
        out[name] = typ
    return out


def _epoch(value: Any) -> Optional[float]:
    """An ISO 8601 string as epoch seconds (UTC when it names no zone); None if it is not one."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        t = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.timestamp()


def coerce(typ: str, value: Any) -> Any:
    """A metadata or filter value as stored for a field of type ``typ`` (for ``keywords``: one
    element), or None when it is not of that type."""
    if typ in ("keyword", "keywords"):
        return value if isinstance(value, str) else None
    if typ == "boolean":
        return value if isinstance(value, bool) else None
    if typ == "integer":
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else None
    if typ == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else None
    if typ == "datetime":
        return _epoch(value)
    raise ValueError(f"unknown field type {typ!r}")


_EXPECT = {
    "keyword": "a string",
    "keywords": "a string",
    "boolean": "true or false",
    "integer": "an integer",
    "float": "a finite number",
    "datetime": "an ISO 8601 date or time string",
}


def check_metadata(metadata: Mapping[str, Any], fields: Mapping[str, str], where: str = "metadata") -> None:
    """Refuse (``FilterError``) a document whose metadata gives a declared field a value of the
    wrong type; a field absent or null is fine (no value)."""
    for name, typ in fields.items():
        value = metadata.get(name)
        if value is None:
            continue
        if typ == "keywords":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise FilterError(f"{where}.{name}: field {name!r} is declared keywords: expected a list of strings")
        elif coerce(typ, value) is None:
            raise FilterError(f"{where}.{name}: field {name!r} is declared {typ}: expected {_EXPECT[typ]}, got {value!r}")


# --------------------------------------------------------------------------- parsing


class _Parser:
    def __init__(self, fields: Mapping[str, str], limits: FilterLimits) -> None:
        self.fields = fields
        self.limits = limits
        self.conditions = 0

    def node(self, obj: Any, path: str, depth: int) -> Node:
        if depth > self.limits.max_depth:
            raise FilterError(f"{path}: filters nest at most {self.limits.max_depth} levels deep")
        if not isinstance(obj, dict) or not obj:
            raise FilterError(f"{path}: a filter is a non-empty JSON object of fields and and/or/not")
        parts: list[Node] = []
        for key, value in obj.items():
            sub = f"{path}.{key}"
            if key in ("and", "or"):
                if not isinstance(value, list) or not value:
                    raise FilterError(f"{sub}: expected a non-empty list of filters")
                parts.append(Logic(key, tuple(self.node(v, f"{sub}[{i}]", depth + 1) for i, v in enumerate(value))))
            elif key == "not":
                parts.append(Logic("not", (self.node(value, sub, depth + 1),)))
            else:
                parts.extend(self.conditions_of(key, value, sub))
        return parts[0] if len(parts) == 1 else Logic("and", tuple(parts))

    def conditions_of(self, name: str, spec: Any, path: str) -> list[Condition]:
        typ = self.fields.get(name)
        if typ is None:
            known = ", ".join(sorted(self.fields)) or "none"
            raise FilterError(f"{path}: unknown field {name!r}; the filterable fields are: {known}")
        ops = spec if isinstance(spec, dict) else {"eq": spec}
        if not ops:
            raise FilterError(f"{path}: expected a value or an object of operators ({', '.join(_OPS_OF_TYPE[typ])})")
        out = []
        for op, value in ops.items():
            if op not in _OPS_OF_TYPE[typ]:
                raise FilterError(f"{path}.{op}: field {name!r} ({typ}) has the operators {', '.join(_OPS_OF_TYPE[typ])}, not {op!r}")
            self.conditions += 1
            if self.conditions > self.limits.max_conditions:
                raise FilterError(f"{path}: a filter has at most {self.limits.max_conditions} conditions")
            out.append(Condition(name, op, self.value(typ, op, value, f"{path}.{op}", name), typ))
        return out

    def value(self, typ: str, op: str, value: Any, path: str, name: str) -> Any:
        if op == "exists":
            if not isinstance(value, bool):
                raise FilterError(f"{path}: expected true or false")
            return value
        if op == "in":
            if not isinstance(value, list) or not value:
                raise FilterError(f"{path}: expected a non-empty list")
            if len(value) > self.limits.max_in_values:
                raise FilterError(f"{path}: at most {self.limits.max_in_values} values")
            return tuple(sorted({self.scalar(typ, v, f"{path}[{i}]", name) for i, v in enumerate(value)}, key=repr))
        if op in RANGE_OPS:
            # an integer field's range may have a fractional bound (year < 2019.5 is meaningful)
            return self.scalar("float" if typ == "integer" else typ, value, path, name)
        return self.scalar(typ, value, path, name)

    def scalar(self, typ: str, value: Any, path: str, name: str) -> Any:
        out = coerce(typ, value)
        if out is None:
            raise FilterError(f"{path}: field {name!r} is {self.fields[name]}: expected {_EXPECT[typ]}, got {value!r}")
        return out


def parse_filter(obj: Any, fields: Mapping[str, str], limits: FilterLimits = FilterLimits(), path: str = "filter") -> Node:
    """The filter ``obj`` (parsed JSON) checked against the declared ``fields``.

    >>> parse_filter({"tenant": "acme", "year": {"gte": 2015}}, {"tenant": "keyword", "year": "integer"})
    Logic(op='and', children=(Condition(field='tenant', op='eq', value='acme', typ='keyword'), Condition(field='year', op='gte', value=2015.0, typ='integer')))
    """
    return _Parser(fields, limits).node(obj, path, 1)


def all_of(*nodes: Optional[Node]) -> Optional[Node]:
    """The conjunction of the given filters (None ones left out; None when none is left)."""
    parts = [n for n in nodes if n is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else Logic("and", tuple(parts))


# --------------------------------------------------------------------------- evaluation


def _condition_holds(c: Condition, raw: Any) -> bool:
    typ = c.typ
    if typ == "keywords":
        values = [v for v in raw if isinstance(v, str)] if isinstance(raw, list) else []
        if c.op == "exists":
            return bool(values) == c.value
        if c.op == "eq":
            return c.value in values
        return any(v in c.value for v in values)  # in
    value = None if raw is None else coerce(typ, raw)
    if c.op == "exists":
        return (value is not None) == c.value
    if value is None:
        return False
    if c.op == "eq":
        return bool(value == c.value)
    if c.op == "in":
        return value in c.value
    return {"gt": value > c.value, "gte": value >= c.value, "lt": value < c.value, "lte": value <= c.value}[c.op]


def matches(node: Optional[Node], metadata: Mapping[str, Any]) -> bool:
    """Whether one document's ``metadata`` passes the filter (None: every document does).
    The reference of :meth:`MetadataColumns.mask`, and the check of single-document routes."""
    if node is None:
        return True
    if isinstance(node, Logic):
        if node.op == "and":
            return all(matches(c, metadata) for c in node.children)
        if node.op == "or":
            return any(matches(c, metadata) for c in node.children)
        return not matches(node.children[0], metadata)
    return _condition_holds(node, metadata.get(node.field))


class MetadataColumns:
    """The declared fields of a retriever's documents, one column per field, in the retriever's
    document order (position ``i`` is its ``doc_ids[i]``); appended to as live writes add
    documents. :meth:`mask` evaluates a filter for every document at once (numpy), which is what
    the retrievers apply inside their search.

    Keyword fields are dictionary-coded (``int32`` codes, -1 for no value); numbers and datetimes
    are ``float64`` (NaN for no value; integers are exact up to 2**53); booleans ``int8`` (-1 for
    no value); a ``keywords`` field keeps, per value, the positions that contain it.

    >>> cols = MetadataColumns({"tenant": "keyword"}, [{"tenant": "a"}, {"tenant": "b"}, {}])
    >>> cols.mask(parse_filter({"tenant": "a"}, cols.fields)).tolist()
    [True, False, False]
    """

    def __init__(self, fields: Mapping[str, str], metadata: Iterable[Mapping[str, Any]] = ()) -> None:
        self.fields = dict(fields)
        self.n = 0
        self._codes: dict[str, dict[str, int]] = {}
        self._cols: dict[str, GrowingArray] = {}
        self._lists: dict[str, dict[str, list[int]]] = {}
        for name, typ in self.fields.items():
            if typ == "keyword":
                self._codes[name] = {}
                self._cols[name] = GrowingArray(np.zeros(0, dtype=np.int32))
            elif typ == "keywords":
                self._lists[name] = {}
                self._cols[name] = GrowingArray(np.zeros(0, dtype=np.bool_))  # has any value
            elif typ == "boolean":
                self._cols[name] = GrowingArray(np.zeros(0, dtype=np.int8))
            else:
                self._cols[name] = GrowingArray(np.zeros(0, dtype=np.float64))
        self.append(list(metadata))

    def __len__(self) -> int:
        return self.n

    def append(self, metadata: Sequence[Mapping[str, Any]]) -> None:
        """Add the next documents' metadata (positions ``len(self)`` onwards)."""
        if not metadata:
            return
        first = self.n
        for name, typ in self.fields.items():
            raw = [m.get(name) if m else None for m in metadata]
            if typ == "keyword":
                codes = self._codes[name]
                self._cols[name].extend([codes.setdefault(v, len(codes)) if isinstance(v, str) else -1 for v in raw])
            elif typ == "keywords":
                lists = self._lists[name]
                has = []
                for i, v in enumerate(raw):
                    values = {x for x in v if isinstance(x, str)} if isinstance(v, list) else set()
                    for x in values:
                        lists.setdefault(x, []).append(first + i)
                    has.append(bool(values))
                self._cols[name].extend(has)
            elif typ == "boolean":
                self._cols[name].extend([(1 if v else 0) if isinstance(v, bool) else -1 for v in raw])
            else:
                values = [coerce(typ, v) if v is not None else None for v in raw]
                self._cols[name].extend([np.nan if v is None else v for v in values])
        self.n = first + len(metadata)

    def take(self, positions: Sequence[int]) -> "MetadataColumns":
        """The columns of the documents at ``positions``, renumbered from 0 (a shard's)."""
        pos = np.asarray(positions, dtype=np.int64)
        out = MetadataColumns(self.fields)
        for name, typ in self.fields.items():
            out._cols[name].extend(self._cols[name].view()[pos])
            if typ == "keyword":
                out._codes[name] = dict(self._codes[name])
            elif typ == "keywords":
                new_of = {int(old): new for new, old in enumerate(pos.tolist())}
                lists = {v: [new_of[p] for p in ps if p in new_of] for v, ps in self._lists[name].items()}
                out._lists[name] = {v: sorted(ps) for v, ps in lists.items() if ps}
        out.n = int(pos.size)
        return out

    def mask(self, node: Node, n: Optional[int] = None) -> np.ndarray:
        """The documents (positions ``0 .. n-1``; default all) that pass ``node``, as booleans."""
        n = self.n if n is None else n
        if isinstance(node, Logic):
            if node.op == "not":
                return ~self.mask(node.children[0], n)
            out = self.mask(node.children[0], n)
            for child in node.children[1:]:
                out = (out & self.mask(child, n)) if node.op == "and" else (out | self.mask(child, n))
            return out
        return self._condition(node, n)

    def _condition(self, c: Condition, n: int) -> np.ndarray:
        typ = c.typ
        if self.fields.get(c.field) != typ:
            raise FilterError(f"filter: field {c.field!r} ({typ}) is not declared so by this index (its fields: {self.fields})")
        col = self._cols[c.field].view()[:n]
        if typ == "keywords":
            if c.op == "exists":
                return col.copy() if c.value else ~col
            out = np.zeros(n, dtype=bool)
            for v in (c.value,) if c.op == "eq" else c.value:
                pos = self._lists[c.field].get(v)
                if pos:
                    p = np.asarray(pos, dtype=np.int64)
                    out[p[p < n]] = True
            return out
        if typ == "keyword":
            if c.op == "exists":
                return (col >= 0) if c.value else (col < 0)
            codes = self._codes[c.field]
            wanted = [codes[v] for v in ((c.value,) if c.op == "eq" else c.value) if v in codes]
            return np.isin(col, np.asarray(wanted, dtype=np.int32)) if wanted else np.zeros(n, dtype=bool)
        if typ == "boolean":
            if c.op == "exists":
                return (col >= 0) if c.value else (col < 0)
            return col == (1 if c.value else 0)
        if c.op == "exists":
            return ~np.isnan(col) if c.value else np.isnan(col)
        with np.errstate(invalid="ignore"):
            if c.op == "eq":
                return col == c.value
            if c.op == "in":
                return np.isin(col, np.asarray(c.value, dtype=np.float64))
            return {"gt": np.greater, "gte": np.greater_equal, "lt": np.less, "lte": np.less_equal}[c.op](col, c.value)


__all__ = [
    "FIELD_TYPES",
    "Condition",
    "FilterError",
    "FilterLimits",
    "Logic",
    "MetadataColumns",
    "Node",
    "all_of",
    "check_metadata",
    "matches",
    "parse_fields",
    "parse_filter",
]
