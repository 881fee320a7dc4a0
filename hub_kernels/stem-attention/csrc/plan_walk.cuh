// What one query tile of a stem BlockPlan covers and which key tiles it visits; shared by the sm80
// and sm90 kernels. In the sm80 kernel every thread walks the sequence itself; in the sm90 kernel
// only the producer does, and publishes each tile's first key in shared memory.
#pragma once

#include "block_sparse_attn.h"

namespace stem_attn {

// One sequence's rows: where they start in the tensors and its lengths (a packed batch reads them
// from the cumulative lengths; otherwise every batch element is the whole tensor).
struct SeqView {
  int64_t q_start, k_start;  // first row of the sequence in q/o and in k/v
  int Lq, Lk, q_offset;      // its query and key counts; absolute position of its query row 0
};

__device__ __forceinline__ SeqView seq_view(const Params& p, int b) {
  SeqView s;
  if (p.cu_seqlens_q != nullptr) {
    const int q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
    s.q_start = q0;
    s.k_start = k0;
    s.Lq = p.cu_seqlens_q[b + 1] - q0;
    s.Lk = p.cu_seqlens_k[b + 1] - k0;
    s.q_offset = s.Lk - s.Lq;
  } else {
    s.q_start = 0;
    s.k_start = 0;
    s.Lq = p.Lq;
    s.Lk = p.Lk;
    s.q_offset = p.q_offset;
  }
  return s;
}

// Query tile `sub_idx` (kBlockM rows) of plan query block `qi` of sequence `s`.
struct QueryTile {
  int a0;         // absolute position of tile row 0
  int q_row0;     // query row index of tile row 0 (negative for an unaligned q_offset)
  int key_limit;  // keys at or past this are never visible to the tile
  bool empty;     // no query row of [0, Lq) falls in the tile (a sub-tile past the last row)
};

__device__ __forceinline__ QueryTile query_tile(const Params& p, const SeqView& s, int qi, int sub_idx, int block_m) {
  QueryTile t;
  t.a0 = (s.q_offset / p.block_size + qi) * p.block_size + sub_idx * block_m;
  const int q_lo = max(t.a0, s.q_offset);
  const int q_hi = min(t.a0 + block_m, s.q_offset + s.Lq) - 1;
  t.empty = q_lo > q_hi;  // also every row of a packed sequence past its own query blocks
  t.key_limit = min(s.Lk, q_hi + 1);
  t.q_row0 = t.a0 - s.q_offset;
  return t;
}

// The (selected block, key tile of kBlockN tokens) pairs of one (batch, query head, query block),
// in plan order, without tiles that start at or past key_limit. current() is the first key of the
// tile at hand, or -1 past the last; next() moves on.
template <int kBlockN>
struct KeyTileWalk {
  const int* idx;
  int cnt, bs, key_limit, tiles_per_block;
  int pos = 0, sub_t = 0;

  __device__ __forceinline__ KeyTileWalk(const Params& p, int b, int h, int qi, int key_limit_)
      : bs(p.block_size), key_limit(key_limit_), tiles_per_block(p.block_size / kBlockN) {
    const int64_t cidx = (static_cast<int64_t>(b) * p.Hq + h) * p.nQ + qi;
    cnt = min(max(p.kv_counts[cidx], 0), p.W);
    idx = p.kv_indices + cidx * p.W;
  }

  __device__ __forceinline__ int current() {
    while (pos < cnt) {
      const int j = idx[pos];
      const int rem = key_limit - j * bs;
      const int n = (j < 0 || rem <= 0) ? 0 : min((rem + kBlockN - 1) / kBlockN, tiles_per_block);
      if (sub_t < n) return j * bs + sub_t * kBlockN;
      ++pos;
      sub_t = 0;
    }
    return -1;
  }

  __device__ __forceinline__ void next() { ++sub_t; }
};

}  // namespace stem_attn
