"""The engine's device programs over the paged KV cache (the host side is qwq_jax/generate.py).

    prefill  one chunk of one sequence `[1, C]` (C a bucket of the chunk's length) written into its
             pages at positions start..start+n-1; returns the logits of its last real token
    decode   up to `steps` decode steps (a runtime bound) of every slot at once, inside one
             `lax.while_loop`: draw a token from each slot's logits, count it, stop on EOS / stop
             ids / max_tokens, feed it back (its keys/values into the slot's pages), next logits
    insert   load a slot's rows of the carried per-slot state (logits, output counts, prompt mask)
    copy     copy one page to another in every layer (a shared prompt's partial last page)

Every shape is fixed by the engine's settings (slots, pages, page-table width, the stop-id width)
except the prefill chunk, bucketed: requests come and go without compiling anything new.

Row b of a decode step draws with the key `fold_in(key(seed_b), count_b)` (count_b: tokens it has
generated), and nothing in a step mixes rows (paged attention is row-exact, see
qwq_jax/paged_attention.py): a request's tokens do not depend on the other slots' contents.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwq_jax.model import Pages
from qwq_jax.sampling import SamplingArrays, sample

RUNNING, STOP, LENGTH = 0, 1, 2


class SlotInputs(NamedTuple):
    """Per-slot inputs of a decode call, `[B, ...]`, set by the host (sent again only when they change)."""

    active: jax.Array       # bool: a sequence runs in the slot
    max_tokens: jax.Array   # int32
    seeds: jax.Array        # uint32
    stop_ids: jax.Array     # int32 [B, W], -1 padded: EOS and the request's stop token ids
    arrays: SamplingArrays
    rope: tuple[jax.Array, jax.Array]  # inverse frequencies [B, 1, D/2], attention factors [B, 1, 1]
    page_tables: jax.Array  # int32 [B, max_pages]


class SlotState(NamedTuple):
    """What decode carries from call to call per slot, on the device (`insert` loads a slot)."""

    logits: jax.Array       # float32 [B, V]: the next token's logits
    counts: jax.Array       # int32 [B, V]: output token counts (penalties)
    prompt_mask: jax.Array  # bool [B, V]: tokens of the prompt (repetition penalty)
    count: jax.Array        # int32 [B]: tokens generated
    length: jax.Array       # int32 [B]: keys/values in the slot's pages


def unpack(packed: np.ndarray, chunk: int) -> tuple[np.ndarray, ...]:
    """A decode call's host output `[B, 2 * chunk + 3]` int32 as (tokens [B, chunk], their
    log-probs [B, chunk] float32, new tokens [B], lengths [B], finish [B])."""
    c = chunk
    return (packed[:, :c], packed[:, c:2 * c].view(np.float32), packed[:, 2 * c], packed[:, 2 * c + 1],
            packed[:, 2 * c + 2])


class Programs:
    """The jitted programs of one engine (`graphdef`: the model's graph; weights are arguments)."""

    def __init__(self, graphdef: Any, chunk: int, page_size: int, replicated: Any = None):
        """`replicated`: a sharding that replicates over the engine's mesh (None without one)."""
        self.graphdef, self.chunk, self.page_size, self.replicated = graphdef, chunk, page_size, replicated
        self.prefill = jax.jit(self._prefill_fn, donate_argnums=(1,))
        self.decode = jax.jit(self._decode_fn, donate_argnums=(1, 2))
        self.insert = jax.jit(self._insert_fn, donate_argnums=(0,))
        self.copy = jax.jit(self._copy_fn, donate_argnums=(0,))

    def compilations(self) -> int:
        """Programs compiled so far (each shape of each program once)."""
        return sum(f._cache_size() for f in (self.prefill, self.decode, self.insert, self.copy))

    def _merge(self, weights):
        params, layers = weights
        return nnx.merge(self.graphdef, params), layers

    def _slots(self, page_tables: jax.Array, positions: jax.Array, write: jax.Array) -> jax.Array:
        """Flat pool slots of `positions [B, T]` through `page_tables`; -1 where not `write`."""
        page = jnp.take_along_axis(page_tables, positions // self.page_size, axis=1, mode="clip")
        return jnp.where(write, page * self.page_size + positions % self.page_size, -1)

    def _prefill_fn(self, weights, pool, tokens, start, n, page_table, rope):
        """tokens `[1, C]` of which the first `n [1]` are real, at positions `start [1]` on."""
        model, layers = self._merge(weights)
        c = tokens.shape[1]
        positions = start[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]
        slots = self._slots(page_table, positions, jnp.arange(c)[None, :] < n[:, None])
        x, pages, _ = model.hidden_states(tokens, positions, pages=Pages(pool, page_table, slots, start + n),
                                          rope=rope, layers=layers)
        last = jnp.take_along_axis(x, (n - 1)[:, None, None], axis=1)  # [1, 1, E]
        return pages.pool, model.logits(last)[:, 0]

    def _decode_fn(self, weights, pool, state: SlotState, slots: SlotInputs, steps: jax.Array):
        model, layers = self._merge(weights)
        b = slots.active.shape[0]
        rows = jnp.arange(b)
        c = self.chunk

        def cond(carry):
            i, done = carry[0], carry[1]
            return (i < steps) & ~jnp.all(done)

        def body(carry):
            i, done, count, length, finish, new, out, logp, logits, counts, pool = carry
            keys = jax.vmap(lambda seed, k: jax.random.fold_in(jax.random.key(seed), k))(
                slots.seeds, count.astype(jnp.uint32))
            if self.replicated is not None:  # whole rows for the vocabulary sort of top-k/top-p: sorting
                # across `tensor` shards (vocab-sharded logits) made a step on two CPU devices 10x slower
                logits = jax.lax.with_sharding_constraint(logits, self.replicated)
            tok = sample(logits, slots.arrays, keys, counts, state.prompt_mask).astype(jnp.int32)
            tok = jnp.where(done, 0, tok)
            column = jnp.where(done, c, i)  # done rows write nowhere (dropped)
            out = out.at[rows, column].set(tok, mode="drop")
            lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=1)[:, 0]
            logp = logp.at[rows, column].set(lp, mode="drop")
            live = ~done
            counts = counts.at[rows, tok].add(live.astype(jnp.int32))
            count = count + live
            new = new + live
            hit = jnp.any(tok[:, None] == slots.stop_ids, axis=1) & live
            full = (count >= slots.max_tokens) & live & ~hit
            finish = jnp.where(hit, STOP, jnp.where(full, LENGTH, finish))
            done = done | hit | full
            feed = ~done  # the token goes back in: its keys/values at position `length`
            positions = length[:, None]
            write = self._slots(slots.page_tables, positions, feed[:, None])
            x, pages, _ = model.hidden_states(tok[:, None], positions,
                                              pages=Pages(pool, slots.page_tables, write, length + 1),
                                              rope=slots.rope, layers=layers)
            logits = jnp.where(feed[:, None], model.logits(x)[:, 0], logits)
            length = length + feed
            return i + 1, done, count, length, finish, new, out, logp, logits, counts, pages.pool

        zeros = jnp.zeros((b,), jnp.int32)
        carry = (jnp.int32(0), ~slots.active, state.count, state.length, zeros, zeros,
                 jnp.zeros((b, c), jnp.int32), jnp.zeros((b, c), jnp.float32), state.logits, state.counts, pool)
        _, done, count, length, finish, new, out, logp, logits, counts, pool = jax.lax.while_loop(cond, body, carry)
        # One host transfer (see `unpack`): tokens, log-prob bits, new counts, lengths, finish reasons.
        packed = jnp.concatenate([out, jax.lax.bitcast_convert_type(logp, jnp.int32),
                                  jnp.stack([new, length, finish], axis=1)], axis=1)
        return pool, self._placed(SlotState(logits, counts, state.prompt_mask, count, length)), packed

    def _placed(self, state: SlotState) -> SlotState:
        """The slot state as the engine places it (replicated on a mesh): decode and insert return
        what they take, so neither compiles again for the other's output."""
        if self.replicated is None:
            return state
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.replicated), state)

    def _insert_fn(self, state: SlotState, slot, logits, counts, prompt_mask, count, length) -> SlotState:
        return self._placed(SlotState(state.logits.at[slot].set(logits.reshape(-1).astype(state.logits.dtype)),
                                      state.counts.at[slot].set(counts), state.prompt_mask.at[slot].set(prompt_mask),
                                      state.count.at[slot].set(count), state.length.at[slot].set(length)))

    @staticmethod
    def _copy_fn(pool, src, dst):
        axis = 1 if pool.per_layer else 2  # [K, P, ...] per layer; [L, K, P, ...] stacked

        def copy(a):
            page = jax.lax.dynamic_index_in_dim(a, src, axis, keepdims=True)
            return jax.lax.dynamic_update_index_in_dim(a, page, dst, axis)

        return jax.tree.map(copy, pool)
