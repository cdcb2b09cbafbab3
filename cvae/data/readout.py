"""Read an image back to its five factor classes: the nearest ground-truth image by IoU.

The readout knows nothing of the model. Its candidates are every image the ground truth
has (`GroundTruth.indices()`: the whole 737,280-image grid when rendered, the file's rows
when imported), and an answer reads back as the classes of the candidate(s) with the
highest intersection over union. The search is exact, and prunes only with bounds:

1. an answer that is pixel-identical to a grid image is looked up by hash (IoU 1);
2. otherwise the best IoU found so far starts from `hints` (grid images the caller expects
   to be close; they only make the search faster, never change its result) and rises
   with the best-bounded candidate of each chunk. Candidates are sorted by pixel count,
   and IoU <= min(|a|, |b|) / max(|a|, |b|), so chunks outside an answer's size band are
   skipped. In the band, a matrix product bounds every intersection by the answer's
   pixels in the 8x8 blocks where the candidate has any pixel (IoU <= ub / (|a| + |b| - ub));
   the survivors are bounded again on 4x4 blocks (bit planes of the answer's block counts
   ANDed with the candidate's block bits) and the rest get their exact IoU (popcount of
   the AND of the bit-packed images). Every comparison is of integers or of float64
   ratios of integers up to 8192, so ties are found exactly.

Tie rules, per factor: candidates that are pixel-identical are one answer (a square a
quarter turn apart, orientation 0 and 2*pi): when every nearest candidate is the same
image, every class among them reads back. When the nearest candidates are different
images (a true tie), a factor reads back only if they all share its class; otherwise it
reads back nothing (a miss for every value). An empty image, or one that overlaps no
candidate (best IoU 0), reads back nothing.

Memory: about 600 bytes per candidate (the image bit-packed, block bits, size, classes,
hash): 440 MB for the whole grid, built once per process by `Readout.of` (about 5 s on two
cores, plus rendering the grid). Speed: see docs/bulk.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cvae.data.grid import FACTOR_SIZES, FACTORS, IMAGE_SIZE, index_to_classes
from cvae.rng import GOLDEN, mix

BUILD_CHUNK = 32768  # ground-truth images rendered (or read) at once while indexing
CANDIDATE_CHUNK = 16384  # candidates bounded at once (a (batch, chunk) float32 matrix)
ANSWER_BATCH = 128  # answers searched together (sorted by size: similar bands)
PAIR_CHUNK = 262144  # (answer, candidate) pairs scored exactly at once
SLACK = 1e-6  # float32 bounds are compared this far below the best IoU (kept: a superset)
NEAR = 0.9  # answers whose hints reach this IoU are searched one by one near them (Readout._near)
MAX_CLASSES = max(FACTOR_SIZES.values())
_BUILT: dict = {}  # (generator, official_path) -> Readout: the index Readout.of built last


@dataclass
class ReadBack:
    """What n answer images read back as.

    reads[i, j, c]: class c of factor FACTORS[j] reads back from answer i (the class axis
    is padded to the largest factor); iou[i]: IoU of the nearest ground-truth image (0 for
    an empty answer); images[i]: how many different images are nearest (0: read nothing,
    1: one image, possibly drawn by several classes; more: a tie).
    """

    reads: np.ndarray
    iou: np.ndarray
    images: np.ndarray

    def hits(self, wanted: np.ndarray) -> np.ndarray:
        """(n, 5) bool: whether each wanted class (n, 5; -1 = not asked) reads back."""
        wanted = np.asarray(wanted, dtype=np.int64)
        rows = np.arange(len(wanted))[:, None]
        cols = np.arange(len(FACTORS))[None, :]
        return (wanted >= 0) & self.reads[rows, cols, np.maximum(wanted, 0)]

    def classes(self) -> np.ndarray:
        """(n, 5) the lowest class read back per factor, -1 where nothing reads back."""
        return np.where(self.reads.any(2), self.reads.argmax(2), -1)


class Readout:
    """The nearest-ground-truth readout over a fixed set of candidate images.

    Candidates are stored in order of pixel count (row r is the r-th smallest image), so
    the candidates an answer can still beat its best IoU with (IoU <= min/max of the two
    sizes) form one contiguous range, and whole chunks outside it are skipped.
    """

    def __init__(self, indices: np.ndarray, images_of):
        """`indices`: official indices of the candidates (unique);
        `images_of(indices)`: their (n, 64, 64) 0/1 images."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0:
            raise ValueError("the readout needs at least one ground-truth image")
        if len(np.unique(indices)) != len(indices):
            raise ValueError("readout indices must be unique")
        n = len(indices)
        packed = np.empty((n, IMAGE_SIZE * IMAGE_SIZE // 64), dtype=np.uint64)
        moments = np.empty((n, 2), dtype=np.int64)
        for start in range(0, n, BUILD_CHUNK):
            flat = images_of(indices[start:start + BUILD_CHUNK]).reshape(-1, IMAGE_SIZE * IMAGE_SIZE)
            packed[start:start + BUILD_CHUNK] = _pack(flat != 0)
            moments[start:start + BUILD_CHUNK] = _moments(flat != 0)
        by_size = np.argsort(_popcount(packed), kind="stable")
        self.indices, self.packed = indices[by_size], packed[by_size]
        self.moments = np.ascontiguousarray(moments[by_size].T)  # (2, n): x then y, each contiguous
        del packed, moments
        self.size = _popcount(self.packed)
        self.size_f32 = self.size.astype(np.float32)
        self.coarse = np.empty((n, 1), dtype=np.uint64)  # any pixel in each 8x8 block: one bit each
        self.fine = np.empty((n, 4), dtype=np.uint64)  # any pixel in each 4x4 block
        for start in range(0, n, BUILD_CHUNK):
            part = slice(start, start + BUILD_CHUNK)
            self.coarse[part] = _bits(_block_any(self.packed[part], 8))
            self.fine[part] = _bits(_block_any(self.packed[part], 4))
        self.classes = index_to_classes(self.indices, with_color=False).astype(np.int8)
        self._by_index = np.argsort(self.indices)
        self._sorted_indices = self.indices[self._by_index]
        # Pixel-identical candidates share a group (found by a 64-bit hash of the image, then
        # checked); members of group g: order[start[g]:start[g + 1]], its hash keys[g].
        self._keys, group = np.unique(_hash(self.packed), return_inverse=True)
        self.group = group.reshape(-1)
        self._order = np.argsort(self.group, kind="stable")
        self._start = np.searchsorted(self.group[self._order], np.arange(len(self._keys) + 1))
        first = self._order[self._start[self.group]]
        if (self.packed != self.packed[first]).any(1).any():
            raise RuntimeError("two different ground-truth images share a 64-bit hash")

    @classmethod
    def of(cls, truth) -> Readout:
        """The readout over every image of a `GroundTruth`, built once per process (the
        last one built is kept, per generator and official file)."""
        key = (truth.generator, truth.official_path)
        if key not in _BUILT:
            _BUILT.clear()  # one index at a time: each holds hundreds of MB
            _BUILT[key] = cls(truth.indices(), truth.images)
        return _BUILT[key]

    @property
    def distinct_images(self) -> int:
        return len(self._keys)

    def rows_of(self, indices: np.ndarray) -> np.ndarray:
        """Candidate rows of official indices; -1 for an index that is not a candidate."""
        indices = np.asarray(indices, dtype=np.int64)
        at = np.minimum(np.searchsorted(self._sorted_indices, indices), len(self.indices) - 1)
        return np.where(self._sorted_indices[at] == indices, self._by_index[at], -1)

    # ----------------------------------------------------------------- reading

    def read(self, images: np.ndarray, hints: np.ndarray | None = None) -> ReadBack:
        """Read (n, 64, 64) answer images back; `hints` (n, h) official indices (-1: none)
        of grid images likely to be near each answer, which only speed the search up."""
        flat = np.asarray(images).reshape(len(images), -1) != 0
        n = len(flat)
        hints = np.full((n, 0), -1) if hints is None else np.asarray(hints, np.int64).reshape(n, -1)
        packed = _pack(flat)
        size = _popcount(packed)
        ans, rows = self._on_grid(packed, size)
        search = np.setdiff1d(np.flatnonzero(size > 0), ans)
        floor = self._hint_floor(packed, size, hints, search)
        moments = _moments(flat)
        for i in search[floor[search] >= NEAR]:  # close to a hint: a narrow search of their own
            r = self._near(packed[i], size[i], moments[i], floor[i])
            ans, rows = np.concatenate([ans, np.full(len(r), i)]), np.concatenate([rows, r])
        search = search[floor[search] < NEAR]
        search = search[np.argsort(size[search], kind="stable")]  # batches of similar size
        for start in range(0, len(search), ANSWER_BATCH):
            batch = search[start:start + ANSWER_BATCH]
            a, r = self._search(packed[batch], size[batch], hints[batch])
            ans, rows = np.concatenate([ans, batch[a]]), np.concatenate([rows, r])
        return self._read_back(n, ans, rows, packed, size)

    def _hint_floor(self, packed: np.ndarray, size: np.ndarray, hints: np.ndarray, search: np.ndarray) -> np.ndarray:
        """(n,) the best exact IoU of each searched answer with its hints (0: none): the
        nearest candidate's IoU is at least this."""
        floor = np.zeros(len(packed))
        rows = self.rows_of(np.maximum(hints[search], 0))
        a, k = np.nonzero((hints[search] >= 0) & (rows >= 0))
        if len(a):
            np.maximum.at(floor, search[a], self._iou(packed, size, search[a], rows[a, k]))
        return floor

    def _near(self, packed: np.ndarray, size: int, moments: np.ndarray, floor: float) -> np.ndarray:
        """Rows of the nearest candidates of one answer whose nearest IoU is known to be >= floor
        (a hint reached it). Exact: only candidates that cannot reach the floor are left out, by
        two necessary conditions, then every other one is scored. With f the floor and I the
        intersection, IoU >= f needs f |a| <= |b| <= |a| / f (candidates are sorted by size: one
        range) and I >= f (|a| + |b|) / (1 + f); and since sum_a (x - 31.5) - sum_b (x - 31.5)
        = sum_{a-b} (x - 31.5) - sum_{b-a} (x - 31.5), each |x - 31.5| <= 31.5, the first
        moments of a and b along each axis differ by at most 31.5 (|a| + |b| - 2 I)."""
        f = floor - SLACK
        # Integer keys: a float key would convert the whole size array at every call.
        lo = int(np.searchsorted(self.size, np.int64(np.ceil(f * size - SLACK)), side="left"))
        hi = int(np.searchsorted(self.size, np.int64(np.floor(size / f + SLACK)), side="right"))
        b = self.size[lo:hi]
        room = 63.0 * (size + b - 2 * f * (size + b) / (1 + f)) + SLACK  # twice 31.5 (|a| + |b| - 2 I_min)
        shift = 63 * (size - b)
        keep = np.abs(2 * (moments[0] - self.moments[0, lo:hi]) - shift) <= room
        keep &= np.abs(2 * (moments[1] - self.moments[1, lo:hi]) - shift) <= room
        rows = lo + np.flatnonzero(keep)
        inter = np.bitwise_count(packed[None, :] & self.packed[rows]).sum(1, dtype=np.int64)
        score = inter / (size + self.size[rows] - inter)
        return rows[score == score.max()]  # exact: distinct ratios of ints <= 8192 differ in float64

    def _on_grid(self, packed: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(answer, row) pairs for answers identical to a grid image: that image's group."""
        at = np.minimum(np.searchsorted(self._keys, _hash(packed)), len(self._keys) - 1)
        same = (self.packed[self._order[self._start[at]]] == packed).all(1)
        hit = np.flatnonzero(same & (size > 0))
        first, last = self._start[at[hit]], self._start[at[hit] + 1]
        ans = np.repeat(hit, last - first)
        offsets = np.arange(len(ans)) - np.repeat(np.cumsum(last - first) - (last - first), last - first)
        return ans.astype(np.int64), self._order[np.repeat(first, last - first) + offsets].astype(np.int64)

    def _iou(self, packed: np.ndarray, size: np.ndarray, ans: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact IoU of answer ans[k] with candidate rows[k], float64."""
        inter = np.bitwise_count(packed[ans] & self.packed[rows]).sum(1, dtype=np.int64)
        return inter / (size[ans] + self.size[rows] - inter)

    def _search(self, packed: np.ndarray, size: np.ndarray, hints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(answer, row) pairs of the nearest candidates of non-empty off-grid answers."""
        n = len(packed)
        best = np.zeros(n)
        hint_rows = self.rows_of(np.maximum(hints, 0))
        ok = (hints >= 0) & (hint_rows >= 0)
        if ok.any():
            np.maximum.at(best, np.nonzero(ok)[0], self._iou(packed, size, np.nonzero(ok)[0], hint_rows[ok]))
        coarse = _block_counts(packed, 8).astype(np.float32)  # (n, 64)
        planes = _bit_planes(_block_counts(packed, 4))  # (n, 5, 4) uint64
        found_a, found_r, found_iou = [], [], []
        for start in self._chunk_order(np.median(size)):
            stop = min(start + CANDIDATE_CHUNK, len(self.size))
            # IoU <= min(|a|, |b|) / max(|a|, |b|): answers whose size band misses the chunk skip it.
            floor = np.maximum(best - SLACK, 0)
            live = np.flatnonzero((floor * size <= self.size[stop - 1]) & (floor * self.size[start] <= size))
            if not len(live):
                continue
            # Bound 1, dense: |a & b| <= sum over 8x8 blocks where b has a pixel of a's pixels there.
            blocks = np.unpackbits(self.coarse[start:stop].view(np.uint8), axis=1, bitorder="little")
            ub = blocks.astype(np.float32) @ coarse[live].T  # (chunk, live); integer sums: exact
            np.minimum(ub, self.size_f32[start:stop, None], out=ub)
            ub /= size[live].astype(np.float32) + self.size_f32[start:stop, None] - ub  # IoU bound
            top = start + ub.argmax(0)  # the best-bounded candidate raises the lower bound first
            best[live] = np.maximum(best[live], self._iou(packed, size, live, top))
            r, a = np.nonzero(ub >= np.maximum(best[live] - SLACK, 1e-9))  # ub >= 1 pixel
            a, r = live[a], start + r
            for p in range(0, len(a), PAIR_CHUNK):
                pa_, pr = a[p:p + PAIR_CHUNK], r[p:p + PAIR_CHUNK]
                # Bound 2, on the survivors: the same over 4x4 blocks, in bit planes of a's counts.
                inter = (np.bitwise_count(planes[pa_] & self.fine[pr, None, :]).sum(2, dtype=np.int64)
                         @ (1 << np.arange(planes.shape[1])))
                inter = np.minimum(inter, self.size[pr])
                hold = inter / (size[pa_] + self.size[pr] - inter) >= best[pa_]
                pa_, pr = pa_[hold], pr[hold]
                score = self._iou(packed, size, pa_, pr)
                np.maximum.at(best, pa_, score)
                keep = score >= best[pa_]
                found_a.append(pa_[keep]), found_r.append(pr[keep]), found_iou.append(score[keep])
        if not found_a:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        a, r, score = (np.concatenate(x) for x in (found_a, found_r, found_iou))
        nearest = (score == best[a]) & (score > 0)  # exact: distinct ratios of ints <= 8192 differ in float64
        return a[nearest], r[nearest]

    def _chunk_order(self, size: float) -> list[int]:
        """Chunk starts, nearest to an answer size first (good bounds early, more skipped)."""
        starts = np.arange(0, len(self.size), CANDIDATE_CHUNK)
        centre = np.searchsorted(self.size, size) // CANDIDATE_CHUNK
        return starts[np.argsort(np.abs(np.arange(len(starts)) - centre), kind="stable")].tolist()

    def _read_back(self, n: int, ans: np.ndarray, rows: np.ndarray, packed: np.ndarray,
                   size: np.ndarray) -> ReadBack:
        reads = np.zeros((n, len(FACTORS), MAX_CLASSES), dtype=bool)
        iou = np.zeros(n)
        images = np.zeros(n, dtype=np.int64)
        if len(ans):
            iou[ans] = self._iou(packed, size, ans, rows)
            pairs = np.unique(np.stack([ans, self.group[rows]], 1), axis=0)
            np.add.at(images, pairs[:, 0], 1)
            one_image = images[ans] == 1
            for j in range(len(FACTORS)):
                c = self.classes[rows, j].astype(np.int64)
                lo, hi = np.full(n, MAX_CLASSES), np.full(n, -1)
                np.minimum.at(lo, ans, c)
                np.maximum.at(hi, ans, c)
                ok = one_image | (lo[ans] == hi[ans])
                reads[ans[ok], j, c[ok]] = True
        return ReadBack(reads, iou, images)


def _hash(packed: np.ndarray) -> np.ndarray:
    """(n,) uint64 hash of each bit-packed image (splitmix64 chained over its words)."""
    h = np.zeros(len(packed), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for word in packed.T:
            h = mix((h ^ word) + GOLDEN)
    return h


def _moments(flat: np.ndarray) -> np.ndarray:
    """(n, 4096) bool -> (n, 2) int64: the sums of the set pixels' column and row indices."""
    images = flat.reshape(len(flat), IMAGE_SIZE, IMAGE_SIZE)
    axis = np.arange(IMAGE_SIZE)
    return np.stack([images.sum(1, dtype=np.int64) @ axis, images.sum(2, dtype=np.int64) @ axis], axis=1)


def _pack(flat: np.ndarray) -> np.ndarray:
    """(n, 4096) bool -> (n, 64) uint64 bit-packed rows."""
    return np.packbits(flat, axis=1).view(np.uint64)


def _popcount(packed: np.ndarray) -> np.ndarray:
    """(n,) pixels set in bit-packed rows."""
    return np.bitwise_count(packed).sum(1, dtype=np.int64)


def _block_counts(packed: np.ndarray, side: int) -> np.ndarray:
    """(n, 64) bit-packed images -> (n, (64 / side)^2) pixel counts of side x side blocks,
    row-major; side 8 or 4 (a packed image row is 8 bytes, a byte two 4-pixel nibbles)."""
    n, k = len(packed), IMAGE_SIZE // side
    rows = packed.view(np.uint8).reshape(n, IMAGE_SIZE, IMAGE_SIZE // 8)
    if side == 4:
        rows = np.stack([rows >> 4, rows & 0x0F], axis=3).reshape(n, IMAGE_SIZE, k)
    return np.bitwise_count(rows).reshape(n, k, side, k).sum(2, dtype=np.int32).reshape(n, -1)


def _block_any(packed: np.ndarray, side: int) -> np.ndarray:
    """(n, 64) bit-packed images -> (n, (64 / side)^2) bool: any pixel in each block (as
    `_block_counts(...) > 0`, by OR-ing the 64-bit image rows of each band of blocks)."""
    n, k = len(packed), IMAGE_SIZE // side
    bands = np.bitwise_or.reduce(packed.reshape(n, k, side), axis=2).view(np.uint8).reshape(n, k, 8)
    if side == 4:
        bands = np.stack([bands >> 4, bands & 0x0F], axis=3)
    return bands.reshape(n, -1) != 0


def _bit_planes(counts: np.ndarray) -> np.ndarray:
    """(n, m) counts below 32 -> (n, 5, m / 64) uint64: plane k holds bit k of each count,
    so sum(counts * flags) = sum_k 2^k popcount(plane_k & flag bits)."""
    planes = [_bits((counts >> k) & 1 > 0) for k in range(5)]
    return np.stack(planes, axis=1)


def _bits(flags: np.ndarray) -> np.ndarray:
    """(n, 64 m) bool -> (n, m) uint64, flag j at bit j % 64 of word j // 64."""
    return np.packbits(flags, axis=1, bitorder="little").view(np.uint64)
