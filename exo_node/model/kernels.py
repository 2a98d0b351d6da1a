"""x @ w.T on the CPU for decode steps, small batches and prefill chunks, with w packed at load time.

Packed, a weight matrix (N, K) is stored (N/BLOCK, K, BLOCK): for each k, BLOCK output rows lie side by side. The
kernel then keeps one vector of BLOCK outputs per input row and adds x[t, k] times a vector of weights to it for
every k. clang vectorizes the BLOCK loop into one fp16->fp32 conversion and one broadcast FMA per input row, and
the sums need no horizontal adds at the end: the (N, K) layout spent about as long adding up lanes as multiplying.

tinygrad gives no software prefetch, and without one the packed weights streamed at ~11 GB/s; each step of the
reduction prefetches PREFETCH bytes ahead through a one-line C expression (the CPU backend renders C).

SmolLM2's matrices, cold (30 copies cycled, as in a model), against the (N, K) kernel with lanes over k:
ffn_gate 1536 x 576 at 8 rows 108 -> 66 us, ffn_down 576 x 1536 159 -> 68 us, head 49152 x 576 3.3 -> 2.0 ms;
one row streams at the same ~38 GB/s either way (the memory's limit for one core)."""
from __future__ import annotations
import functools, operator
from typing import Callable
from tinygrad import Device, Tensor, UOp, dtypes
from tinygrad.dtype import AddrSpace
from tinygrad.helpers import prod
from tinygrad.renderer import Estimates
from tinygrad.renderer.cstyle import ClangRenderer
from tinygrad.uop.ops import AxisType, KernelInfo, Ops
from exo_node import cpu_threads
from exo_node.device import is_cpu

BLOCK = 16  # outputs per vector: one AVX-512 register of fp32, two AVX2 ones
ROW_BLOCKS = (8, 4, 2, 1)  # input rows sharing one pass over the weights: 8 accumulators and a weight vector fit the registers
PREFETCH = 16 * 1024  # bytes ahead in the weights: 2 KB streamed at 55% of the speed of 8 KB, 8-16 KB the same


def renders_c(device: str) -> bool:
  """Our kernels are for the CPU backend rendering C: the prefetch is a C expression, the lanes a loop clang vectorizes."""
  return is_cpu(device) and isinstance(Device[device].renderer, ClangRenderer)


def packs(w: Tensor) -> bool:
  """Whether a weight matrix takes this kernel, and so is packed when it loads."""
  return renders_c(w.device) and len(w.shape) == 2 and w.shape[0] % BLOCK == 0


def pack(w: Tensor) -> Tensor:
  N, K = w.shape
  return w.reshape(N // BLOCK, BLOCK, K).permute(0, 2, 1).contiguous()


def is_packed(w: Tensor) -> bool: return len(w.shape) == 3


PART = 1 << 16  # the id of a kernel's THREAD range, past every other range's


def split(n: int) -> tuple[UOp | None, int, Callable[[UOp], UOp]]:
  """n units of a kernel's work (output blocks, KV heads) split into parts (THREAD, cpu_threads.py runs them at once),
  each a run of ceil(n / threads) units: as many parts as that takes, so every part but the last is whole, and the
  last repeats its last unit where they do not divide (the same values written again, by the same thread). Any n
  splits: 576 outputs (36 blocks) on 8 threads ran on one, when only a count of parts dividing n split. Returns the
  THREAD range (None: one part), the units per part, and a part's unit from its range over them."""
  per = -(-n // cpu_threads.parts())
  if per == n: return None, n, lambda i: i
  parts = -(-n // per)
  part = UOp.range(parts, PART, AxisType.THREAD)
  return part, per, (lambda i: part * per + i) if parts * per == n else (lambda i: (part * per + i).minimum(n - 1))


def ended(u: UOp, part: UOp | None) -> UOp: return u if part is None else u.end(part)


def matmul_t(x: Tensor, w: Tensor) -> Tensor:
  """x (..., K) @ the (N, K) matrix that w holds packed: (..., N)."""
  *lead, K = x.shape
  N, T = w.shape[0] * BLOCK, prod(lead)
  tu = next(b for b in ROW_BLOCKS if T % b == 0)
  NB = N // BLOCK

  def kernel(out: UOp, xs: UOp, ws: UOp) -> UOp:
    # row blocks outermost, so a block's rows stay in cache while all the weights pass; the reduction (3) around the
    # vector of outputs (5), which clang vectorizes. Split, each part (PART: THREAD, cpu_threads.py runs them at once)
    # takes a run of output blocks
    part, per, block = split(NB)
    tb, nh, u = UOp.range(T // tu, 0), UOp.range(per, 1), UOp.range(tu, 2, AxisType.UPCAST)
    nb = block(nh)
    k, zero, lane, put = UOp.range(K, 3, AxisType.REDUCE), UOp.range(BLOCK, 4), UOp.range(BLOCK, 5), UOp.range(BLOCK, 6)
    acc = UOp.placeholder((tu * BLOCK,), dtypes.float32, 0, addrspace=AddrSpace.REG)
    acc = acc.after(nh, tb)[u * BLOCK + zero].set(0.0, end=zero)
    fma = acc[u * BLOCK + lane].store(acc.after(k, lane)[u * BLOCK + lane] + xs[tb * tu + u, k] * ws[nb, k, lane].cast(dtypes.float32))
    # the prefetch is a C expression stored to a scratch register: tinygrad keeps side effects only as stores
    scratch = UOp.placeholder((1,), dtypes.int32, 1, addrspace=AddrSpace.REG)
    ahead = scratch[0].store(UOp(Ops.CUSTOM, dtypes.int32, src=(ws[nb, k, 0],), arg=f"(__builtin_prefetch((char*)({{0}})+{PREFETCH}), 0)"))
    acc = acc.after(UOp.group(fma.end(lane), ahead).end(k))
    done = out[tb * tu + u, nb * BLOCK + put].store(acc[u * BLOCK + put]).end(put).end(u).end(nh).end(tb)
    return ended(done, part).sink(
      arg=KernelInfo(name=f"matvec_{T}_{N}_{K}" + (f"_{part.vmax + 1}parts" if part is not None else ""), opts_to_apply=()))

  xs = x.reshape(T, K).cast(dtypes.float32).contiguous()
  return Tensor.custom_kernel(Tensor.empty(T, N, device=w.device), xs, w, fxn=kernel)[0].reshape(*lead, N)


SCORE_POSITIONS = 4  # cache positions per pass of the score kernel: 4 x G vectors of 16 partial sums fit the registers
ATTEND_POSITIONS = 16  # exponentials per vector in the attend kernel
CHUNK_POSITIONS = 8  # cache positions per pass of chunk_scores: 8 x (16 x 3 queries) partial sums fit the registers
PAD = ATTEND_POSITIONS - 1  # cache positions past the last one that the kernels read (whole blocks of positions)


def scores_apply(device: str, head_dim: int) -> bool:
  """Whether attention takes `scores` and `attend` (the cache must be float32, as it is on the CPU)."""
  return renders_c(device) and head_dim % BLOCK == 0


def scores(q: Tensor, caches: list[Tensor], counts: Tensor, n_kv: int) -> Tensor:
  """Decode attention scores, scaled: q (B, H, D) against the keys of row b's cache (flat: K then V, each (n_kv, P, D))
  over its first counts[b] positions, rounded up to SCORE_POSITIONS: P must exceed a count by SCORE_POSITIONS - 1.
  Returns (B, H, P); what lies past counts[b] is not a score.

  tinygrad's own score product ran one serial chain of D multiply-adds per score: its heuristics upcast no axis of a
  kernel whose concrete output axes hold fewer than 1024 elements, and the span axis is symbolic (8 rows at span 20:
  ~45 us a block, at span 500 ~0.7 ms). Here 16 lanes over d for SCORE_POSITIONS positions x G query heads at once,
  the lanes summed as a tree (8 rows: ~5 us at span 20, ~85 us at span 500). A lane's D / 16 products are one sum,
  not a loop over them: the loop kept the S x G accumulators in memory, a load and a store around every multiply-add
  (30 blocks at span 1500: one row 5.5 -> 2.5 ms, 8 rows 39 -> 14 ms). The counts are read from a buffer: a
  bound variable cannot be a custom kernel's loop bound in tinygrad 0.14, and the kernel declares no op counts,
  which tinygrad could not infer for a bound it cannot see. The tag marks the kernel as already optimized."""
  B, H, D = q.shape
  G, C, S = H // n_kv, D // BLOCK, SCORE_POSITIONS
  P = caches[0].shape[0] // (2 * n_kv * D)

  def kernel(out: UOp, qs: UOp, count: UOp, *ks: UOp) -> UOp:
    ends, (part, per, head) = [], split(n_kv)
    for b, kb in enumerate(ks):
      r = lambda n, i, t=AxisType.LOOP: UOp.range(n, b * 16 + i, t)
      hr, sb, u, g = r(per, 0), r((count[b] + (S - 1)) // S, 1), r(S, 2, AxisType.UPCAST), r(G, 3, AxisType.UPCAST)
      h = head(hr)
      lane = r(BLOCK, 6)
      a, pos = (u * G + g) * BLOCK, sb * S + u
      acc = UOp.placeholder((S * G * BLOCK,), dtypes.float32, b, addrspace=AddrSpace.REG).after(hr, sb)
      terms = [qs[b, h * G + g, c * BLOCK + lane] * kb[(h * P + pos) * D + c * BLOCK + lane] for c in range(C)]
      acc = acc.after(acc[a + lane].store(functools.reduce(operator.add, terms)).end(lane))
      for k, half in enumerate(BLOCK >> j for j in range(1, BLOCK.bit_length())):  # each level of the tree one vector add
        i = r(half, 7 + k)
        acc = acc.after(acc[a + i].store(acc[a + i] + acc[a + i + half]).end(i))
      ends.append(out[b, h * G + g, pos].store(acc[a] * D ** -0.5).end(g).end(u).end(sb).end(hr))
    return ended(UOp.group(*ends), part).sink(arg=KernelInfo(name=f"scores_{B}_{H}_{D}", opts_to_apply=(), estimates=Estimates()), tag=1)

  return Tensor.custom_kernel(Tensor.empty(B, H, P, device=q.device), q.contiguous(), counts, *caches, fxn=kernel)[0]


def chunk_scores(q: Tensor, cache: Tensor, counts: Tensor, n_kv: int) -> Tensor:
  """The scores of a prefill chunk's T positions, which share one cache (flat: K then V, each (n_kv, P, D)): (T, H,
  P), as `scores` gives them, each position's over its own counts[t], all computed up to the chunk's last (longest),
  counts[T-1]. `scores` takes each position as a row of its own: it read the keys once per position and summed 16
  lanes per score. Here each key meets the T x G queries of its head at once, lanes over the queries: one broadcast
  multiply-add per key element and no sums across lanes."""
  T, H, D = q.shape
  G, S = H // n_kv, CHUNK_POSITIONS
  J, P = T * G, cache.shape[0] // (2 * n_kv * D)
  qt = q.reshape(T, n_kv, G, D).permute(1, 3, 0, 2).reshape(n_kv, D, J).contiguous()  # query t * G + g of head h

  def kernel(out: UOp, qs: UOp, count: UOp, kc: UOp) -> UOp:
    n = count[T - 1].minimum(P - (S - 1))  # always: the cache holds PAD positions more; tinygrad can then bound the reads
    part, per, head = split(n_kv)
    hr, sb, u = UOp.range(per, 0), UOp.range((n + (S - 1)) // S, 1), UOp.range(S, 2, AxisType.UPCAST)
    h = head(hr)
    d, zero, lane, put = UOp.range(D, 3, AxisType.REDUCE), UOp.range(J, 4), UOp.range(J, 5), UOp.range(J, 6)
    pos = sb * S + u
    acc = UOp.placeholder((S * J,), dtypes.float32, 0, addrspace=AddrSpace.REG)
    acc = acc.after(hr, sb)[u * J + zero].set(0.0, end=zero)
    fma = acc[u * J + lane].store(acc.after(d, lane)[u * J + lane] + kc[(h * P + pos) * D + d] * qs[h, d, lane])
    acc = acc.after(fma.end(lane).end(d))
    return ended(out[put // G, h * G + put % G, pos].store(acc[u * J + put] * D ** -0.5).end(put).end(u).end(sb).end(hr), part).sink(
      arg=KernelInfo(name=f"chunk_scores_{T}_{H}_{D}", opts_to_apply=(), estimates=Estimates()), tag=1)

  return Tensor.custom_kernel(Tensor.empty(T, H, P, device=q.device), qt, counts, cache, fxn=kernel)[0]


def attend(scores: Tensor, caches: list[Tensor], counts: Tensor, n_kv: int) -> Tensor:
  """Decode attention output from the scores (B, H, P) of row b's first counts[b] positions: their softmax times the
  values of row b's cache (flat: K then V, each (n_kv, P, D)), in one kernel: (B, H, D). A vector of D outputs per
  query head, one broadcast multiply-add per position, straight from the cache: tinygrad's softmax and product needed
  the rows' values copied into one tensor first (8 rows at span 200: ~75 us a block for the copy and ~165 us for the
  product). The exponentials are taken ATTEND_POSITIONS at a time, a loop clang vectorizes (tinygrad renders exp2
  as a polynomial), positions past the count weighing 0: one at a time, they were most of the kernel at long spans
  (a 16-position prefill chunk at position 2048: ~1.3 ms a block, ~40 ms of the chunk's ~85)."""
  B, H, P = scores.shape
  G, L = H // n_kv, ATTEND_POSITIONS
  D = caches[0].shape[0] // (2 * n_kv * P)

  def kernel(out: UOp, sc: UOp, count: UOp, *vs: UOp) -> UOp:
    ends, (part, per, head) = [], split(n_kv)
    for b, vb in enumerate(vs):
      r = lambda n, i, t=AxisType.LOOP: UOp.range(n, b * 10 + i, t)
      n = count[b].minimum(P - (L - 1))  # always: the cache holds PAD positions more; tinygrad can then bound the reads
      hr, g, zero, s1, sb, lane, put = r(per, 0), r(G, 1, AxisType.UPCAST), r(D, 2), r(n, 3, AxisType.REDUCE), \
        r((n + (L - 1)) // L, 4, AxisType.REDUCE), r(D, 5), r(D, 6)
      at, pos = r(L, 7), r(L, 8, AxisType.REDUCE)
      h = head(hr)
      hg = h * G + g
      top = UOp.placeholder((G,), dtypes.float32, 4 * b, addrspace=AddrSpace.REG)
      top = top.after(hr)[g].set(-float("inf"))
      top = top.after(top[g].store(top.after(s1)[g].maximum(sc[b, hg, s1])).end(s1))
      ex = UOp.placeholder((G * L,), dtypes.float32, 4 * b + 3, addrspace=AddrSpace.REG)
      e = ((sc[b, hg, sb * L + at] - top[g]) * 1.4426950408889634).exp2()
      ex = ex.after(ex.after(top, sb)[g * L + at].store((sb * L + at < n).where(e, 0.0)).end(at))
      tot = UOp.placeholder((G,), dtypes.float32, 4 * b + 1, addrspace=AddrSpace.REG)
      tot = tot.after(top)[g].set(0.0)
      acc = UOp.placeholder((G * D,), dtypes.float32, 4 * b + 2, addrspace=AddrSpace.REG)
      acc = acc.after(top)[g * D + zero].set(0.0, end=zero)
      w = ex[g * L + pos]
      add = tot[g].store(tot.after(sb, pos)[g] + w)
      fma = acc[g * D + lane].store(acc.after(sb, pos, lane)[g * D + lane] + w * vb[(n_kv * P + h * P + sb * L + pos) * D + lane])
      done = UOp.group(add, fma.end(lane)).end(pos).end(sb)
      acc, tot = acc.after(done), tot.after(done)
      ends.append(out[b, hg, put].store(acc[g * D + put] / tot[g]).end(put).end(g).end(hr))
    return ended(UOp.group(*ends), part).sink(arg=KernelInfo(name=f"attend_{B}_{H}_{D}", opts_to_apply=(), estimates=Estimates()), tag=1)

  return Tensor.custom_kernel(Tensor.empty(B, H, D, device=scores.device), scores, counts, *caches, fxn=kernel)[0]
