"""The member graph: an undirected CSR adjacency over dense indices, plus graph measures.

Members keep their external int64 ids; `ids` is sorted, so a member's dense index is a
binary search away. Every measure here is vectorised: a request touches numpy, not Python
loops, and training and serving call the very same functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mmap
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class EdgeFileError(ValueError):
    """A malformed edge list; the message names the file and the line."""


# Dense neighbour indices are int32 positions: a graph holds fewer than 2^31 members.
# Member ids are int64 and row offsets int64, so edges are not bounded below 2^62.
MAX_MEMBERS = 2**31 - 1


class _Base:
    """The CSR a graph and every graph derived from it by `with_edges` share: arrays built
    in memory, or read-only views of a snapshot file mapped by every process of a machine."""

    __slots__ = ("_degree", "ids", "indices", "indptr")

    def __init__(self, ids: np.ndarray, indptr: np.ndarray, indices: np.ndarray) -> None:
        self.ids = ids
        self.indptr = indptr
        self.indices = indices
        self._degree: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.ids.size)

    @property
    def degree(self) -> np.ndarray:
        if self._degree is None:
            self._degree = np.diff(self.indptr)
        return self._degree


@dataclass(frozen=True, eq=False)
class _Overlay:
    """Adjacency that replaces the base's for some members: a small CSR over `rows`.

    Members added after the base get dense indices base.n, base.n + 1, ... (`new_ids`, all
    greater than every base id, so dense order stays id order) and always have a row here.
    """

    rows: np.ndarray  # int64 dense rows, sorted
    indptr: np.ndarray  # int64, len rows.size + 1
    indices: np.ndarray  # int32 dense neighbour indices, sorted within each row
    new_ids: np.ndarray  # int64 sorted ids of members the base does not have
    entries: int  # neighbour entries of the whole graph (2 x edges)

    def find(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask of `rows` that have an overlay row, their slot in `self.rows`)."""
        if not self.rows.size:
            return np.zeros(rows.shape, dtype=bool), np.zeros(rows.shape, dtype=np.int64)
        slot = np.minimum(np.searchsorted(self.rows, rows), self.rows.size - 1)
        return self.rows[slot] == rows, slot


class Graph:
    """An undirected graph over members with external int64 ids, as a CSR over dense indices.

    `ids` is sorted (a member's dense index is its rank), `indptr` int64 and `indices` int32,
    sorted within each row. A graph never changes: `with_edges` returns a new one that shares
    this one's arrays and keeps the adjacency of the members it changed in a small overlay, so
    a delta batch costs what it touches, not a copy of the neighbour array. `neighbors`,
    `gather`, `degree` and the lookups read through the overlay; `indptr` and `indices` of a
    graph with an overlay are merged into new arrays on first use (bulk jobs, compaction),
    so request paths should use the former.
    """

    __slots__ = ("_base", "_cache", "_ov", "_version")

    def __init__(
        self, ids: np.ndarray, indptr: np.ndarray, indices: np.ndarray, version: str = ""
    ) -> None:
        self._base = _Base(ids, indptr, indices)
        self._ov: _Overlay | None = None
        self._version = version
        self._cache: dict[str, np.ndarray] = {}

    @classmethod
    def _derived(cls, base: _Base, overlay: _Overlay | None, version: str) -> Graph:
        graph = cls.__new__(cls)
        graph._base, graph._ov, graph._version, graph._cache = base, overlay, version, {}
        return graph

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_edges(
        cls, src: np.ndarray, dst: np.ndarray, members: np.ndarray | None = None, version: str = ""
    ) -> Graph:
        """Build from external-id edge arrays; self loops and duplicates are dropped.

        `members` adds isolated members that have no edge.
        """
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        parts = [src, dst] if members is None else [src, dst, np.asarray(members, np.int64)]
        ids = (
            _distinct(np.concatenate(parts))
            if parts[0].size or len(parts) > 2
            else np.zeros(0, np.int64)
        )
        if ids.size > MAX_MEMBERS:
            raise ValueError(f"{ids.size:,} members: a graph holds at most {MAX_MEMBERS:,}")
        keep = src != dst
        a = np.searchsorted(ids, src[keep])
        b = np.searchsorted(ids, dst[keep])
        n = ids.size
        both_a = np.concatenate([a, b])
        both_b = np.concatenate([b, a])
        key = _distinct(both_a.astype(np.int64) * n + both_b)
        rows = key // max(n, 1)
        cols = (key % max(n, 1)).astype(np.int32)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        return cls(ids=ids, indptr=indptr, indices=cols, version=version or _stamp(ids, cols))

    # ---- basic access ------------------------------------------------------------------
    @property
    def version(self) -> str:
        return self._version

    @property
    def ids(self) -> np.ndarray:
        """int64 external ids, sorted: ids[i] is the member at dense index i."""
        ov = self._ov
        if ov is None or not ov.new_ids.size:
            return self._base.ids
        ids = self._cache.get("ids")
        if ids is None:
            ids = self._cache["ids"] = np.concatenate([self._base.ids, ov.new_ids])
        return ids

    @property
    def indptr(self) -> np.ndarray:
        """int64 row offsets into `indices` (merged on first use when there is an overlay)."""
        return self._base.indptr if self._ov is None else self._merged()[0]

    @property
    def indices(self) -> np.ndarray:
        """int32 dense neighbour indices, sorted within each row (merged like `indptr`)."""
        return self._base.indices if self._ov is None else self._merged()[1]

    @property
    def n(self) -> int:
        return self._base.n + (0 if self._ov is None else int(self._ov.new_ids.size))

    @property
    def edge_count(self) -> int:
        return int(self._base.indices.size if self._ov is None else self._ov.entries) // 2

    @property
    def degree(self) -> np.ndarray:
        ov = self._ov
        if ov is None:
            return self._base.degree
        deg = self._cache.get("degree")
        if deg is None:
            deg = np.zeros(self.n, dtype=np.int64)
            deg[: self._base.n] = self._base.degree
            deg[ov.rows] = np.diff(ov.indptr)
            self._cache["degree"] = deg
        return deg

    @property
    def changed_rows(self) -> np.ndarray:
        """Dense rows whose adjacency differs from the snapshot's (sorted; new members too)."""
        return np.zeros(0, np.int64) if self._ov is None else self._ov.rows

    def shares_snapshot(self, other: Graph) -> bool:
        """True when both graphs are the same snapshot with (maybe) different overlays."""
        return self._base is other._base

    def index_of(self, member: int) -> int:
        """Dense index of a member, or -1 when it is not in the graph."""
        ids = self.ids
        i = int(np.searchsorted(ids, member))
        return i if i < ids.size and ids[i] == member else -1

    def indices_of(self, members: np.ndarray) -> np.ndarray:
        """Dense indices of many members; -1 where a member is unknown."""
        members = np.asarray(members, dtype=np.int64)
        ids = self.ids
        if ids.size == 0:
            return np.full(members.shape, -1, dtype=np.int64)
        pos = np.searchsorted(ids, members)
        pos_c = np.minimum(pos, ids.size - 1)
        return np.where(ids[pos_c] == members, pos_c, -1)

    def neighbors(self, i: int) -> np.ndarray:
        ov = self._ov
        if ov is not None:
            j = int(np.searchsorted(ov.rows, i))
            if j < ov.rows.size and ov.rows[j] == i:
                return ov.indices[ov.indptr[j] : ov.indptr[j + 1]]
        base = self._base
        return base.indices[base.indptr[i] : base.indptr[i + 1]]

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Each undirected edge once, as external ids (u < v by dense index)."""
        indices = self.indices
        rows = np.repeat(np.arange(self.n, dtype=np.int64), self.degree)
        mask = rows < indices
        return self.ids[rows[mask]], self.ids[indices[mask]]

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated neighbour lists of `rows`: (owner position in rows, neighbour index)."""
        rows = np.asarray(rows, dtype=np.int64)
        base, ov = self._base, self._ov
        hit: np.ndarray | None = None
        if ov is not None:
            hit, slot = ov.find(rows)
            if not hit.any():
                hit = None
        if hit is None:
            starts = base.indptr[rows]
            lens = base.indptr[rows + 1] - starts
        else:
            assert ov is not None
            at = np.where(hit, 0, rows)  # rows of new members are always overlay rows
            first = base.indptr[at]
            starts = np.where(hit, ov.indptr[slot] + base.indices.size, first)
            lens = np.where(hit, ov.indptr[slot + 1] - ov.indptr[slot],
                            base.indptr[np.minimum(at + 1, base.n)] - first)  # fmt: skip
        total = int(lens.sum())
        owner = np.repeat(np.arange(rows.size, dtype=np.int64), lens)
        offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
        pos = np.repeat(starts, lens) + offsets
        if hit is None:
            return owner, base.indices[pos]
        assert ov is not None
        out = np.empty(total, dtype=base.indices.dtype)
        in_base = pos < base.indices.size
        out[in_base] = base.indices[pos[in_base]]
        out[~in_base] = ov.indices[pos[~in_base] - base.indices.size]
        return owner, out

    def _merged(self) -> tuple[np.ndarray, np.ndarray]:
        """The overlay folded into one CSR (cached): what a fresh `from_edges` would hold."""
        indptr, indices = self._cache.get("indptr"), self._cache.get("indices")
        if indptr is not None and indices is not None:
            return indptr, indices
        base, ov = self._base, self._ov
        assert ov is not None
        indptr = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(self.degree, out=indptr[1:])
        indices = np.empty(int(indptr[-1]), dtype=base.indices.dtype)
        previous = 0  # the first base row not copied yet
        for j, r in enumerate(ov.rows.tolist()):
            stop = min(r, base.n)
            if stop > previous:  # base rows previous..stop-1 are unchanged
                indices[indptr[previous] : indptr[stop]] = base.indices[
                    base.indptr[previous] : base.indptr[stop]
                ]
            indices[indptr[r] : indptr[r + 1]] = ov.indices[ov.indptr[j] : ov.indptr[j + 1]]
            previous = max(stop, min(r + 1, base.n))
        if previous < base.n:
            indices[indptr[previous] : indptr[base.n]] = base.indices[base.indptr[previous] :]
        self._cache["indptr"], self._cache["indices"] = indptr, indices
        return indptr, indices

    def compacted(self, version: str = "") -> Graph:
        """The same graph without an overlay: its own merged arrays (a new snapshot)."""
        return Graph(self.ids, self.indptr, self.indices, version or self.version)

    def snapshot_graph(self, version: str = "") -> Graph:
        """The snapshot this graph was derived from, without the overlay (no copy)."""
        return Graph._derived(self._base, None, version or self.version.split("+", 1)[0])

    # ---- nearline changes ---------------------------------------------------------------
    def with_edges(self, pairs: np.ndarray, present: np.ndarray, version: str = "") -> Graph:
        """A new graph with each (u, v) pair of external ids made an edge (present) or not.

        A pair listed twice takes its last state; unknown members are added, and members
        keep their place even when they lose every edge. The new graph shares this one's
        arrays: only the adjacency of the members the pairs touch is rebuilt, into the
        overlay. Members whose ids are larger than every member's are appended; an unknown
        id in between the known ones changes every dense index after it, so that rebuilds
        the whole graph.
        """
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        present = np.asarray(present, dtype=bool).reshape(-1)
        if pairs.shape[0] != present.size:
            raise ValueError(f"{pairs.shape[0]} pairs but {present.size} states")
        version = version or self.version
        keep = pairs[:, 0] != pairs[:, 1]
        lo = np.minimum(pairs[keep, 0], pairs[keep, 1])
        hi = np.maximum(pairs[keep, 0], pairs[keep, 1])
        present = present[keep]
        if not lo.size:
            return Graph._derived(self._base, self._ov, version)
        ends = np.concatenate([lo, hi])
        dense = self.indices_of(ends)
        unknown = _distinct(ends[dense < 0])
        n = self.n
        if unknown.size and n and unknown[0] <= self.ids[-1]:
            return self._rebuilt(lo, hi, present, version)
        if n + unknown.size > MAX_MEMBERS:
            raise ValueError(f"a graph holds at most {MAX_MEMBERS:,} members")
        dense[dense < 0] = n + np.searchsorted(unknown, ends[dense < 0])
        size = np.int64(n + unknown.size)
        key = dense[: lo.size] * size + dense[lo.size :]
        # Last state per pair: unique over the reversed changes keeps the latest.
        last, first = np.unique(key[::-1], return_index=True)
        on = present[::-1][first]
        a, b = last // size, last % size
        touched = _distinct(np.concatenate([a, b]))
        known = touched[touched < n]
        owner, nbr = self.gather(known)
        current = known[owner] * size + nbr
        change = np.concatenate([last, b * size + a])  # both directions of each pair
        change_on = np.concatenate([on, on])
        current = current[~np.isin(current, change)]
        keys = np.concatenate([current, change[change_on]])
        keys.sort()  # the touched rows' new adjacency, row by row
        ov, base = self._ov, self._base
        t_rows = keys // size
        t_vals = (keys % size).astype(base.indices.dtype)
        t_lens = np.searchsorted(t_rows, touched, "right") - np.searchsorted(t_rows, touched)
        if ov is None:
            rows, lens, indices, new_ids = touched, t_lens, t_vals, unknown
        else:
            # The previous overlay's rows that this batch did not touch stay as they were;
            # each touched row's entries go in after the kept rows before it (no re-sort).
            old_lens = np.diff(ov.indptr)
            kept = ~_sorted_isin(ov.rows, touched)
            kept_rows, kept_lens = ov.rows[kept], old_lens[kept]
            kept_ends = np.zeros(kept_rows.size + 1, dtype=np.int64)
            np.cumsum(kept_lens, out=kept_ends[1:])
            at = kept_ends[np.searchsorted(kept_rows, touched)]
            indices = np.insert(ov.indices[np.repeat(kept, old_lens)], np.repeat(at, t_lens),
                                t_vals)  # fmt: skip
            rows = np.concatenate([kept_rows, touched])
            order = np.argsort(rows, kind="stable")
            rows, lens = rows[order], np.concatenate([kept_lens, t_lens])[order]
            new_ids = np.concatenate([ov.new_ids, unknown])
        indptr = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(lens, out=indptr[1:])
        old_rows = rows[rows < base.n]
        entries = base.indices.size - int(base.degree[old_rows].sum()) + indices.size
        overlay = _Overlay(rows, indptr, indices, new_ids, entries)
        return Graph._derived(base, overlay, version)

    def _rebuilt(self, lo: np.ndarray, hi: np.ndarray, present: np.ndarray, version: str) -> Graph:
        """with_edges by a full rebuild: for members whose ids fall between known ones."""
        src, dst = self.edges()  # (lo, hi) by id: dense order is id order
        ids = _distinct(np.concatenate([self.ids, lo, hi]))
        n = np.int64(ids.size)
        old_key = np.searchsorted(ids, src) * n + np.searchsorted(ids, dst)
        new_key = np.searchsorted(ids, lo) * n + np.searchsorted(ids, hi)
        # Last state per pair: unique over the reversed changes keeps the latest.
        last_key, first = np.unique(new_key[::-1], return_index=True)
        last_on = present[::-1][first]
        kept = old_key[~np.isin(old_key, last_key)]
        keys = np.concatenate([kept, last_key[last_on]])
        return Graph.from_edges(ids[keys // n], ids[keys % n], members=ids, version=version)

    # ---- serialisation (numpy arrays only, never pickle) ---------------------------------
    # A snapshot is one file (or one byte string): an 8-byte magic, the length of a JSON
    # header, the header (padded to 64 bytes) and each array, little-endian, at a 64-byte
    # aligned offset. The same bytes go to Redis in chunks and to the machine's snapshot
    # file, which every process maps read-only (`Graph.open`).
    def serialised(self) -> list[memoryview]:
        """The snapshot's bytes as consecutive pieces (views of the arrays, not copies)."""
        arrays = [("ids", self.ids, "<i8"), ("indptr", self.indptr, "<i8"),
                  ("indices", self.indices, "<i4")]  # fmt: skip
        table, offset, data = [], 0, []
        for name, arr, dtype in arrays:
            arr = np.ascontiguousarray(arr, dtype=dtype)
            table.append([name, dtype, int(arr.size), offset])
            data.append(arr)
            offset += _aligned(arr.nbytes)
        header = json.dumps(
            {"format": _FORMAT, "members": self.n, "edges": self.edge_count, "arrays": table},
            sort_keys=True, separators=(",", ":"),
        ).encode()  # fmt: skip
        header += b" " * (_aligned(len(_MAGIC) + 8 + len(header)) - len(_MAGIC) - 8 - len(header))
        pieces = [memoryview(_MAGIC + len(header).to_bytes(8, "little") + header)]
        for arr in data:
            pieces.append(arr.data.cast("B"))
            if _aligned(arr.nbytes) > arr.nbytes:
                pieces.append(memoryview(bytes(_aligned(arr.nbytes) - arr.nbytes)))
        return pieces

    def to_bytes(self) -> bytes:
        return b"".join(self.serialised())

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray | memoryview | mmap.mmap, version: str = ""
    ) -> Graph:
        """A graph over `data` (zero copy: its arrays are read-only views of the buffer)."""
        if bytes(data[:2]) == b"PK":  # a snapshot of edgeflow before 0.x: np.savez
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return cls(z["ids"], z["indptr"], z["indices"], version)
        return cls(*_parse(data), version=version)

    @classmethod
    def open(cls, path: Path, version: str = "") -> Graph:
        """Map a snapshot file read-only: the pages are the machine's page cache, shared by
        every process that maps the same file, and read from disk only when touched."""
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise SnapshotError(f"{path}: empty graph snapshot file")
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return cls(*_parse(mapped, str(path)), version=version)
        except SnapshotError:
            with contextlib.suppress(BufferError):  # views made before the error hold it
                mapped.close()
            raise

    def data_hash(self) -> str:
        """Content hash of the graph (ids and adjacency): the training-data hash of a model."""
        h = hashlib.sha256()
        for arr in (self.ids, self.indptr, self.indices):
            h.update(np.ascontiguousarray(arr).data)
        return h.hexdigest()


class SnapshotError(ValueError):
    """A graph snapshot's bytes are not a snapshot (truncated, corrupt, unknown format)."""


_MAGIC = b"EFGRAPH\x01"
_FORMAT = 1
_ALIGN = 64
_DTYPES = {"ids": "<i8", "indptr": "<i8", "indices": "<i4"}


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _parse(
    data: bytes | bytearray | memoryview | mmap.mmap, source: str = "graph snapshot"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, indptr, indices) views of a serialised snapshot, after checking its layout."""
    size = len(data)
    if size < len(_MAGIC) + 8 or bytes(data[: len(_MAGIC)]) != _MAGIC:
        raise SnapshotError(f"{source}: not an edgeflow graph snapshot (bad magic)")
    length = int.from_bytes(bytes(data[len(_MAGIC) : len(_MAGIC) + 8]), "little")
    start = len(_MAGIC) + 8 + length
    if start > size:
        raise SnapshotError(f"{source}: truncated ({size} bytes, header ends at {start})")
    try:
        header = json.loads(bytes(data[len(_MAGIC) + 8 : start]))
        table = {name: (dtype, count, offset) for name, dtype, count, offset in header["arrays"]}
        if header["format"] != _FORMAT or set(table) != set(_DTYPES):
            raise ValueError(f"format {header['format']}, arrays {sorted(table)}")
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"{source}: unreadable header: {exc}") from None
    arrays = []
    for name in ("ids", "indptr", "indices"):
        dtype, count, offset = table[name]
        if dtype != _DTYPES[name]:
            raise SnapshotError(f"{source}: array {name} has dtype {dtype}, not {_DTYPES[name]}")
        end = start + offset + count * np.dtype(dtype).itemsize
        if end > size:
            raise SnapshotError(f"{source}: truncated: array {name} ends at {end} of {size}")
        arrays.append(np.frombuffer(data, dtype=dtype, count=count, offset=start + offset))
    ids, indptr, indices = arrays
    if (
        indptr.size != ids.size + 1
        or int(indptr[0]) != 0
        or int(indptr[-1]) != indices.size
        or header["members"] != ids.size
        or header["edges"] * 2 != indices.size
    ):
        raise SnapshotError(f"{source}: inconsistent arrays for {header['members']} members")
    return ids, indptr, indices


def _distinct(values: np.ndarray) -> np.ndarray:
    """np.unique(values) by sorting: numpy 2's hashing np.unique is several times slower on
    the millions of int64 keys of a graph build."""
    out = np.sort(values)
    if out.size < 2:
        return out
    keep = np.empty(out.size, dtype=bool)
    keep[0] = True
    np.not_equal(out[1:], out[:-1], out=keep[1:])
    return out[keep]


def _stamp(ids: np.ndarray, indices: np.ndarray) -> str:
    digest = hashlib.sha256(ids.tobytes() + indices.tobytes()).hexdigest()[:12]
    return f"{time.time_ns() // 1_000_000}-{digest}"  # unique per ingest: deltas key on it


# ---- edge lists ---------------------------------------------------------------------------
@dataclass(frozen=True)
class EdgeList:
    """A parsed edge list: every edge line's pair in file order, and what the graph sets
    aside. `Graph.from_edges` drops self loops and repeated pairs; this says how many there
    were and where the first of each is, so nothing is dropped without a word."""

    source: str
    src: np.ndarray  # int64, one per edge line
    dst: np.ndarray  # int64
    edge_lines: int = 0
    self_loops: int = 0  # lines `u u`
    first_self_loop: int = 0  # line number, 0 when there is none
    loop_only_members: int = 0  # members named only in self loops: kept, without an edge
    duplicates: int = 0  # lines repeating an earlier pair, in either order
    first_duplicate: int = 0
    extra_columns: int = 0  # lines with more than two columns (the rest is not read)
    first_extra_columns: int = 0

    @property
    def edges(self) -> int:
        """Distinct edges between two different members: what the graph keeps."""
        return self.edge_lines - self.self_loops - self.duplicates

    def notes(self) -> list[str]:
        """One sentence per kind of line that was dropped or only partly read."""
        out = []
        if self.self_loops:
            alone = self.loop_only_members
            out.append(
                f"dropped {_count(self.self_loops, 'self loop')} (first on line "
                f"{self.first_self_loop}): a member is not a connection of itself"
                + (
                    f"; {_count(alone, 'member')} named only in self loops "
                    f"{'is' if alone == 1 else 'are'} kept, without an edge"
                    if alone
                    else ""
                )
            )
        if self.duplicates:
            out.append(
                f"dropped {_count(self.duplicates, 'duplicate edge')} (first on line "
                f"{self.first_duplicate}): the graph is undirected, so a pair listed again, "
                "in either order, is the same edge"
            )
        if self.extra_columns:
            out.append(
                f"ignored the columns after the first two on {_count(self.extra_columns, 'line')} "
                f"(first on line {self.first_extra_columns}): only the two member ids are read; "
                "weights, times and other columns are not used"
            )
        return out

    def require_edges(self) -> None:
        """Raise EdgeFileError, naming the file, when no edge between two members is left."""
        if self.edges > 0:
            return
        if not self.edge_lines:
            why = "it has no edge lines (only comments and blank lines, or nothing)"
        else:
            why = (
                f"its {_count(self.edge_lines, 'edge line')} "
                f"{'is a self loop' if self.edge_lines == 1 else 'are all self loops'} "
                f"(first on line {self.first_self_loop}), which the graph drops"
            )
        raise EdgeFileError(
            f"{self.source}: no edges: {why}; a graph needs at least one `member member` "
            "line with two different members"
        )


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def parse_edge_list(lines: Iterable[str], source: str = "<edges>") -> EdgeList:
    """Parse a whitespace-separated edge list: `u v`, `#` comments, blank lines.

    Member ids must be non-negative integers that fit int64; errors name the line. Columns
    after the first two are not read, and the result counts the lines that had them, the self
    loops and the repeated pairs, each with its first line number.
    """
    src: list[int] = []
    dst: list[int] = []
    at: list[int] = []
    extra, first_extra = 0, 0
    for lineno, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) < 2:
            raise EdgeFileError(
                f"{source}:{lineno}: expected two member ids separated by whitespace, "
                f"got {raw.strip()!r}"
            )
        try:
            u, v = int(parts[0]), int(parts[1])
        except ValueError:
            raise EdgeFileError(
                f"{source}:{lineno}: member ids must be integers, got {parts[0]!r} {parts[1]!r}"
            ) from None
        if u < 0 or v < 0 or u >= 2**63 or v >= 2**63:
            raise EdgeFileError(
                f"{source}:{lineno}: member ids must be non-negative 64-bit integers, got {u} {v}"
            )
        if len(parts) > 2:
            extra += 1
            first_extra = first_extra or lineno
        src.append(u)
        dst.append(v)
        at.append(lineno)
    s, d = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    line_of = np.asarray(at, dtype=np.int64)
    loop = s == d
    pair_line = line_of[~loop]
    lo, hi = np.minimum(s, d)[~loop], np.maximum(s, d)[~loop]
    order = np.lexsort((pair_line, hi, lo))  # by pair, then line: a pair's first line leads
    repeat = np.zeros(order.size, dtype=bool)
    repeat[1:] = (lo[order][1:] == lo[order][:-1]) & (hi[order][1:] == hi[order][:-1])
    repeat_lines = pair_line[order][repeat]
    linked = np.concatenate([s[~loop], d[~loop]])
    loop_only = np.setdiff1d(s[loop], linked).size
    return EdgeList(
        source=source,
        src=s,
        dst=d,
        edge_lines=int(s.size),
        self_loops=int(loop.sum()),
        first_self_loop=int(line_of[loop].min()) if loop.any() else 0,
        loop_only_members=int(loop_only),
        duplicates=int(repeat_lines.size),
        first_duplicate=int(repeat_lines.min()) if repeat_lines.size else 0,
        extra_columns=extra,
        first_extra_columns=first_extra,
    )


def parse_edge_lines(
    lines: Iterable[str], source: str = "<edges>"
) -> tuple[np.ndarray, np.ndarray]:
    """The (src, dst) pairs of `parse_edge_list`, self loops and repeats included."""
    parsed = parse_edge_list(lines, source)
    return parsed.src, parsed.dst


def read_edge_list(path: Path) -> EdgeList:
    """Parse an edge file; EdgeFileError names the file (and the line) when it is missing,
    not text, malformed, or has no edge between two different members."""
    try:
        with open(path, encoding="utf-8") as fh:
            parsed = parse_edge_list(fh, source=str(path))
    except FileNotFoundError:
        raise EdgeFileError(f"{path}: edge file not found") from None
    except UnicodeDecodeError as exc:
        raise EdgeFileError(f"{path}: not a text edge list ({exc.reason})") from None
    parsed.require_edges()
    return parsed


def read_edge_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The (src, dst) pairs of `read_edge_list`."""
    parsed = read_edge_list(path)
    return parsed.src, parsed.dst


def split_edges(
    src: np.ndarray, dst: np.ndarray, holdout: float, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Hide a random `holdout` share of the unique undirected edges: (kept, hidden)."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be between 0 and 1, got {holdout}")
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    keep = lo != hi
    pairs = np.unique(np.stack([lo[keep], hi[keep]], axis=1), axis=0)
    rng = np.random.default_rng(seed)
    hidden = rng.random(pairs.shape[0]) < holdout
    kept_pairs, hidden_pairs = pairs[~hidden], pairs[hidden]
    return (kept_pairs[:, 0], kept_pairs[:, 1]), (hidden_pairs[:, 0], hidden_pairs[:, 1])


# ---- measures shared by candidate generation, features and training --------------------------
def inverse_log_degree(graph: Graph) -> np.ndarray:
    """Adamic-Adar weight of each member as an intermediate: 1 / log(degree) (0 for degree < 2)."""
    deg = graph.degree.astype(np.float64)
    out = np.zeros_like(deg)
    np.divide(1.0, np.log(np.maximum(deg, 2.0)), out=out, where=deg > 1)
    return out


def top_positions(score: np.ndarray, limit: int) -> np.ndarray:
    """Positions of the `limit` highest scores (in no order), ties at the cut going to the
    lowest positions: with positions in id order, every executor cuts a ranking by
    (score, then lowest id) alike, whatever a partial sort would choose among ties."""
    if limit >= score.size:
        return np.arange(score.size)
    if limit <= 0:
        return np.zeros(0, dtype=np.intp)
    cut = -np.partition(-score, limit - 1)[limit - 1]
    above = np.flatnonzero(score > cut)
    tied = np.flatnonzero(score == cut)[: limit - above.size]
    return np.concatenate([above, tied])


def friends_of_friends(
    graph: Graph,
    i: int,
    limit: int,
    weights: np.ndarray | None = None,
    via: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top `limit` friends of friends of dense member i, excluding i and its connections.

    Returns (candidate dense indices, common-neighbour counts, ranking score). The score is
    the weighted count when `weights` (per intermediate member, e.g. inverse_log_degree) is
    given and the plain count otherwise. They are ordered by score, then lowest id, and a
    limit keeps the first `limit` of that order, as the batch runner's TwoHop does.
    `via` (sorted dense indices, a subset of i's connections, e.g. `expansion_budget`'s)
    expands only those intermediates; counts and scores are then over them alone.
    """
    nbrs = graph.neighbors(i)
    empty = np.zeros(0, dtype=np.int64)
    if nbrs.size == 0 or limit <= 0:
        return empty, empty.astype(np.float32), empty.astype(np.float32)
    hop = nbrs if via is None else via
    owner, fof = graph.gather(hop)
    w = None if weights is None else weights[hop][owner]
    if fof.size * 8 > graph.n:
        # Dense counting beats sorting once the two-hop frontier is a fair share of the graph.
        dense = np.bincount(fof, minlength=graph.n)
        uniq = np.flatnonzero(dense)
        counts = dense[uniq].astype(np.float32)
        score = counts if w is None else np.bincount(fof, weights=w, minlength=graph.n)[uniq]
    else:
        uniq, inverse = np.unique(fof, return_inverse=True)
        counts = np.bincount(inverse, minlength=uniq.size).astype(np.float32)
        score = counts if w is None else np.bincount(inverse, weights=w, minlength=uniq.size)
    score = score.astype(np.float32)
    keep = (uniq != i) & ~_sorted_isin(uniq, nbrs)
    uniq, counts, score = uniq[keep], counts[keep], score[keep]
    if uniq.size > limit:
        # Candidates tied at the cut (one shared connection gives many the same score) go
        # by id, as the batch runner cuts: uniq ascends.
        top = top_positions(score, limit)
        uniq, counts, score = uniq[top], counts[top], score[top]
    order = np.lexsort((uniq, -score))
    return uniq[order].astype(np.int64), counts[order], score[order]


@dataclass(frozen=True)
class Expansion:
    """Which of a member's connections a two-hop expansion walks, and at what cost."""

    via: np.ndarray | None  # sorted dense indices to expand; None: every connection
    visits: int  # neighbour-list entries the expansion reads
    full_visits: int  # what expanding every connection would read
    expanded: int  # connections expanded
    connections: int  # connections in all

    @property
    def capped(self) -> bool:
        return self.via is not None


def expansion_budget(graph: Graph, i: int, max_visits: int) -> Expansion:
    """Bound the two-hop expansion of dense member i to about `max_visits` neighbour visits.

    Below the budget (or with `max_visits` 0) every connection is expanded, and
    friends_of_friends gives exactly its unbounded answer. Above it, the connections are
    expanded least-connected first, as many as fit (at least one): a hub's best-connected
    connections cost the most visits and, weighted by Adamic-Adar, say the least about any
    one candidate. Deterministic: ties go to the lower index.
    """
    nbrs = graph.neighbors(i)
    deg = graph.degree[nbrs]
    full = int(deg.sum())
    if max_visits <= 0 or full <= max_visits:
        return Expansion(None, full, full, int(nbrs.size), int(nbrs.size))
    order = np.lexsort((nbrs, deg))  # by degree, then index
    fits = int(np.searchsorted(np.cumsum(deg[order]), max_visits, side="right"))
    chosen = order[: max(fits, 1)]
    via = np.sort(nbrs[chosen])
    return Expansion(via, int(deg[chosen].sum()), full, int(via.size), int(nbrs.size))


def _sorted_isin(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if sorted_set.size == 0:
        return np.zeros(values.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_set, values), sorted_set.size - 1)
    return sorted_set[pos] == values


def mutual_connections(
    graph: Graph, i: int, cands: np.ndarray, most: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The connections dense member i shares with each dense candidate (-1: unknown).

    Returns (count per candidate, then the first `most` shared connections of each, lowest
    index first, as (candidate position, dense index) pairs grouped by candidate). It walks
    the candidates' neighbour lists once, so it suits a short list (a response's top K).
    """
    cands = np.asarray(cands, dtype=np.int64)
    counts = np.zeros(cands.size, dtype=np.int64)
    none = np.zeros(0, dtype=np.int64)
    rows = np.flatnonzero(cands >= 0)
    if i < 0 or not rows.size:
        return counts, none, none
    owner, nb = graph.gather(cands[rows])
    shared = _sorted_isin(nb, graph.neighbors(i))
    owner, nb = rows[owner[shared]], nb[shared].astype(np.int64)
    order = np.lexsort((nb, owner))
    owner, nb = owner[order], nb[order]
    counts += np.bincount(owner, minlength=cands.size)
    rank = np.arange(owner.size) - np.searchsorted(owner, owner)  # place within its candidate
    first = rank < most
    return counts, owner[first], nb[first]


PAIR_COLUMNS = (
    "common_neighbors",
    "adamic_adar",
    "resource_allocation",
    "jaccard",
    "log_pref_attachment",
)


def pair_measures(graph: Graph, i: int, cands: np.ndarray, inv_log_deg: np.ndarray) -> np.ndarray:
    """Request-time pair measures between dense member i and dense candidates (-1 = unknown).

    Returns a (len(cands), len(PAIR_COLUMNS)) float32 matrix in PAIR_COLUMNS order.
    """
    cands = np.asarray(cands, dtype=np.int64)
    out = np.zeros((cands.size, len(PAIR_COLUMNS)), dtype=np.float32)
    known = cands >= 0
    if i < 0 or not known.any():
        return out
    deg = graph.degree
    rows = np.flatnonzero(known)
    cn, aa, ra = _shared_sums(graph, i, cands[rows], inv_log_deg)
    du, dv = float(deg[i]), deg[cands[rows]].astype(np.float64)
    union = du + dv - cn
    jac = np.divide(cn, union, out=np.zeros_like(cn), where=union > 0)
    out[rows, 0] = cn
    out[rows, 1] = aa
    out[rows, 2] = ra
    out[rows, 3] = jac
    out[rows, 4] = np.log1p(du * dv)
    return out


def pair_measures_work(graph: Graph, i: int, cands: np.ndarray) -> int:
    """About how many neighbour-list entries pair_measures(graph, i, cands, ...) reads: the
    smaller of i's two-hop neighbourhood and the candidates' neighbour lists (see
    _shared_sums), plus one per candidate. O(degree + candidates) to find out."""
    cands = np.asarray(cands, dtype=np.int64)
    if i < 0:
        return int(cands.size)
    deg = graph.degree
    known = cands[cands >= 0]
    walk = min(int(deg[graph.neighbors(i)].sum()), int(deg[known].sum()))
    return walk + int(cands.size)


def _shared_sums(
    graph: Graph, i: int, cands: np.ndarray, inv_log_deg: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Common-neighbour count, Adamic-Adar and resource-allocation sums of member i with each
    candidate (float64).

    It walks whichever side has fewer edges: i's two-hop neighbourhood (usually ten times
    smaller than the candidates' neighbour lists) or the candidates' neighbour lists. Either
    way each candidate's terms are added one by one in ascending order of the shared
    neighbour, so both walks, and the offline job's sparse products, give the same bits.
    """
    deg = graph.degree
    nbrs = graph.neighbors(i)
    back: np.ndarray | None = None
    if int(deg[nbrs].sum()) <= int(deg[cands].sum()):
        owner, slot = graph.gather(nbrs)
        via = nbrs[owner]
        if graph.n <= 8 * slot.size:  # count into every member, then read the candidates
            size, back = graph.n, cands
        else:  # a large graph: count into the (unique) candidates only
            uniq, back = np.unique(cands, return_inverse=True)
            pos = np.minimum(np.searchsorted(uniq, slot), uniq.size - 1)
            hit = uniq[pos] == slot
            size, slot, via = uniq.size, pos[hit], via[hit]
    else:
        mine = np.zeros(graph.n, dtype=bool)
        mine[nbrs] = True
        slot, nb = graph.gather(cands)
        hit = mine[nb]
        size, slot, via = cands.size, slot[hit], nb[hit]
    cn = np.bincount(slot, minlength=size).astype(np.float64)
    aa = np.bincount(slot, weights=inv_log_deg[via], minlength=size)
    ra = np.bincount(slot, weights=1.0 / np.maximum(deg[via], 1), minlength=size)
    if back is None:
        return cn, aa, ra
    return cn[back], aa[back], ra[back]
