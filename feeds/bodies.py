"""Event bodies of numpy quote and trade columns, formatted in bulk: no Python code per event.

The bytes are exactly `tickwire.core.events.encode_body`'s. Its numbers are orjson's, so orjson
writes them here too, a whole column in one call (`OPT_SERIALIZE_NUMPY` formats a float64 or an
int64 array with the same code as Python floats and ints: shortest round-trip, `12.0`, `1e-7`,
`null` for NaN): about 15 ns a number, where a dict and a `dumps` per event cost 800 ns an event.
Integer arithmetic on the digits (a table of four-digit groups) was tried first: a chunk took
about 1.5x as long, and only values it could vouch for were exact (the rest went to orjson one
by one).

A row is assembled from pieces: the symbol's prefix (`{"v":1,"type":"quote","sym":"BTC-USD",
"ts":`, built once by orjson), numbers cut out of those arrays' text, and constant keys. Each
piece is a fixed-width cell per row holding its bytes right-aligned (what comes before them in
the array's text, or zero padding, fills the rest). Written right to left, each cell's padding
lands where the piece on its left goes next, so every piece is one fancy-indexed copy of whole
cells (a byte view with a stride of one): copying byte by byte was ten times slower.
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
#: One fixed-width cell of bytes per row (a numpy void array).
Cells = npt.NDArray[np.void]

_COMMA = ord(",")
_PT_AT = len(b',"pt":')
#: Digits a publish time is assumed to have when a chunk is encoded before it is stamped:
#: nanoseconds since 1970 have 19 from 2001 to 2286 (another width encodes the slice anew).
PT_DIGITS = 19
PT_PLACEHOLDER = 10 ** (PT_DIGITS - 1)
#: Slices of up to this many events are stamped a row at a time (`EncodedChunk.stamp`).
SMALL_STAMP = 16


@dataclass(frozen=True, slots=True)
class Piece:
    """One part of every row: `length` bytes right-aligned in a cell of `width` per row (or
    the same bytes in every row)."""

    cells: Cells | bytes
    length: I64

    @property
    def width(self) -> int:
        return len(self.cells) if isinstance(self.cells, bytes) else self.cells.dtype.itemsize

    def rows(self, index: I64 | slice) -> Piece:
        assert not isinstance(self.cells, bytes)
        return Piece(self.cells[index], self.length[index])


def numbers(values: npt.NDArray[np.float64] | npt.NDArray[np.int64]) -> Piece:
    """The values as orjson writes them, one cell each."""
    if len(values) == 0:
        return Piece(np.zeros(0, dtype="V1"), np.zeros(0, dtype=np.int64))
    text = orjson.dumps(np.ascontiguousarray(values), option=orjson.OPT_SERIALIZE_NUMPY)
    commas = np.flatnonzero(np.frombuffer(text, dtype=np.uint8) == _COMMA)
    ends = np.append(commas, len(text) - 1)  # the last one ends at `]`
    starts = np.empty_like(ends)
    starts[0] = 1
    starts[1:] = commas + 1
    length = ends - starts
    width = int(length.max())
    # Padded in front so that the first number has a whole cell before its end.
    padded = np.zeros(width + len(text), dtype=np.uint8)
    padded[width:] = np.frombuffer(text, dtype=np.uint8)
    cells = np.ndarray((len(padded) - width + 1,), dtype=f"V{width}", buffer=padded, strides=(1,))
    return Piece(cells[ends], length)


def table_cells(texts: Sequence[bytes]) -> Piece:
    """Texts right-aligned behind zero padding, one cell each (index it by row)."""
    width = max(len(t) for t in texts)
    table = np.zeros((len(texts), width), dtype=np.uint8)
    for i, t in enumerate(texts):
        table[i, width - len(t) :] = np.frombuffer(t, dtype=np.uint8)
    return Piece(table.view(f"V{width}").ravel(), np.array([len(t) for t in texts]))


def _write(out: U8, pieces: Sequence[Piece], row_start: I64) -> list[I64]:
    """Write rows of the pieces side by side from `row_start` (offsets into `out`), right to
    left; returns where each piece ends in its row."""
    ends = [pieces[0].length]
    for p in pieces[1:]:
        ends.append(ends[-1] + p.length)
    for k in range(len(pieces) - 1, -1, -1):
        piece = pieces[k]
        w = piece.width
        target = np.ndarray((out.size - w + 1,), dtype=f"V{w}", buffer=out, strides=(1,))
        first = row_start + (ends[k] - w)
        target[first] = np.void(piece.cells) if isinstance(piece.cells, bytes) else piece.cells
    return ends


def _constant(text: bytes, n: int) -> Piece:
    return Piece(text, np.full(n, len(text), dtype=np.int64))


class EncodedChunk:
    """A chunk's bodies in event order, encoded at once, handed out a slice at a time: stamping
    a slice with its publish time writes `PT_DIGITS` bytes a row instead of encoding it again."""

    def __init__(self, buffer: U8, stride: int, pt_at: I64, keys: I64) -> None:
        #: Per event, `2 * symbol + kind` (kind 1: a trade); also as a list, to loop over.
        self.keys = keys
        self.key_list: list[int] = keys.tolist()
        # Row i at [(i + 1) * stride, (i + 2) * stride): the first stride takes the padding
        # of the first row's prefix.
        self._buffer = buffer
        self._stride = stride
        self._rows = buffer[stride:].view(f"S{stride}")
        self._cells = np.ndarray(
            (buffer.size - PT_DIGITS + 1,), dtype=f"V{PT_DIGITS}", buffer=buffer, strides=(1,)
        )
        self._pt_at = pt_at
        # For small slices: a Python loop over a memoryview beats numpy's fancy indexing, whose
        # fixed cost is most of a paced feed's stamp (two events a release at 1 000 events/s).
        self._pt_list: list[int] = pt_at.tolist()
        self._bytes = buffer.data

    @staticmethod
    def join(a: EncodedChunk, a_start: int, b: EncodedChunk, b_stop: int) -> EncodedChunk:
        """Events [a_start, …) of `a` followed by events [0, b_stop) of `b`: the bodies as they
        are (stamped or not), copied a row at a time into rows of the wider stride."""
        stride = max(a._stride, b._stride)
        parts = ((a, a_start, len(a.keys)), (b, 0, b_stop))
        n = sum(stop - start for _, start, stop in parts)
        buffer = np.zeros((n + 1) * stride, dtype=np.uint8)
        rows = buffer.reshape(n + 1, stride)
        pt_at = np.empty(n, dtype=np.int64)
        at = 1
        for part, start, stop in parts:
            count = stop - start
            old = part._buffer.reshape(-1, part._stride)
            rows[at : at + count, : part._stride] = old[start + 1 : stop + 1]
            column = part._pt_at[start:stop] - np.arange(start + 1, stop + 1) * part._stride
            pt_at[at - 1 : at - 1 + count] = np.arange(at, at + count) * stride + column
            at += count
        keys = np.concatenate([a.keys[a_start:], b.keys[:b_stop]])
        return EncodedChunk(buffer, stride, pt_at, keys)

    def stamp(self, start: int, stop: int, pt: int) -> None:
        """Write `pt` (of `PT_DIGITS` digits) into the bodies of events [start, stop)."""
        if stop - start > SMALL_STAMP:
            self._cells[self._pt_at[start:stop]] = np.void(b"%d" % pt)
        elif stop > start:
            digits, buffer = b"%d" % pt, self._bytes
            for at in self._pt_list[start:stop]:
                buffer[at : at + PT_DIGITS] = digits

    def bodies(self, start: int, stop: int) -> list[bytes]:
        """Bodies of events [start, stop)."""
        # numpy drops each row's zero tail; a body never holds a zero byte.
        return self._rows[start:stop].tolist()  # type: ignore[no-any-return]

    def bodies_at(self, events: I64) -> list[bytes]:
        return self._rows[events].tolist()  # type: ignore[no-any-return]


class BodyEncoder:
    """Encodes quote and trade columns of known symbols; per-symbol prefixes built once."""

    def __init__(self, symbols: Sequence[str]) -> None:
        self.symbols = list(symbols)

        def prefixes(kind: str) -> Piece:
            # orjson's own bytes up to the `ts` value, escaping and all, as encode_body has them.
            return table_cells(
                [
                    orjson.dumps({"v": SCHEMA_VERSION, "type": kind, "sym": s, "ts": 0})[:-2]
                    for s in self.symbols
                ]
            )

        self._quote_prefix = prefixes("quote")
        self._trade_prefix = prefixes("trade")
        self._side = table_cells([b',"side":"sell","trade_id":', b',"side":"buy","trade_id":'])

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
        n = len(ts)
        quotes, trades = np.flatnonzero(kind == 0), np.flatnonzero(kind != 0)
        nq, nt = len(quotes), len(trades)
        # Every price and size in one call, every integer in another: numpy's and orjson's
        # cost per call, not per value, dominated small chunks.
        floats = numbers(
            np.concatenate(
                [
                    bid[quotes],
                    ask[quotes],
                    bid_size[quotes],
                    ask_size[quotes],
                    price[trades],
                    size[trades],
                ]
            )
        )
        ints = numbers(np.concatenate([ts, trade_id[trades]]))

        def value(k: int, count: int, at: int = 0) -> Piece:
            return floats.rows(slice(at + k * count, at + (k + 1) * count))

        q_pieces = [
            self._quote_prefix.rows(sym[quotes]),
            ints.rows(quotes),
            _constant(b',"pt":%d,"bid":' % pt, nq),
            value(0, nq),
            _constant(b',"bid_size":', nq),
            value(2, nq),
            _constant(b',"ask":', nq),
            value(1, nq),
            _constant(b',"ask_size":', nq),
            value(3, nq),
        ]
        t_pieces = [
            self._trade_prefix.rows(sym[trades]),
            ints.rows(trades),
            _constant(b',"pt":%d,"price":' % pt, nt),
            value(0, nt, 4 * nq),
            _constant(b',"size":', nt),
            value(1, nt, 4 * nq),
            self._side.rows(buy[trades].astype(np.int64)),
            ints.rows(slice(n, n + nt)),
        ]
        longest = 0
        for count, pieces in ((nq, q_pieces), (nt, t_pieces)):
            if count:
                total = np.zeros(count, dtype=np.int64)
                for p in pieces:
                    total += p.length
                longest = max(longest, int(total.max()))
        # Each row's zero tail takes the padding of the next row's prefix.
        stride = longest + max(self._quote_prefix.width, self._trade_prefix.width)
        buffer = np.zeros((n + 1) * stride, dtype=np.uint8)
        pt_at = np.empty(n, dtype=np.int64)
        for at, pieces in ((quotes, q_pieces), (trades, t_pieces)):
            if len(at):
                start = (at + 1) * stride
                ends = _write(buffer, pieces, start)
                pt_at[at] = start + ends[1] + _PT_AT
        return EncodedChunk(buffer, stride, pt_at, 2 * sym + (kind != 0))
