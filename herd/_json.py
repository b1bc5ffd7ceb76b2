"""Compact JSON for `herd`'s fast path, without importing :mod:`json`.

Importing :mod:`json` also imports :mod:`re` (and :mod:`enum`, ...), which
costs about as much as starting the interpreter.  The C accelerator that
:func:`json.dumps` and :func:`json.loads` use underneath needs none of it,
so `herd` calls it directly.  The output is byte for byte what
``json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
allow_nan=False)`` gives; on an interpreter without the accelerator this
falls back to :mod:`json` itself.
"""

from __future__ import annotations

__all__ = ["dumps", "loads"]

_WHITESPACE = " \t\n\r"


def _default(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


class _Context:
    """What the C scanner reads from a decoder: ``json.JSONDecoder()``'s defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # 'NaN', 'Infinity', '-Infinity'


try:
    from _json import encode_basestring as _encode_str
    from _json import make_encoder as _make_encoder
    from _json import make_scanner as _make_scanner
except ImportError:  # pragma: no cover - not CPython
    import json as _json_module

    def dumps(obj: object) -> str:
        """One compact JSON text (no NaN, no infinity, non-ASCII kept).

        Raises:
            ValueError: `obj` holds a NaN or an infinity.
            TypeError: `obj` holds something JSON cannot say.
        """
        return _json_module.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    def loads(data: bytes | str) -> object:
        """The value of one JSON text.

        Raises:
            ValueError: `data` is not one JSON text (or not UTF-8).
        """
        return _json_module.loads(data)

else:
    _scan = _make_scanner(_Context())

    def dumps(obj: object) -> str:
        """One compact JSON text (no NaN, no infinity, non-ASCII kept).

        Raises:
            ValueError: `obj` holds a NaN or an infinity.
            TypeError: `obj` holds something JSON cannot say.
        """
        if isinstance(obj, str):
            return _encode_str(obj)
        encode = _make_encoder({}, _default, _encode_str, None, ":", ",", False, False, False)
        return "".join(encode(obj, 0))

    def loads(data: bytes | str) -> object:
        """The value of one JSON text.

        Raises:
            ValueError: `data` is not one JSON text (or not UTF-8).
        """
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        start = len(text) - len(text.lstrip(_WHITESPACE))
        try:
            obj, end = _scan(text, start)
        except StopIteration as exc:
            raise ValueError(f"Expecting value: char {exc.value}") from None
        if text[end:].strip(_WHITESPACE):
            raise ValueError(f"Extra data: char {end}")
        return obj
