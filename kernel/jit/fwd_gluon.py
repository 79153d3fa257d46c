"""The Gluon forward attention kernel for Hopper (sm_90): TMA loads into a K/V ring, async `wgmma`.

Same semantics as the pointer kernel (jit/fwd.py) for the inputs it takes: online softmax in base 2 with
the scale folded into one multiply, fp32 accumulation, causal top-left aligned like torch SDPA, GQA by
`head // group`, any sequence length, output in q's layout, optional natural-log LSE. fp16/bf16 only,
head dims 64 and 128, no score modifiers (the host side, kernel/ops/fwd_gluon.py, refuses the rest).

Written in Gluon (`triton.experimental.gluon`), so layouts, shared memory, barriers and the MMA are
explicit, as in FlashAttention-3:
- each program builds 2-D tensor descriptors over its own (batch, head) slices (their bounds zero-fill
  rows past the sequence end and clip the output store, as in jit/fwd_tma.py);
- K and V tiles stream through a `STAGES`-deep ring in shared memory, one mbarrier per tile and stage;
- QKᵀ is a `warpgroup_mma` from shared memory into registers, P stays in registers (a dot-operand
  layout) as the A operand of P·V, so no score tile ever touches shared memory;
- OVERLAP: FA3's intra-warpgroup pipeline. QKᵀ of tile j and P·V of tile j - 1 are issued together
  (two wgmma groups); the softmax of tile j waits for the first only, so it runs while P·V is still on
  the tensor cores, and the accumulator is rescaled once P·V is done.
- PERSISTENT: about one program per SM, each striding over the (query block, head) units, query-block
  major and (causally) last block first, so every wave takes the costliest blocks left; the K/V ring
  and its barriers carry on from one unit to the next.
- CONSUMERS=2 (FA3's two consumer warpgroups): the 128-row block is split between two consumer
  partitions of 4 warps, each with its own Q half, registers and instruction stream, so the scheduler can
  run one's softmax while the other's products are on the tensor cores. (FA3 also orders their phases
  with named barriers; here the order is left to the hardware.)
- WS: a one-warp producer partition (`gl.warp_specialize`) issues the TMA loads and waits on `empty`
  barriers that the consumer warps arrive on once a stage's P·V is done; the consumers keep the
  registers. Without WS the consumer warps issue the loads themselves, `STAGES - 1` tiles ahead.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# Triton 3.6 names the TMA copies async_copy_*; 3.9 removed those names for async_load/async_store.
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

GL_LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def _gl_unit_coords(unit, num_m, num_bh, heads_q, REVERSE: gl.constexpr, PERSISTENT: gl.constexpr):
    # (query block, head, batch) of work unit `unit` (the program id in a grid). REVERSE takes the query
    # blocks last-first, so a causal run starts on its costliest blocks and ends on the cheap ones. A
    # persistent run goes query-block-major: the programs of one wave take the same block of many heads.
    if PERSISTENT:
        pid_m = unit // num_bh
        bh = unit % num_bh
    else:
        pid_m = unit % num_m
        bh = unit // num_m
    if REVERSE:
        pid_m = num_m - 1 - pid_m
    return pid_m, bh % heads_q, bh // heads_q


@gluon.jit
def _gl_kv_descs(K, V, batch, head, group, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                 seq_k, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr):
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], K.dtype.element_ty)
    head_kv = (head // group).to(gl.int64)
    b64 = batch.to(gl.int64)
    k_desc = tma.make_tensor_descriptor(K + b64 * stride_kb + head_kv * stride_kh, shape=[seq_k, HEAD_DIM],
                                        strides=[stride_kn, 1], block_shape=[BLOCK_N, HEAD_DIM], layout=kv_layout)
    v_desc = tma.make_tensor_descriptor(V + b64 * stride_vb + head_kv * stride_vh, shape=[seq_k, HEAD_DIM],
                                        strides=[stride_vn, 1], block_shape=[BLOCK_N, HEAD_DIM], layout=kv_layout)
    return k_desc, v_desc


@gluon.jit
def _gl_kv_tiles(start_m, seq_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    # Key tiles this query block reads: causally only up to its last row's diagonal.
    hi = seq_k
    if CAUSAL:
        hi = gl.minimum(seq_k, start_m + BLOCK_M)
    return gl.cdiv(hi, BLOCK_N)


@gluon.jit
def _gl_issue_kv(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, j, g, pred, STAGES: gl.constexpr,
                 BLOCK_N: gl.constexpr):
    # TMA loads of key tile j into ring slot g (the ring's running tile count), each signalling its own
    # barrier (QKᵀ can start before V lands).
    s = g % STAGES
    kb = k_ready.index(s)
    vb = v_ready.index(s)
    mbarrier.expect(kb, k_desc.block_type.nbytes, pred=pred)
    tma_load(k_desc, [j * BLOCK_N, 0], kb, k_smem.index(s), pred=pred)
    mbarrier.expect(vb, v_desc.block_type.nbytes, pred=pred)
    tma_load(v_desc, [j * BLOCK_N, 0], vb, v_smem.index(s), pred=pred)


@gluon.jit
def _gl_producer(K, V, group, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                 seq_k, num_m, heads_q, num_units, k_smem, v_smem, k_ready, v_ready, empty,
                 HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 CAUSAL: gl.constexpr, REVERSE: gl.constexpr, PERSISTENT: gl.constexpr):
    # The load partition (one warp): fill the ring as fast as the consumers free its stages.
    num_bh = num_units // num_m
    if PERSISTENT:
        it = 0
        for unit in range(gl.program_id(0), num_units, gl.num_programs(0)):
            pid_m, head, batch = _gl_unit_coords(unit, num_m, num_bh, heads_q, REVERSE, PERSISTENT)
            it = _gl_produce(K, V, group, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, seq_k,
                             pid_m, head, batch, it, k_smem, v_smem, k_ready, v_ready, empty,
                             HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL)
    else:
        pid_m, head, batch = _gl_unit_coords(gl.program_id(0), num_m, num_bh, heads_q, REVERSE, PERSISTENT)
        _gl_produce(K, V, group, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, seq_k,
                    pid_m, head, batch, 0, k_smem, v_smem, k_ready, v_ready, empty,
                    HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL)


@gluon.jit
def _gl_produce(K, V, group, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, seq_k,
                pid_m, head, batch, it, k_smem, v_smem, k_ready, v_ready, empty,
                HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                CAUSAL: gl.constexpr):
    # One query block's key tiles, into ring slots it, it + 1, ...; returns the next free slot count.
    k_desc, v_desc = _gl_kv_descs(K, V, batch, head, group, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                                  stride_vn, seq_k, HEAD_DIM, BLOCK_N)
    n_tiles = _gl_kv_tiles(pid_m * BLOCK_M, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    for j in range(n_tiles):
        g = it + j
        # Parity of the previous use of this stage: the first pass waits on parity 1 of a fresh
        # barrier, which counts as completed.
        mbarrier.wait(empty.index(g % STAGES), ((g // STAGES) & 1) ^ 1)
        _gl_issue_kv(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, j, g, True, STAGES, BLOCK_N)
    return it + n_tiles


@gluon.jit
def _gl_softmax(qk, m_i, l_i, j, full_tiles, offs_m, offs_n, seq_k, qk_scale, BLOCK_N: gl.constexpr,
                CAUSAL: gl.constexpr, NEG_SCALE: gl.constexpr):
    # One tile's online-softmax step in base 2: (p, new max, new sum, rescale factor of the old sums).
    if j >= full_tiles:
        # A tile on the causal diagonal or past the key range's end: mask it.
        cols = j * BLOCK_N + offs_n
        valid = gl.expand_dims(cols < seq_k, 0)
        if CAUSAL:
            valid = valid & (gl.expand_dims(offs_m, 1) >= gl.expand_dims(cols, 0))
        # Top-left causal: every row sees key 0 in tile 0, so its max is finite by now.
        qk = gl.where(valid, qk * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, 1))
        p = gl.exp2(qk - gl.expand_dims(m_new, 1))
    else:
        # Unmasked: the max on the raw scores, scaled once, so each exponent is one FMA.
        if NEG_SCALE:
            m_new = gl.maximum(m_i, gl.min(qk, 1) * qk_scale)  # a negative scale flips the order
        else:
            m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
        p = gl.exp2(qk * qk_scale - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    return p, m_new, l_i * alpha + gl.sum(p, 1), alpha


@gluon.jit
def _gl_consumer(Q, K, V, O, LSE, group, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                 seq_q, seq_k, heads_q, num_m, num_units, qk_scale, k_smem, v_smem, k_ready, v_ready, empty,
                 HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 CAUSAL: gl.constexpr, STORE_LSE: gl.constexpr, NEG_SCALE: gl.constexpr, WS: gl.constexpr,
                 REVERSE: gl.constexpr, OVERLAP: gl.constexpr, PERSISTENT: gl.constexpr, ROWS: gl.constexpr,
                 HALF: gl.constexpr, num_warps: gl.constexpr):
    # The softmax/MMA warps: rows HALF·ROWS .. of each query block of this program against every key tile
    # the block sees (ROWS = BLOCK_M with one consumer partition, BLOCK_M / 2 with two).
    dtype: gl.constexpr = Q.dtype.element_ty
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    q_smem = gl.allocate_shared_memory(dtype, [ROWS, HEAD_DIM], q_layout)
    num_bh = num_units // num_m
    if PERSISTENT:
        it = 0
        for unit in range(gl.program_id(0), num_units, gl.num_programs(0)):
            q_phase = ((unit - gl.program_id(0)) // gl.num_programs(0)) & 1  # one Q load per unit
            pid_m, head, batch = _gl_unit_coords(unit, num_m, num_bh, heads_q, REVERSE, PERSISTENT)
            it = _gl_attend(Q, K, V, O, LSE, group, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh,
                            stride_kn, stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                            seq_q, seq_k, heads_q, qk_scale, pid_m, head, batch, it, q_phase, q_smem, q_bar,
                            k_smem, v_smem, k_ready, v_ready, empty, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL,
                            STORE_LSE, NEG_SCALE, WS, OVERLAP, ROWS, HALF, num_warps)
    else:
        pid_m, head, batch = _gl_unit_coords(gl.program_id(0), num_m, num_bh, heads_q, REVERSE, PERSISTENT)
        _gl_attend(Q, K, V, O, LSE, group, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                   seq_q, seq_k, heads_q, qk_scale, pid_m, head, batch, 0, 0, q_smem, q_bar,
                   k_smem, v_smem, k_ready, v_ready, empty, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL,
                   STORE_LSE, NEG_SCALE, WS, OVERLAP, ROWS, HALF, num_warps)
    mbarrier.invalidate(q_bar)


@gluon.jit
def _gl_attend(Q, K, V, O, LSE, group, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
               stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
               seq_q, seq_k, heads_q, qk_scale, pid_m, head, batch, it, q_phase, q_smem, q_bar,
               k_smem, v_smem, k_ready, v_ready, empty,
               HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
               CAUSAL: gl.constexpr, STORE_LSE: gl.constexpr, NEG_SCALE: gl.constexpr, WS: gl.constexpr,
               OVERLAP: gl.constexpr, ROWS: gl.constexpr, HALF: gl.constexpr, num_warps: gl.constexpr):
    # ROWS rows of one query block against every key tile the block sees; its key tiles use ring slots it, it + 1, ...
    # Returns the next slot count.
    dtype: gl.constexpr = Q.dtype.element_ty
    start_m = pid_m * BLOCK_M + HALF * ROWS  # this consumer's rows of the block
    b64 = batch.to(gl.int64)
    h64 = head.to(gl.int64)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    q_desc = tma.make_tensor_descriptor(Q + b64 * stride_qb + h64 * stride_qh, shape=[seq_q, HEAD_DIM],
                                        strides=[stride_qm, 1], block_shape=[ROWS, HEAD_DIM], layout=q_layout)
    o_desc = tma.make_tensor_descriptor(O + b64 * stride_ob + h64 * stride_oh, shape=[seq_q, HEAD_DIM],
                                        strides=[stride_om, 1], block_shape=[ROWS, HEAD_DIM], layout=q_layout)
    n_tiles = _gl_kv_tiles(pid_m * BLOCK_M, seq_k, BLOCK_M, BLOCK_N, CAUSAL)  # the block's: as the producer's

    # wgmma layouts: the warps stack along the rows (16 rows per warp), N is the whole tile.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma_load(q_desc, [start_m, 0], q_bar, q_smem)

    if not WS:
        k_desc, v_desc = _gl_kv_descs(K, V, batch, head, group, stride_kb, stride_kh, stride_kn, stride_vb,
                                      stride_vh, stride_vn, seq_k, HEAD_DIM, BLOCK_N)
        for j in gl.static_range(STAGES - 1):
            _gl_issue_kv(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, j, it + j, j < n_tiles, STAGES, BLOCK_N)

    offs_m = start_m + gl.arange(0, ROWS, layout=row_s)
    offs_n = gl.arange(0, BLOCK_N, layout=col_s)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([ROWS], gl.float32, layout=row_s)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    # Tiles from here on need a mask: the causal diagonal's, or the key range's tail.
    if CAUSAL:
        full_tiles = gl.minimum(start_m, seq_k) // BLOCK_N
    else:
        full_tiles = seq_k // BLOCK_N
    mbarrier.wait(q_bar, q_phase)

    if OVERLAP:
        # FA3's intra-warpgroup pipeline: QKᵀ of tile j and P·V of tile j - 1 are in flight together,
        # and the softmax of tile j runs while P·V of tile j - 1 is still on the tensor cores.
        mbarrier.wait(k_ready.index(it % STAGES), (it // STAGES) & 1)
        qk = warpgroup_mma(q_smem, k_smem.index(it % STAGES).permute((1, 0)), s_zero, use_acc=False,
                           is_async=True)
        qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
        p, m_i, l_i, alpha = _gl_softmax(qk, m_i, l_i, 0, full_tiles, offs_m, offs_n, seq_k, qk_scale,
                                         BLOCK_N, CAUSAL, NEG_SCALE)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        if not WS:
            _gl_issue_kv(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, STAGES - 1, it + STAGES - 1,
                         STAGES - 1 < n_tiles, STAGES, BLOCK_N)
        for j in range(1, n_tiles):
            g = it + j
            s = g % STAGES
            prev = (g - 1) % STAGES
            mbarrier.wait(k_ready.index(s), (g // STAGES) & 1)
            qk = warpgroup_mma(q_smem, k_smem.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(prev), ((g - 1) // STAGES) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk, ))  # QKᵀ was issued first: it is done
            p, m_i, l_i, alpha = _gl_softmax(qk, m_i, l_i, j, full_tiles, offs_m, offs_n, seq_k, qk_scale,
                                             BLOCK_N, CAUSAL, NEG_SCALE)
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
            # Tile j - 1 is done with its stage: hand it back (or refill it) before rescaling.
            if WS:
                mbarrier.arrive(empty.index(prev), count=1)
            else:
                nxt = j + STAGES - 1
                _gl_issue_kv(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, nxt, it + nxt, nxt < n_tiles,
                             STAGES, BLOCK_N)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
        g_last = it + n_tiles - 1
        last = g_last % STAGES
        mbarrier.wait(v_ready.index(last), (g_last // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    else:
        for j in range(n_tiles):
            g = it + j
            s = g % STAGES
            phase = (g // STAGES) & 1
            if not WS:
                # Refill the stage tile j - 1 used: its P·V was waited on at the end of the last iteration.
                nxt = j + STAGES - 1
                _gl_issue_kv(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, nxt, it + nxt, nxt < n_tiles,
                             STAGES, BLOCK_N)
            mbarrier.wait(k_ready.index(s), phase)
            qk = warpgroup_mma(q_smem, k_smem.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
            p, m_i, l_i, alpha = _gl_softmax(qk, m_i, l_i, j, full_tiles, offs_m, offs_n, seq_k, qk_scale,
                                             BLOCK_N, CAUSAL, NEG_SCALE)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            mbarrier.wait(v_ready.index(s), phase)
            acc = warpgroup_mma(p_op, v_smem.index(s), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            if WS:
                mbarrier.arrive(empty.index(s), count=1)

    l_o = gl.convert_layout(l_i, row_o)
    out = (acc / gl.expand_dims(l_o, 1)).to(dtype)
    # The Q box is free once the last QKᵀ is done: stage the output there for the TMA store.
    q_smem.store(out)
    fence_async_shared()
    tma_store(o_desc, [start_m, 0], q_smem)
    if STORE_LSE:
        # Natural-log LSE of the scaled scores: m_i and l_i live in base 2.
        lse = (m_i + gl.log2(l_i)) * GL_LN2
        row0 = (b64 * heads_q + h64) * seq_q
        gl.store(LSE + row0 + offs_m, lse, mask=offs_m < seq_q)
    # The next query block's Q lands in the same box: the store must have read it.
    tma.store_wait(pendings=0)
    return it + n_tiles


# Sizes are not specialised on, so one binary serves every shape of a (dtype, head dim, config).
@gluon.jit(do_not_specialize=["seq_q", "seq_k", "heads_q", "group", "num_m", "num_units"])
def attn_fwd_gluon_kernel(Q, K, V, O, LSE,
                          stride_qb, stride_qh, stride_qm,
                          stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn,
                          stride_ob, stride_oh, stride_om,
                          seq_q, seq_k, heads_q, group, qk_scale, num_m, num_units,
                          HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                          STAGES: gl.constexpr, CAUSAL: gl.constexpr, STORE_LSE: gl.constexpr,
                          NEG_SCALE: gl.constexpr, WS: gl.constexpr, REVERSE: gl.constexpr,
                          OVERLAP: gl.constexpr, PERSISTENT: gl.constexpr, CONSUMERS: gl.constexpr,
                          PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """Grid (num_units,) with num_units = batch * heads_q * num_m, or fewer programs striding over the units
    when PERSISTENT. q/k/v/o last dims contiguous, fp16 or bf16, HEAD_DIM 64 or 128.

    BLOCK_M = 16 · num_warps · CONSUMERS rows per program (the consumer warps stack along the rows). WS adds a
    one-warp TMA producer with PRODUCER_REGS registers per thread; CONSUMERS=2 (with WS) splits the block
    between two consumer partitions of num_warps warps each, the second with CONSUMER_REGS registers.
    """
    dtype: gl.constexpr = Q.dtype.element_ty
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=CONSUMERS)  # every consumer hands each stage back
    ROWS: gl.constexpr = BLOCK_M // CONSUMERS
    if CONSUMERS == 2:
        # Two consumer partitions on the two halves of the block, each with its own registers and
        # instruction stream, so one's softmax can run while the other's products are on the tensor cores.
        gl.warp_specialize([
            (_gl_consumer, (Q, K, V, O, LSE, group, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh,
                            stride_kn, stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                            seq_q, seq_k, heads_q, num_m, num_units, qk_scale, k_smem, v_smem, k_ready, v_ready,
                            empty, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL, STORE_LSE, NEG_SCALE, True, REVERSE,
                            OVERLAP, PERSISTENT, ROWS, 0, num_warps)),
            (_gl_consumer, (Q, K, V, O, LSE, group, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh,
                            stride_kn, stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                            seq_q, seq_k, heads_q, num_m, num_units, qk_scale, k_smem, v_smem, k_ready, v_ready,
                            empty, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL, STORE_LSE, NEG_SCALE, True, REVERSE,
                            OVERLAP, PERSISTENT, ROWS, 1, num_warps)),
            (_gl_producer, (K, V, group, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                            seq_k, num_m, heads_q, num_units, k_smem, v_smem, k_ready, v_ready, empty,
                            HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL, REVERSE, PERSISTENT)),
        ], [num_warps, 1], [CONSUMER_REGS, PRODUCER_REGS])
    elif WS:
        gl.warp_specialize([
            (_gl_consumer, (Q, K, V, O, LSE, group, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh,
                            stride_kn, stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                            seq_q, seq_k, heads_q, num_m, num_units, qk_scale, k_smem, v_smem, k_ready, v_ready,
                            empty, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL, STORE_LSE, NEG_SCALE, WS, REVERSE,
                            OVERLAP, PERSISTENT, ROWS, 0, num_warps)),
            (_gl_producer, (K, V, group, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                            seq_k, num_m, heads_q, num_units, k_smem, v_smem, k_ready, v_ready, empty,
                            HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL, REVERSE, PERSISTENT)),
        ], [1], [PRODUCER_REGS])
    else:
        _gl_consumer(Q, K, V, O, LSE, group, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                     seq_q, seq_k, heads_q, num_m, num_units, qk_scale, k_smem, v_smem, k_ready, v_ready, empty,
                     HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL, STORE_LSE, NEG_SCALE, WS, REVERSE, OVERLAP,
                     PERSISTENT, ROWS, 0, num_warps)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(k_ready.index(s))
        mbarrier.invalidate(v_ready.index(s))
        mbarrier.invalidate(empty.index(s))
