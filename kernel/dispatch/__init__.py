"""The dispatcher: tuned configs in memory, and the rules that pick one config per call.

Importing this module reads the winners of every visible GPU's arch from the database in one
query (`db.store.load_winners`) and keeps them in an immutable in-memory table. A call never
touches the database or the filesystem: it is resolved once per distinct input signature
(shapes, strides, dtypes, devices, causal) and memoised, so the steady state is one dict lookup.

Rules, in order, for a call of op P ("fwd": the forward, "bwd": its backward, "kvcache":
attention_kvcache, with Nk the cache length Nmax and causal bottom-right) on a CUDA tensor of arch A
with shape (B, Hq, Hkv, Nq, Nk, D, dtype, causal), whose key carries the workload: BH = B·Hq rounded to
a power of two (db.types.bucket) and G = Hq/Hkv:
1. `FLASHTUNE_CONFIG` (e.g. `m64-n32-w4-s2`) forces that config for every forward call (debugging).
2. The winner stored for exactly (A, P, Nq, Nk, D, dtype, causal, BH, G).
3. Else the nearest tuned entry with the same (A, P, D, dtype, causal) and group class (G = 1, or
   G > 1): the entry minimising |log2(Nq/n)| + |log2(Nk/n_kv)| + |log2(BH/bh)| (+1 where the entry
   has no bucket, schema 1; +0.5 for another G of the class); a tie goes to the larger n, n_kv, bh.
   Only entries within NEAREST_LIMIT (2: e.g. twice the length and twice the bucket) count: the
   rule interpolates between tuned keys and never extrapolates far past them into losses.
4. Else the bundled winners shipped in the wheel for this GPU's model (db.bundled: same device name and SM
   count; FLASHTUNE_BUNDLED=arch takes any model of A, =0 none), by rules 2 and 3 over them: a key the user's
   database tunes exactly or nearby never reaches them. A bundled winner tuned with another kernel version
   than the installed op's is left out at load (`explain` names it for its key). `Choice.layer` says
   "database" or "bundled".
5. Else the op's default for A and the device's shared-memory limit (`kernel.ops.fwd.default_config`,
   `kernel.ops.bwd.default_bwd_config`, `kernel.ops.kvcache.default_decode_config` with the SM count).
Each op's default, shared-memory estimate and knob check are one entry of `kernel.ops.OPS`.

A training call (inputs that require grad) is decided as a pair: `train_plan` applies rules 2-4 to its
"train" key, whose winner is a kernel forward+backward pair (kernel.ops.train) or an SDPA backend that runs
both passes; where no pair is tuned near the key, the forward's plan and the "bwd" table's config apply,
each on its own.

The package: `table` loads the winners (once at import, and at `reload()`), `rules` applies the rules above
(pure: no torch, no state), `plans` resolves each call and memoises the result per input signature.

"kvcache" buckets the cache length: a decode loop's Nk grows by one every token, so per-Nk plans would
re-resolve on every step. Unless a winner is stored for exactly the call's key, rules 2-5 apply to the
key with Nk replaced by `kv_bucket(Nk)` (the nearest power of two in log2, halfway up: 1449..2896 ->
2048), and `kvcache_plan` memoises per signature with Nk bucketed the same way. The chosen config's
num_splits is a count, so the split size still follows the exact Nk (kernel.ops.kvcache.split_geometry).
Every call is still validated for what the bucketed signature does not fix (v's exact shape, each
cache's 32-bit head span, which grows with Nk and the strides), and records its plan's key (Nk's
bucket, or the exact key where a winner is stored for it: `kvcache_key`).
A winner is a config of the kernel or an SDPA backend (`provider` knob, kernel.sdpa): a call whose
choice is a backend runs torch SDPA pinned to it, and falls back to the winner's kernel config
(`kernel_config`) if the backend refuses the inputs. `explain(..., kernel_only=True)` gives the
kernel config alone (what `flashtune bench` times as the kernel).
A stored config (2, 3 or 4) is used only if its op's estimated shared memory fits the device and the
op's kernel knows its extra knobs (kernel.ops.OPS). One from an older kernel version is used with one warning;
if it then fails to compile, the call and every later one with that config fall back to the default
(also with one warning). An override the kernel cannot run is ignored with one warning at load.

CPU tensors (only under TRITON_INTERPRET=1) never consult the table: they get the default for the
nominal arch `INTERPRETER_ARCH` (the interpreter has no shared-memory limit or timing to tune).
A table loaded with `reload(..., interpreter=True)` (tests, or checking a tuned table without a GPU)
is the exception: CPU tensors then take the rules above from its `INTERPRETER_ARCH` entries, with
that arch's planning shared-memory limit, an SDPA backend winner included.
"""
from __future__ import annotations

from .plans import (INTERPRETER_ARCH, KVCachePlan, Plan, backend_refused, bwd_choice, bwd_config, bwd_config_failed,
                    config_failed, explain, feature_fields, kvcache_backend_refused, kvcache_config_failed, kvcache_key,
                    kvcache_plan, lookup, plan,
                    stored_config_failed, train_plan, VarlenPlan, varlen_plan)
from .rules import (BUNDLED, CONFIG_ENV_VAR, DATABASE, DEFAULT, EXACT, KV_OP, NEAREST, NEAREST_LIMIT, OP, OVERRIDE,
                    TRAIN_OP, VARLEN_BWD_OP, VARLEN_OP, Choice, kv_bucket)
from .table import DispatchWarning, LoadInfo, info, reload, visible_archs, visible_gpus

__all__ = ["BUNDLED", "CONFIG_ENV_VAR", "DATABASE", "DEFAULT", "EXACT", "INTERPRETER_ARCH", "KV_OP", "NEAREST", "NEAREST_LIMIT", "OP",
           "OVERRIDE", "TRAIN_OP", "Choice", "DispatchWarning", "KVCachePlan", "LoadInfo", "Plan", "backend_refused",
           "bwd_choice", "bwd_config", "bwd_config_failed", "config_failed", "explain", "feature_fields", "info",
           "kv_bucket",
           "kvcache_backend_refused", "kvcache_config_failed", "kvcache_key", "kvcache_plan", "lookup", "plan", "reload",
           "stored_config_failed", "train_plan", "visible_archs", "visible_gpus", "VARLEN_BWD_OP", "VARLEN_OP",
           "VarlenPlan", "varlen_plan"]
