"""Event bodies of numpy quote and trade columns, formatted in bulk: no Python code per event.

The bytes are exactly `tickwire.core.events.encode_body`'s (orjson's): keys in schema order,
integers as digits, and each price or size as its shortest round-trip form. A value that is a
whole number of `10**-d` (d: the instrument's tick or lot decimals) below 10**15 has at most 15
significant digits, and no other decimal that short maps to the same double, so its shortest form
is that decimal with trailing zeros dropped (`64123.5`, `12.0`): it is written from integers with
a table of four-digit groups. A value that is not such a number (binary noise, below 1e-5 or from
1e15 on, where orjson turns to exponents, NaN, negative) marks its row for orjson itself (see
`EncodedChunk.exact`), so the bytes never depend on the shortcut.

A row is assembled from pieces stored right-aligned in fixed-width byte matrices (a number's
digits behind leading zeros, a symbol's prefix behind zero padding). Written right to left, each
piece's padding lands where the piece on its left goes next, so no mask is needed, and each
piece is one fancy-indexed copy of whole fixed-width cells (a byte view with a stride of one):
copying byte by byte was ten times slower. The first piece's padding is zeros and falls in the
zero tail of the row before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import orjson

from tickwire.core.events import SCHEMA_VERSION

U8 = npt.NDArray[np.uint8]
U32 = npt.NDArray[np.uint32]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]

# Values formatted from integers stay below this: 15 significant digits at most (see above).
_EXACT_LIMIT = 1e15
# orjson writes smaller numbers with an exponent (1e-6 → `1e-6`, 1.5e-5 → `0.000015`).
_SMALLEST_PLAIN = 1e-5
_MAX_DECIMALS = 15
_SCALES = 10.0 ** np.arange(_MAX_DECIMALS + 1)
_PT_AT = len(b',"pt":')
#: Digits a publish time is assumed to have when a chunk is encoded before it is stamped:
#: nanoseconds since 1970 have 19 from 2001 to 2286 (another width encodes the slice anew).
PT_DIGITS = 19
PT_PLACEHOLDER = 10 ** (PT_DIGITS - 1)


@dataclass(frozen=True, slots=True)
class DigitTables:
    """Lookups by a four-digit group (0 … 9 999): its digits as a 4-byte word, how many digits
    it has without leading zeros, and how many trailing zeros its four digits have."""

    words: U32
    digits: I64
    zeros: I64

    @classmethod
    def build(cls) -> DigitTables:
        text = [b"%04d" % i for i in range(10_000)]
        return cls(
            np.array(text).view(np.uint32),
            np.array([len(str(i)) for i in range(10_000)], dtype=np.int64),
            np.array([4 - len(t.rstrip(b"0")) for t in text], dtype=np.int64),
        )


@dataclass(frozen=True, slots=True)
class Piece:
    """One part of every row: bytes right-aligned in `data` (or the same bytes in every row),
    `length` of them per row."""

    data: U8 | bytes
    length: I64

    @property
    def width(self) -> int:
        return len(self.data) if isinstance(self.data, bytes) else int(self.data.shape[1])


def int_digits(values: I64, tables: DigitTables, min_digits: int = 1) -> Piece:
    """Non-negative integers as right-aligned digits behind zeros (at least `min_digits`)."""
    n = len(values)
    digits = max(len(str(int(values.max(initial=0)))), min_digits)
    count = -(-digits // 4)
    rest = np.empty((count, n), dtype=np.int64)
    q = values
    for k in range(count - 1, -1, -1):
        # `//` by a constant is several times faster than `%` or divmod (numpy divides by a
        # scalar with multiplications).
        nxt = q // 10_000
        np.subtract(q, nxt * 10_000, out=rest[k])
        q = nxt
    data = np.ascontiguousarray(tables.words[rest.T]).view(np.uint8).reshape(n, 4 * count)
    # Digits of the lowest group, then of the highest group that is not zero.
    length = tables.digits[rest[count - 1]]
    for k in range(count - 2, -1, -1):
        length = np.where(rest[k] > 0, 4 * (count - 1 - k) + tables.digits[rest[k]], length)
    return Piece(data, length)


def decimal_parts(values: F64, decimals: I64, tables: DigitTables) -> tuple[I64, I64, I64, Bools]:
    """Positive multiples of `10**-decimals` as orjson writes them: the integer part, the
    fraction's digits without trailing zeros (as an integer) and their count (0 for none, to be
    written `.0`); and which values qualify (the others get zeros)."""
    ok = (values >= _SMALLEST_PLAIN) & (values < _EXACT_LIMIT) & (decimals <= _MAX_DECIMALS)
    d = np.where(ok, decimals, 0)
    scale = _SCALES[d]
    # NaN and infinities are not `ok`: only their placeholders see invalid arithmetic.
    scaled = np.rint(np.where(ok, values, 0.0) * scale)
    # Exactly the double nearest `scaled / 10**d`: that decimal maps to this value, and no other
    # of 15 digits or fewer does.
    ok &= (scaled / scale == values) & (scaled < _EXACT_LIMIT)
    scaled *= ok
    d *= ok
    # Below 2**53 this float arithmetic is exact, and floor() is the decimal's integer part: a
    # double that close to a whole number would be it.
    whole = np.floor(scaled / scale)
    frac = scaled - whole * scale
    fint = frac.astype(np.int64)
    # Trailing zeros of the fraction, from its lowest four digits; only a fraction of more than
    # four places whose lowest four are all zeros needs the next group.
    q = fint // 10_000
    zeros = tables.zeros[fint - q * 10_000]
    more = np.flatnonzero((zeros == 4) & (d > 4) & (fint > 0))
    shift = 4
    while len(more):
        q_more = q[more] // 10_000
        z = tables.zeros[q[more] - q_more * 10_000]
        zeros[more] += z
        q[more] = q_more
        keep = (z == 4) & (d[more] > shift + 4)
        more, shift = more[keep], shift + 4
    places = np.where(fint > 0, d - zeros, 0)
    # Exact: a multiple of the power, below 2**53.
    fint = (frac / _SCALES[np.minimum(zeros, _MAX_DECIMALS)]).astype(np.int64)
    return whole.astype(np.int64), fint, places, ok


def right_aligned_table(texts: Sequence[bytes]) -> tuple[U8, I64]:
    width = max(len(t) for t in texts)
    table = np.zeros((len(texts), width), dtype=np.uint8)
    for i, t in enumerate(texts):
        table[i, width - len(t) :] = np.frombuffer(t, dtype=np.uint8)
    return table, np.array([len(t) for t in texts], dtype=np.int64)


def _write(out: U8, pieces: Sequence[Piece], row_start: I64) -> list[I64]:
    """Write rows of the pieces side by side from `row_start` (flat offsets into `out`),
    right to left; returns where each piece ends in its row."""
    ends = [pieces[0].length]
    for p in pieces[1:]:
        ends.append(ends[-1] + p.length)
    for k in range(len(pieces) - 1, -1, -1):
        piece = pieces[k]
        w = piece.width
        cells = np.ndarray((out.size - w + 1,), dtype=f"V{w}", buffer=out, strides=(1,))
        first = row_start + (ends[k] - w)
        if isinstance(piece.data, bytes):
            cells[first] = np.void(piece.data)
        else:
            cells[first] = np.ascontiguousarray(piece.data).reshape(-1).view(f"V{w}")
    return ends


def _constant(text: bytes, n: int) -> Piece:
    return Piece(text, np.full(n, len(text), dtype=np.int64))


class EncodedChunk:
    """A chunk's bodies in event order, encoded at once, handed out a slice at a time: stamping
    a slice with its publish time writes `PT_DIGITS` bytes a row instead of encoding it again.
    Rows not `exact` hold placeholders (their events must go through `encode_body`)."""

    def __init__(self, buffer: U8, stride: int, pt_at: I64, exact: Bools, keys: list[int]) -> None:
        self.exact = exact
        #: Per event, `2 * symbol + kind` (kind 1: a trade).
        self.keys = keys
        self.all_exact = bool(exact.all())
        # Row i at [(i + 1) * stride, (i + 2) * stride): the first stride is the margin.
        self._rows = buffer[stride:].view(f"S{stride}")
        self._cells = np.ndarray(
            (buffer.size - PT_DIGITS + 1,), dtype=f"V{PT_DIGITS}", buffer=buffer, strides=(1,)
        )
        self._pt_at = pt_at

    def bodies(self, start: int, stop: int, pt: int | None = None) -> list[bytes]:
        """Bodies of events [start, stop), stamped with `pt` (of `PT_DIGITS` digits) if given."""
        if pt is not None and stop > start:
            self._cells[self._pt_at[start:stop]] = np.void(b"%d" % pt)
        # numpy drops each row's zero tail; a body never holds a zero byte.
        return self._rows[start:stop].tolist()  # type: ignore[no-any-return]


class BodyEncoder:
    """Encodes quote and trade columns of known instruments; per-symbol prefixes built once."""

    def __init__(self, symbols: Sequence[str], price_decimals: I64, size_decimals: I64) -> None:
        self.symbols = list(symbols)
        self.price_decimals = price_decimals
        self.size_decimals = size_decimals
        self._tables = DigitTables.build()

        def prefixes(kind: str) -> tuple[U8, I64]:
            # orjson's own bytes up to the `ts` value, escaping and all, as encode_body has them.
            return right_aligned_table(
                [
                    orjson.dumps({"v": SCHEMA_VERSION, "type": kind, "sym": s, "ts": 0})[:-2]
                    for s in self.symbols
                ]
            )

        self._quote_prefix = prefixes("quote")
        self._trade_prefix = prefixes("trade")
        self._side = right_aligned_table(
            [b',"side":"sell","trade_id":', b',"side":"buy","trade_id":']
        )

    def encode_chunk(
        self,
        ts: I64,
        sym: I64,
        kind: npt.NDArray[np.int8],
        bid: F64,
        ask: F64,
        bid_size: F64,
        ask_size: F64,
        price: F64,
        size: F64,
        buy: Bools,
        trade_id: I64,
        pt: int = PT_PLACEHOLDER,
    ) -> EncodedChunk:
        """The events' bodies (`kind` 0: a quote, else a trade), stamped with `pt`."""
        tables = self._tables
        n = len(ts)
        quotes, trades = np.flatnonzero(kind == 0), np.flatnonzero(kind != 0)
        nq, nt = len(quotes), len(trades)
        qsym, tsym = sym[quotes], sym[trades]
        qp, qs = self.price_decimals[qsym], self.size_decimals[qsym]
        # Every price and size in one call, and every integer in one more: numpy's cost per
        # call, not per value, dominated.
        whole, frac, places, exact = decimal_parts(
            np.concatenate(
                [
                    bid[quotes],
                    ask[quotes],
                    bid_size[quotes],
                    ask_size[quotes],
                    price[trades],
                    size[trades],
                ]
            ),
            np.concatenate([qp, qp, qs, qs, self.price_decimals[tsym], self.size_decimals[tsym]]),
            tables,
        )
        m = len(whole)
        numbers = int_digits(np.concatenate([whole, frac]), tables, int(places.max(initial=1)))
        tid = trade_id[trades]
        stamps = int_digits(np.maximum(np.concatenate([ts, tid]), 0), tables)
        dot = _constant(b".", 0)

        def number(k: int, count: int, at: int, then: bytes) -> list[Piece]:
            """Value k of `count` from `at`: integer part, dot, fraction, constant after."""
            a, b = at + k * count, at + (k + 1) * count
            assert not isinstance(numbers.data, bytes)
            parts = [
                Piece(numbers.data[a:b], numbers.length[a:b]),
                Piece(dot.data, np.ones(count, dtype=np.int64)),
                Piece(numbers.data[m + a : m + b], np.maximum(places[a:b], 1)),
            ]
            return [*parts, _constant(then, count)] if then else parts

        assert not isinstance(stamps.data, bytes)
        table, lengths = self._quote_prefix
        q_pieces = [
            Piece(table[qsym], lengths[qsym]),
            Piece(stamps.data[quotes], stamps.length[quotes]),
            _constant(b',"pt":%d,"bid":' % pt, nq),
            *number(0, nq, 0, b',"bid_size":'),
            *number(2, nq, 0, b',"ask":'),
            *number(1, nq, 0, b',"ask_size":'),
            *number(3, nq, 0, b""),
        ]
        t_table, t_lengths = self._trade_prefix
        side, side_len = self._side
        up = buy[trades].astype(np.int64)
        t_pieces = [
            Piece(t_table[tsym], t_lengths[tsym]),
            Piece(stamps.data[trades], stamps.length[trades]),
            _constant(b',"pt":%d,"price":' % pt, nt),
            *number(0, nt, 4 * nq, b',"size":'),
            *number(1, nt, 4 * nq, b""),
            Piece(side[up], side_len[up]),
            Piece(stamps.data[n:], stamps.length[n:]),
        ]
        total_q = sum(p.length for p in q_pieces) if nq else np.zeros(0, dtype=np.int64)
        total_t = sum(p.length for p in t_pieces) if nt else np.zeros(0, dtype=np.int64)
        longest = max(int(np.max(total_q, initial=0)), int(np.max(total_t, initial=0)))
        # Each row's zero tail takes the padding of the next row's prefix.
        stride = longest + max(table.shape[1], t_table.shape[1])
        buffer = np.zeros((n + 1) * stride, dtype=np.uint8)
        pt_at = np.empty(n, dtype=np.int64)
        for at, pieces in ((quotes, q_pieces), (trades, t_pieces)):
            if len(at):
                start = (at + 1) * stride
                ends = _write(buffer, pieces, start)
                pt_at[at] = start + ends[1] + _PT_AT
        ok = np.empty(n, dtype=np.bool_)
        ok[quotes] = exact[:nq] & exact[nq : 2 * nq] & exact[2 * nq : 3 * nq]
        ok[quotes] &= exact[3 * nq : 4 * nq]
        ok[trades] = exact[4 * nq : 4 * nq + nt] & exact[4 * nq + nt :] & (tid >= 0)
        ok &= ts >= 0
        keys = 2 * sym + (kind != 0)
        return EncodedChunk(buffer, stride, pt_at, ok, keys.tolist())
