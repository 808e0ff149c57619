// The unpack stage: moves received fragments from a bounce buffer into their
// destination on a CUDA stream, as a plain copy or with the reduction fused
// into the copy.
//
// A fragment is described by NCCL's `loadMeta` record (src/device/network/
// unpack/unpack_defs.h, NCCL_NET_DEVICE_UNPACK_VERSION 0x7): copy `len`
// bytes from `bounce + src_off` to `dst + dst_off`. The GPUDirect-TCPX plugin
// produces up to 2048 of them per receive (4 KiB pages of a 4 MiB slice) in
// any order and at any byte alignment; the socket net's staging path
// (transport/stage.h) describes each pinned chunk the same way, as 4 KiB
// pages, so both paths share these kernels. Compiled by nvcc only (CUDA builds); the header is plain C++.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/status.h"
#include "common/types.h"

struct CUstream_st;

namespace tcpx {

// Bit-compatible with NCCL's `union loadMeta` (16 bytes, 16-byte aligned).
struct alignas(16) LoadMeta {
  uint32_t srcOff;  // bytes into the bounce buffer
  uint32_t len;     // bytes
  uint64_t dstOff;  // bytes into the destination
};
static_assert(sizeof(LoadMeta) == 16, "loadMeta is 16 bytes");

// The most records one receive can carry (NET_UNPACK_MAX_SLICE_PAGES).
constexpr int kUnpackMaxMetas = 2048;

// Copies every fragment of `metas` (`count` records in device-accessible
// memory: device or mapped pinned host) on `stream`. Fragments must not
// overlap in the destination. Bytes at or beyond `limit` in the destination
// are not written (fragments are cut there), so one fixed page list serves
// chunks of any length. Returns tcpxUnhandledCudaError if the launch fails.
// Asynchronous: the caller orders later work on the stream.
tcpxResult_t unpackCopy(const LoadMeta* metas, int count, const void* bounce, void* dst,
                        CUstream_st* stream, uint64_t limit = UINT64_MAX);

// dst[k] = own[k] op fragment[k] (own == nullptr: dst itself), element-wise in `dtype` (reduce semantics of
// collectives/reduce.h: AVG and PREMUL_SUM reduce as SUM, integers wrap, half
// types compute in float, bool SUM/MAX = OR, PRODUCT/MIN = AND). Every
// fragment must start and end on an element boundary of the destination
// (src_off need not be aligned); otherwise tcpxInvalidArgument, and the
// caller unpacks with unpackCopy into a staging chunk and reduces from there.
// `own` may equal dst but must not overlap it otherwise; `limit` as for unpackCopy.
tcpxResult_t unpackReduce(const LoadMeta* metas, int count, const void* bounce, void* dst,
                          DataType dtype, RedOp op, CUstream_st* stream,
                          const void* own = nullptr, uint64_t limit = UINT64_MAX);

// Loads every unpack kernel into the current device's context now. CUDA's
// lazy loading would otherwise load a kernel at its first launch, which may
// synchronise the context: with a stream waiting on the host (stage.h's
// streamWaitFlag) for the very op that launch belongs to, that deadlocks.
tcpxResult_t preloadUnpackKernels();

}  // namespace tcpx
