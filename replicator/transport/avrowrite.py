"""Avro binary encoding compiled from one schema: the bytes fastavro's `schemaless_writer`
writes, in about a third of its time for the change-event envelope.

fastavro walks the schema for every datum (about 0.3 µs per field, and a scan of the union's
branches for every value), which made it the capture's largest single cost per change. Here
the schema is turned once into nested closures, one per schema node, that append to a
`bytearray`.

Only what the datums of `transport.avro` need is compiled: records, maps, arrays, unions,
null, boolean, int, long, double, string and bytes. A union value is given in fastavro's tuple
notation (`(branch name, value)`), or as `None` for a `null` branch, or as a `str` or `dict`
when exactly one branch takes that Python type. Anything else raises `Unsupported`, and the
caller writes that datum with fastavro instead, so the bytes never depend on which writer ran
(`tests/unit/test_avrowrite.py` checks they are equal).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Unsupported", "Writer", "compile_writer", "write_long", "write_string"]

Writer = Callable[[bytearray, Any], None]

_LONG_MIN = -(1 << 63)
_LONG_MAX = (1 << 63) - 1
_INT_MIN = -(1 << 31)
_INT_MAX = (1 << 31) - 1
_DOUBLE = struct.Struct("<d")


class Unsupported(Exception):
    """This writer does not take the datum; write it with fastavro."""


#: Any 14 bits as the two varint bytes that hold them when more bytes follow.
_FOURTEEN = tuple(bytes([(c & 0x7F) | 0x80, (c >> 7) | 0x80]) for c in range(1 << 14))


def write_long(out: bytearray, n: Any) -> None:
    if type(n) is not int:
        raise Unsupported(f"a long must be an int, not {type(n).__name__}")
    if -64 <= n < 64:
        out.append((n << 1) ^ (n >> 63))  # zigzag: 0..127, one byte
        return
    if n < _LONG_MIN or n > _LONG_MAX:
        raise Unsupported("a long out of range")
    z = (n << 1) ^ (n >> 63)
    while z > 0x3FFF:  # two bytes at a time while more follow
        out += _FOURTEEN[z & 0x3FFF]
        z >>= 14
    if z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)


def _int(out: bytearray, n: Any) -> None:
    if type(n) is int and (n < _INT_MIN or n > _INT_MAX):
        raise Unsupported("an int out of range")
    write_long(out, n)


def write_string(out: bytearray, value: Any) -> None:
    if type(value) is not str:
        raise Unsupported(f"a string must be a str, not {type(value).__name__}")
    data = value.encode()
    write_long(out, len(data))
    out += data


def _bytes(out: bytearray, value: Any) -> None:
    if type(value) is not bytes:
        raise Unsupported(f"bytes must be bytes, not {type(value).__name__}")
    write_long(out, len(value))
    out += value


def _boolean(out: bytearray, value: Any) -> None:
    if type(value) is not bool:
        raise Unsupported(f"a boolean must be a bool, not {type(value).__name__}")
    out.append(1 if value else 0)


def _double(out: bytearray, value: Any) -> None:
    if type(value) is not float:
        raise Unsupported(f"a double must be a float, not {type(value).__name__}")
    out += _DOUBLE.pack(value)


def _null(out: bytearray, value: Any) -> None:
    if value is not None:
        raise Unsupported("a null must be None")


_PRIMITIVES: dict[str, Writer] = {
    "null": _null, "boolean": _boolean, "int": _int, "long": write_long, "double": _double,
    "string": write_string, "bytes": _bytes,
}
# The Python type a plain (not tuple-noted) union value may have, by branch type.
_PLAIN: dict[str, type] = {"string": str, "map": dict}


def compile_writer(schema: Mapping[str, Any] | list[Any] | str, *, namespace: str = ""
                   ) -> Writer:
    """The writer of *schema* (the JSON form, as `json.load` gives it), whose names are
    relative to *namespace*."""
    named: dict[str, Writer] = {}
    return _compile(schema, named, namespace)


def _full_name(schema: Mapping[str, Any], namespace: str) -> str:
    name = str(schema["name"])
    space = schema.get("namespace", namespace)
    return name if "." in name or not space else f"{space}.{name}"


def _compile(schema: Any, named: dict[str, Writer], namespace: str) -> Writer:
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return _PRIMITIVES[schema]
        full = schema if "." in schema or not namespace else f"{namespace}.{schema}"
        if full not in named and schema not in named:
            raise ValueError(f"unknown Avro type {schema!r}")
        key = full if full in named else schema

        def by_name(out: bytearray, datum: Any) -> None:  # resolved when called (recursion)
            named[key](out, datum)

        return by_name
    if isinstance(schema, list):
        return _union(schema, named, namespace)
    kind = schema["type"]
    if kind == "record":
        full = _full_name(schema, namespace)
        space = full.rpartition(".")[0]
        fields: list[tuple[str, Writer]] = []

        def record(out: bytearray, datum: Any) -> None:
            if type(datum) is not dict:
                raise Unsupported(f"a record must be a dict, not {type(datum).__name__}")
            for name, write in fields:
                write(out, datum[name])

        named[full] = record  # before the fields: a field may refer to its own record
        for field in schema["fields"]:
            fields.append((field["name"], _compile(field["type"], named, space)))
        return record
    if kind == "map":
        values = _compile(schema["values"], named, namespace)

        def map_(out: bytearray, datum: Any) -> None:
            if type(datum) is not dict:
                raise Unsupported(f"a map must be a dict, not {type(datum).__name__}")
            if datum:
                write_long(out, len(datum))
                for key, value in datum.items():
                    write_string(out, key)
                    values(out, value)
            out.append(0)

        return map_
    if kind == "array":
        items = _compile(schema["items"], named, namespace)

        def array(out: bytearray, datum: Any) -> None:
            if type(datum) is not list:
                raise Unsupported(f"an array must be a list, not {type(datum).__name__}")
            if datum:
                write_long(out, len(datum))
                for item in datum:
                    items(out, item)
            out.append(0)

        return array
    if kind in _PRIMITIVES and len(schema) == 1:
        return _PRIMITIVES[kind]
    raise ValueError(f"Avro type {kind!r} is not supported here")


def _union(branches: list[Any], named: dict[str, Writer], namespace: str) -> Writer:
    by_name: dict[str, tuple[int, Writer]] = {}
    by_type: dict[type, tuple[int, Writer]] = {}
    ambiguous: set[type] = set()
    null: int | None = None
    for index, branch in enumerate(branches):
        write = _compile(branch, named, namespace)
        if isinstance(branch, str):
            name = branch if branch in _PRIMITIVES or "." in branch or not namespace \
                else f"{namespace}.{branch}"
            kind = branch if branch in _PRIMITIVES else "record"
        elif branch["type"] in ("record", "enum", "fixed"):
            name, kind = _full_name(branch, namespace), "record"
        else:
            name = kind = branch["type"]
        by_name[name] = (index, write)
        if name == "null":
            null = index
        plain = _PLAIN.get(kind)
        if plain is not None:
            if plain in by_type:
                ambiguous.add(plain)
            by_type[plain] = (index, write)
    for plain in ambiguous:
        del by_type[plain]

    def union(out: bytearray, datum: Any) -> None:
        if datum is None:
            if null is None:
                raise Unsupported("None for a union without null")
            out.append(null << 1)
            return
        if type(datum) is tuple:
            name, value = datum
            try:
                index, write = by_name[name]
            except KeyError:
                raise Unsupported(f"no union branch {name!r}") from None
        else:
            try:
                index, write = by_type[type(datum)]
            except KeyError:
                raise Unsupported(f"no single union branch for a {type(datum).__name__}"
                                  ) from None
            value = datum
        out.append(index << 1)  # the branch index as a long: every union here has < 64
        write(out, value)

    if len(branches) >= 64:
        raise ValueError("unions of 64 branches or more are not supported here")
    return union
