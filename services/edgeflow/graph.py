"""The member graph: an undirected CSR adjacency over dense indices, plus graph measures.

Members keep their external int64 ids; `ids` is sorted, so a member's dense index is a
binary search away. Every measure here is vectorised: a request touches numpy, not Python
loops, and training and serving call the very same functions.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class EdgeFileError(ValueError):
    """A malformed edge list; the message names the file and the line."""


@dataclass(frozen=True)
class Graph:
    ids: np.ndarray  # int64, sorted external member ids
    indptr: np.ndarray  # int64, len n+1
    indices: np.ndarray  # int32 dense neighbour indices, sorted within each row
    version: str = ""

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
            np.unique(np.concatenate(parts))
            if parts[0].size or len(parts) > 2
            else np.zeros(0, np.int64)
        )
        keep = src != dst
        a = np.searchsorted(ids, src[keep])
        b = np.searchsorted(ids, dst[keep])
        n = ids.size
        both_a = np.concatenate([a, b])
        both_b = np.concatenate([b, a])
        key = np.unique(both_a.astype(np.int64) * n + both_b)
        rows = key // max(n, 1)
        cols = (key % max(n, 1)).astype(np.int32)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        return cls(ids=ids, indptr=indptr, indices=cols, version=version or _stamp(ids, cols))

    # ---- basic access ------------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.ids.size)

    @property
    def edge_count(self) -> int:
        return int(self.indices.size // 2)

    @property
    def degree(self) -> np.ndarray:
        return np.diff(self.indptr)

    def index_of(self, member: int) -> int:
        """Dense index of a member, or -1 when it is not in the graph."""
        i = int(np.searchsorted(self.ids, member))
        return i if i < self.n and self.ids[i] == member else -1

    def indices_of(self, members: np.ndarray) -> np.ndarray:
        """Dense indices of many members; -1 where a member is unknown."""
        members = np.asarray(members, dtype=np.int64)
        if self.n == 0:
            return np.full(members.shape, -1, dtype=np.int64)
        pos = np.searchsorted(self.ids, members)
        pos_c = np.minimum(pos, self.n - 1)
        return np.where(self.ids[pos_c] == members, pos_c, -1)

    def neighbors(self, i: int) -> np.ndarray:
        return self.indices[self.indptr[i] : self.indptr[i + 1]]

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Each undirected edge once, as external ids (u < v by dense index)."""
        rows = np.repeat(np.arange(self.n, dtype=np.int64), self.degree)
        mask = rows < self.indices
        return self.ids[rows[mask]], self.ids[self.indices[mask]]

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated neighbour lists of `rows`: (owner position in rows, neighbour index)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = self.indptr[rows]
        lens = self.indptr[rows + 1] - starts
        total = int(lens.sum())
        owner = np.repeat(np.arange(rows.size, dtype=np.int64), lens)
        offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
        return owner, self.indices[np.repeat(starts, lens) + offsets]

    def with_edges(self, pairs: np.ndarray, present: np.ndarray, version: str = "") -> Graph:
        """A new graph with each (u, v) pair of external ids made an edge (present) or not.

        A pair listed twice takes its last state; unknown members are added, and members
        keep their place even when they lose every edge.
        """
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        present = np.asarray(present, dtype=bool).reshape(-1)
        if pairs.shape[0] != present.size:
            raise ValueError(f"{pairs.shape[0]} pairs but {present.size} states")
        keep = pairs[:, 0] != pairs[:, 1]
        lo = np.minimum(pairs[keep, 0], pairs[keep, 1])
        hi = np.maximum(pairs[keep, 0], pairs[keep, 1])
        present = present[keep]
        if lo.size and (self.indices_of(lo) >= 0).all() and (self.indices_of(hi) >= 0).all():
            return self._patched(self.indices_of(lo), self.indices_of(hi), present, version)
        src, dst = self.edges()  # (lo, hi) by id: dense order is id order
        ids = np.unique(np.concatenate([self.ids, lo, hi]))
        n = np.int64(ids.size)
        old_key = np.searchsorted(ids, src) * n + np.searchsorted(ids, dst)
        new_key = np.searchsorted(ids, lo) * n + np.searchsorted(ids, hi)
        # Last state per pair: unique over the reversed changes keeps the latest.
        last_key, first = np.unique(new_key[::-1], return_index=True)
        last_on = present[::-1][first]
        kept = old_key[~np.isin(old_key, last_key)]
        keys = np.concatenate([kept, last_key[last_on]])
        return Graph.from_edges(ids[keys // n], ids[keys % n], members=ids, version=version)

    def _patched(self, a: np.ndarray, b: np.ndarray, present: np.ndarray, version: str) -> Graph:
        """Rewrite only the rows the changes touch (known members): a copy, not a rebuild."""
        rows: dict[int, set[int]] = {}
        for u, v, on in zip(a.tolist(), b.tolist(), present.tolist(), strict=True):
            for x, y in ((u, v), (v, u)):
                nbrs = rows.get(x)
                if nbrs is None:
                    nbrs = rows[x] = set(self.neighbors(x).tolist())
                if on:
                    nbrs.add(y)
                else:
                    nbrs.discard(y)
        degree = self.degree.copy()
        pieces: list[np.ndarray] = []
        previous = 0
        for r in sorted(rows):
            new = np.asarray(sorted(rows[r]), dtype=self.indices.dtype)
            pieces += [self.indices[self.indptr[previous] : self.indptr[r]], new]
            degree[r] = new.size
            previous = r + 1
        pieces.append(self.indices[self.indptr[previous] :])
        indptr = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(degree, out=indptr[1:])
        return Graph(self.ids, indptr, np.concatenate(pieces), version or self.version)

    # ---- serialisation (numpy arrays only, never pickle) ---------------------------------
    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, ids=self.ids, indptr=self.indptr, indices=self.indices)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, version: str = "") -> Graph:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(ids=z["ids"], indptr=z["indptr"], indices=z["indices"], version=version)

    def data_hash(self) -> str:
        """Content hash of the graph (ids and adjacency): the training-data hash of a model."""
        h = hashlib.sha256()
        for arr in (self.ids, self.indptr, self.indices):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


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


def friends_of_friends(
    graph: Graph, i: int, limit: int, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top `limit` friends of friends of dense member i, excluding i and its connections.

    Returns (candidate dense indices, common-neighbour counts, ranking score). The score is
    the weighted count when `weights` (per intermediate member, e.g. inverse_log_degree) is
    given and the plain count otherwise. Results are deterministic for a given graph.
    """
    nbrs = graph.neighbors(i)
    empty = np.zeros(0, dtype=np.int64)
    if nbrs.size == 0 or limit <= 0:
        return empty, empty.astype(np.float32), empty.astype(np.float32)
    owner, fof = graph.gather(nbrs)
    w = None if weights is None else weights[nbrs][owner]
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
        top = np.argpartition(-score, limit - 1)[:limit]
        uniq, counts, score = uniq[top], counts[top], score[top]
    order = np.lexsort((uniq, -score))
    return uniq[order].astype(np.int64), counts[order], score[order]


def _sorted_isin(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if sorted_set.size == 0:
        return np.zeros(values.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_set, values), sorted_set.size - 1)
    return sorted_set[pos] == values


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
