// What one query tile of a stem BlockPlan covers and which key tiles it visits; shared by the sm80
// and sm90 kernels (each thread that needs the sequence walks it itself: no shared state).
#pragma once

#include "block_sparse_attn.h"

namespace stem_attn {

// Query tile `sub_idx` (kBlockM rows) of plan query block `qi`.
struct QueryTile {
  int a0;         // absolute position of tile row 0
  int q_row0;     // query row index of tile row 0 (negative for an unaligned q_offset)
  int key_limit;  // keys at or past this are never visible to the tile
  bool empty;     // no query row of [0, Lq) falls in the tile (a sub-tile past the last row)
};

__device__ __forceinline__ QueryTile query_tile(const Params& p, int qi, int sub_idx, int block_m) {
  QueryTile t;
  t.a0 = (p.q_offset / p.block_size + qi) * p.block_size + sub_idx * block_m;
  const int q_lo = max(t.a0, p.q_offset);
  const int q_hi = min(t.a0 + block_m, p.q_offset + p.Lq) - 1;
  t.empty = q_lo > q_hi;
  t.key_limit = min(p.Lk, q_hi + 1);
  t.q_row0 = t.a0 - p.q_offset;
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
