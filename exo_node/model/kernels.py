"""x @ w.T on the CPU for decode steps, small batches and prefill chunks. tinygrad's heuristics give every output
one serial floating-point reduction chain (the compiler may not reorder float adds), which measured ~2 GFLOPS on
these cores; this kernel keeps LANES independent partial sums per input row, added up after the loop.

The lanes are a plain innermost loop, not an unrolled axis: tinygrad would load an unrolled axis in float4 pieces,
and clang keeps those in 128-bit registers, where it vectorizes a plain loop to the widest the CPU has (zmm on these
AVX-512 cores). SmolLM2's head (49152 x 576, fp16), measured alone: 2.35 -> 1.5 ms for one row, 5.4 -> 2.4 ms for
four, 12.2 -> 3.1 ms for eight."""
from __future__ import annotations
from tinygrad import Tensor, UOp, dtypes
from tinygrad.dtype import AddrSpace
from tinygrad.helpers import prod
from tinygrad.uop.ops import AxisType, KernelInfo
from exo_node.device import is_cpu

LANES = 16  # fp32 partial sums per input row: one AVX-512 register, two AVX2 ones
ROW_BLOCKS = (8, 4, 2, 1)  # input rows sharing one pass over the weights: they stream once per block
# A block's input rows stay in half the L1 data cache where the weights stay in L2 (passing them again is cheap):
# SmolLM2's ffn_down (576 x 1536) took 255 us for 8 rows in one block, 179 in two of 4. Weights that stream from
# memory pass once: a 2048 x 8192 matrix took 5.0 ms for 8 rows in one block, 12.5 in eight of 1.
BLOCK_BYTES, L2_BYTES = 24 * 1024, 2 * 1024 * 1024


def fits(x: Tensor, w: Tensor) -> bool:
  return is_cpu(w.device) and len(w.shape) == 2 and w.shape[1] % LANES == 0 and all(
    isinstance(s, int) for s in x.shape)


def matmul_t(x: Tensor, w: Tensor) -> Tensor:
  *lead, K = x.shape
  N, T = w.shape[0], prod(lead)
  in_l2 = N * K * w.dtype.itemsize <= L2_BYTES
  tu = next(b for b in ROW_BLOCKS if T % b == 0 and (b == 1 or not in_l2 or b * K * 4 <= BLOCK_BYTES))

  def kernel(out: UOp, xs: UOp, ws: UOp) -> UOp:
    # row blocks outermost, so a block's rows stay in cache while every weight row passes; the reduction (3) around
    # the lanes (4, 5)
    tb, n, u = UOp.range(T // tu, 0), UOp.range(N, 1), UOp.range(tu, 2, AxisType.UPCAST)
    kk, zero_lane, lane = UOp.range(K // LANES, 3, AxisType.REDUCE), UOp.range(LANES, 4), UOp.range(LANES, 5)
    t, k = tb * tu + u, kk * LANES + lane
    acc = UOp.placeholder((tu * LANES,), dtypes.float32, 0, addrspace=AddrSpace.REG)
    acc = acc.after(n, tb)[u * LANES + zero_lane].set(0.0, end=zero_lane)
    acc = acc[u * LANES + lane].set(acc.after(kk, lane)[u * LANES + lane] + xs[t, k] * ws[n, k].cast(dtypes.float32), end=(lane, kk))
    total = sum((acc[u * LANES + j] for j in range(1, LANES)), acc[u * LANES])
    # (N, T): each output row's results lie together; a (T, N) store scatters them over T streams (3x slower at T=8)
    # no THREAD split: tinygrad 0.14 runs a CPU kernel's threads one after another on one worker
    return out[n, t].store(total).end(u).end(n).end(tb).sink(arg=KernelInfo(name=f"matvec_{T}_{N}_{K}", opts_to_apply=()))

  xs = x.reshape(T, K).cast(dtypes.float32).contiguous()
  return Tensor.custom_kernel(Tensor.empty(N, T, device=w.device), xs, w, fxn=kernel)[0].T.reshape(*lead, N)
