"""Event bodies of numpy quote and trade columns, formatted in bulk: no Python code per event.

The bytes are exactly `tickwire.core.events.encode_body`'s (orjson's): keys in schema order,
integers as digits, and each price or size as its shortest round-trip form. A value that is a
whole number of `10**-d` (d: the instrument's tick or lot decimals) below 10**15 has at most 15
significant digits, and no other decimal that short maps to the same double, so its shortest form
is that decimal with trailing zeros dropped (`64123.5`, `12.0`): it is written from integers with
a table of four-digit groups. A value that is not such a number (binary noise, below 1e-5 or from
1e15 on, where orjson turns to exponents, NaN, negative) marks its row for orjson itself (see
`Rows.exact`), so the bytes never depend on the shortcut.

A row is assembled from pieces stored right-aligned in fixed-width byte matrices (a number's
digits behind leading zeros, a symbol's prefix behind padding). Written right to left, each
piece's padding lands where the piece on its left goes next, so no mask is needed, and each
piece is one fancy-indexed copy of whole fixed-width cells (a byte view with a stride of one):
copying byte by byte was ten times slower.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import orjson

from tickwire.core.events import SCHEMA_VERSION

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]

# 10**0 … 10**18: every non-negative int64 has at most 19 digits.
_POW10 = 10 ** np.arange(19, dtype=np.int64)
# Values formatted from integers stay below this: 15 significant digits at most (see above).
_EXACT_LIMIT = 1e15
# orjson writes smaller numbers with an exponent (1e-6 → `1e-6`, 1.5e-5 → `0.000015`).
_SMALLEST_PLAIN = 1e-5
_MAX_DECIMALS = 15
_PT_AT = len(b',"pt":')
#: Digits a publish time is assumed to have when a chunk is encoded before it is stamped:
#: nanoseconds since 1970 have 19 from 2001 to 2286 (another width encodes the slice anew).
PT_DIGITS = 19
PT_PLACEHOLDER = 10 ** (PT_DIGITS - 1)
_NO_LENGTHS = np.zeros(0, dtype=np.int64)
_SCALES = _POW10[:16].astype(np.float64)


def digit_groups() -> npt.NDArray[np.uint32]:
    """ "0000" … "9999" as 4-byte words: one lookup writes four digits."""
    table = np.array([b"%04d" % i for i in range(10_000)]).view(np.uint32)
    table.flags.writeable = False
    return table


def trailing_zeros() -> I64:
    """Trailing zeros of "0000" … "9999"."""
    table = 4 - np.array([len((b"%04d" % i).rstrip(b"0")) for i in range(10_000)], dtype=np.int64)
    table.flags.writeable = False
    return table


@dataclass(frozen=True, slots=True)
class Piece:
    """One part of every row: bytes right-aligned in `data` (or the same bytes in every row),
    `length` of them per row."""

    data: U8 | bytes
    length: I64

    @property
    def width(self) -> int:
        return len(self.data) if isinstance(self.data, bytes) else int(self.data.shape[1])

    def rows(self, start: int, stop: int) -> Piece:
        assert not isinstance(self.data, bytes)
        return Piece(self.data[start:stop], self.length[start:stop])

    def rows_at(self, index: I64) -> Piece:
        assert not isinstance(self.data, bytes)
        return Piece(self.data[index], self.length[index])


@dataclass(frozen=True, slots=True)
class Rows:
    """Bodies of one kind as rows of a byte matrix, zero-padded to one width (a body never holds
    a zero byte); `exact` says which rows are right (the others must be encoded one by one);
    `pt_col` is where each row's publish time starts."""

    matrix: U8
    exact: Bools
    pt_col: I64


def int_digits(
    values: I64, groups: npt.NDArray[np.uint32], min_digits: int = 1, lengths: bool = True
) -> Piece:
    """Non-negative integers as right-aligned digits, behind at least `min_digits` - length
    zeros; `lengths` False leaves the lengths out (the caller knows them)."""
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
    data = np.ascontiguousarray(groups[rest.T]).view(np.uint8).reshape(n, 4 * count)
    if not lengths:
        return Piece(data, _NO_LENGTHS)
    # Cheaper than a searchsorted over the powers of ten, for the few digits numbers here have.
    length = np.ones(n, dtype=np.int64)
    for k in range(1, digits):
        length += values >= _POW10[k]
    return Piece(data, length)


def decimal_pieces(
    values: F64, decimals: I64, groups: npt.NDArray[np.uint32], zeros_of: I64
) -> tuple[Piece, Piece, Bools]:
    """Positive multiples of `10**-decimals` as orjson writes them: the integer part with its
    dot, the fraction; and which values qualify (the others get placeholder bytes).
    `zeros_of[i]`: trailing zeros of i < 10 000 written in four digits."""
    ok = (values >= _SMALLEST_PLAIN) & (values < _EXACT_LIMIT) & (decimals <= _MAX_DECIMALS)
    d = np.where(ok, decimals, 0)
    scale = _SCALES[d]
    x = np.where(ok, values, 0.0)
    scaled = np.rint(x * scale)
    # Exactly the double nearest `scaled / 10**d`: that decimal maps to this value, and no other
    # of 15 digits or fewer does.
    ok &= (scaled / scale == values) & (scaled < _EXACT_LIMIT)
    scaled *= ok
    # floor(x) is the decimal's integer part: below 10**15 a double is never within half an ulp
    # of a whole number that a decimal of `d` places is not.
    whole = np.floor(scaled / scale)
    # Below 2**53 the float arithmetic is exact.
    frac = scaled - whole * scale
    fint = frac.astype(np.int64)
    # Trailing zeros of the fraction go; a whole number keeps one: `12.0`.
    zeros = np.zeros(len(values), dtype=np.int64)
    low = np.ones(len(values), dtype=np.bool_)  # every digit so far was a zero
    q = fint
    for _ in range(-(-int(d.max(initial=0)) // 4)):
        nxt = q // 10_000
        z = zeros_of[q - nxt * 10_000]
        zeros += z * low
        low &= z == 4
        q = nxt
    places = np.where(fint > 0, d - zeros, 0)
    # Exact: a multiple of the power, below 2**53.
    fint = (frac / _SCALES[np.minimum(zeros, d)]).astype(np.int64)
    point = int_digits(whole.astype(np.int64), groups)
    tail = int_digits(fint, groups, int(places.max(initial=1)), lengths=False)
    int_part = Piece(_followed_by(point.data, b"."), point.length + 1)
    return int_part, Piece(tail.data, np.maximum(places, 1)), ok


def _followed_by(data: U8 | bytes, text: bytes) -> U8:
    assert not isinstance(data, bytes)
    n = data.shape[0]
    out = np.empty((n, data.shape[1] + len(text)), dtype=np.uint8)
    out[:, : data.shape[1]] = data
    out[:, data.shape[1] :] = np.frombuffer(text, dtype=np.uint8)
    return out


def right_aligned_table(texts: Sequence[bytes]) -> tuple[U8, I64]:
    width = max(len(t) for t in texts)
    table = np.zeros((len(texts), width), dtype=np.uint8)
    for i, t in enumerate(texts):
        table[i, width - len(t) :] = np.frombuffer(t, dtype=np.uint8)
    return table, np.array([len(t) for t in texts], dtype=np.int64)


def assemble(pieces: Sequence[Piece]) -> tuple[U8, list[I64]]:
    """Rows of the pieces side by side, zero-padded to the longest, and where each piece ends."""
    n = len(pieces[0].length)
    # (A loop of adds: numpy's cumsum down the first axis took as long as all of them.)
    ends = [pieces[0].length]
    for p in pieces[1:]:
        ends.append(ends[-1] + p.length)
    if n == 0:
        return np.zeros((0, 0), dtype=np.uint8), ends
    margin = max(p.width for p in pieces)
    width = int(ends[-1].max(initial=0))
    stride = margin + width
    out = np.zeros((n, stride), dtype=np.uint8)
    row_base = np.arange(n, dtype=np.int64) * stride + margin
    # Right to left: a piece's leading padding falls where the piece before it goes next.
    for k in range(len(pieces) - 1, -1, -1):
        piece = pieces[k]
        w = piece.width
        cells = np.ndarray((out.size - w + 1,), dtype=f"V{w}", buffer=out, strides=(1,))
        first = row_base + ends[k] - w
        if isinstance(piece.data, bytes):
            cells[first] = np.void(piece.data)
        else:
            cells[first] = np.ascontiguousarray(piece.data).reshape(-1).view(f"V{w}")
    return np.ascontiguousarray(out[:, margin:]), ends


class BodyEncoder:
    """Encodes quote and trade columns of known instruments; per-symbol prefixes built once."""

    def __init__(self, symbols: Sequence[str], price_decimals: I64, size_decimals: I64) -> None:
        self.symbols = list(symbols)
        self.price_decimals = price_decimals
        self.size_decimals = size_decimals
        self._groups = digit_groups()
        self._zeros = trailing_zeros()

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

    def rows(
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
        pt: int,
    ) -> tuple[Rows, Rows]:
        """The quotes' bodies (`kind` 0) and the trades' (1), each in event order."""
        g = self._groups
        quotes, trades = np.flatnonzero(kind == 0), np.flatnonzero(kind != 0)
        nq, nt = len(quotes), len(trades)
        qsym, tsym = sym[quotes], sym[trades]
        qp, qs = self.price_decimals[qsym], self.size_decimals[qsym]
        # Every price and size in one call: numpy's cost per call, not per value, dominated.
        ints, fracs, exact = decimal_pieces(
            np.concatenate(
                [
                    *(bid[quotes], ask[quotes], bid_size[quotes], ask_size[quotes]),
                    *(price[trades], size[trades]),
                ]
            ),
            np.concatenate([qp, qp, qs, qs, self.price_decimals[tsym], self.size_decimals[tsym]]),
            g,
            self._zeros,
        )
        stamps = int_digits(np.maximum(ts, 0), g)

        def number(k: int, n: int, at: int, then: bytes = b"") -> tuple[Piece, Piece]:
            a, b = at + k * n, at + (k + 1) * n
            frac = fracs.data[a:b]
            assert not isinstance(frac, bytes)
            places = fracs.length[a:b]
            if then:
                return ints.rows(a, b), Piece(_followed_by(frac, then), places + len(then))
            return ints.rows(a, b), Piece(frac, places)

        table, lengths = self._quote_prefix
        q_ts = stamps.rows_at(quotes)
        q_exact = exact[:nq] & exact[nq : 2 * nq] & exact[2 * nq : 3 * nq]
        q_exact &= exact[3 * nq : 4 * nq] & (ts[quotes] >= 0)
        matrix, ends = assemble(
            [
                Piece(table[qsym], lengths[qsym]),
                q_ts,
                _constant(b',"pt":%d,"bid":' % pt, nq),
                *number(0, nq, 0, b',"bid_size":'),
                *number(2, nq, 0, b',"ask":'),
                *number(1, nq, 0, b',"ask_size":'),
                *number(3, nq, 0),
            ]
        )
        quote_rows = Rows(matrix, q_exact, ends[1] + _PT_AT)

        table, lengths = self._trade_prefix
        side, side_len = self._side
        up = buy[trades].astype(np.int64)
        tid = trade_id[trades]
        at = 4 * nq
        t_exact = exact[at : at + nt] & exact[at + nt :] & (ts[trades] >= 0) & (tid >= 0)
        matrix, ends = assemble(
            [
                Piece(table[tsym], lengths[tsym]),
                stamps.rows_at(trades),
                _constant(b',"pt":%d,"price":' % pt, nt),
                *number(0, nt, at, b',"size":'),
                *number(1, nt, at),
                Piece(side[up], side_len[up]),
                int_digits(np.maximum(tid, 0), g),
            ]
        )
        return quote_rows, Rows(matrix, t_exact, ends[1] + _PT_AT)

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
        """The events' bodies in event order (see `EncodedChunk`)."""
        quotes, trades = self.rows(
            ts, sym, kind, bid, ask, bid_size, ask_size, price, size, buy, trade_id, pt
        )
        n = len(ts)
        q_at, t_at = np.flatnonzero(kind == 0), np.flatnonzero(kind != 0)
        width = max(quotes.matrix.shape[1], trades.matrix.shape[1], PT_DIGITS)
        # One matrix in event order: a slice is then one copy and one stamp, whatever its kinds.
        matrix = np.zeros((n, width), dtype=np.uint8)
        matrix[q_at, : quotes.matrix.shape[1]] = quotes.matrix
        matrix[t_at, : trades.matrix.shape[1]] = trades.matrix
        pt_col = np.empty(n, dtype=np.int64)
        pt_col[q_at] = quotes.pt_col
        pt_col[t_at] = trades.pt_col
        exact = np.empty(n, dtype=np.bool_)
        exact[q_at] = quotes.exact
        exact[t_at] = trades.exact
        keys = 2 * sym + (kind != 0)
        return EncodedChunk(matrix, pt_col, exact, keys.tolist())


def _constant(text: bytes, n: int) -> Piece:
    return Piece(text, np.full(n, len(text), dtype=np.int64))


class EncodedChunk:
    """A chunk's bodies, encoded at once, handed out a slice at a time: stamping a slice with
    its publish time writes `PT_DIGITS` bytes a row instead of encoding it again."""

    def __init__(self, matrix: U8, pt_col: I64, exact: Bools, keys: list[int]) -> None:
        n, width = matrix.shape
        self.exact = exact
        #: Per event, `2 * symbol + kind` (kind 1: a trade).
        self.keys = keys
        self.all_exact = bool(exact.all())
        self._rows = matrix.view(f"S{width}").ravel()
        # Every row's publish time as one cell of a byte view with a stride of one.
        self._cells = np.ndarray(
            (matrix.size - PT_DIGITS + 1,), dtype=f"V{PT_DIGITS}", buffer=matrix, strides=(1,)
        )
        self._pt_at = np.arange(n, dtype=np.int64) * width + pt_col

    def bodies(self, start: int, stop: int, pt: int | None = None) -> list[bytes]:
        """Bodies of events [start, stop), stamped with `pt` (of `PT_DIGITS` digits) if given;
        rows not `exact` hold placeholders."""
        if pt is not None and stop > start:
            self._cells[self._pt_at[start:stop]] = np.void(b"%d" % pt)
        return self._rows[start:stop].tolist()  # type: ignore[no-any-return]
