"""The engine's device programs over the paged KV cache (the host side is qwq_jax/generate.py).

    prefill  one chunk of one sequence `[1, C]` (C a bucket of the chunk's length) written into its
             pages at positions start..start+n-1; returns the logits of its last real token
    insert   load a slot: its rows of the carried state (output counts, prompt mask, lengths) and
             its first token, drawn from the prefill's logits (it streams before any decode call)
    decode   up to `steps` decode steps (a runtime bound) of every slot at once, inside one
             `lax.while_loop`: feed each slot's pending token (its keys/values into the slot's
             pages), draw the next from the new logits, count it, stop on EOS / stop ids /
             max_tokens; the drawn token is the next step's pending one
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

    token: jax.Array        # int32 [B]: the last token drawn, not yet fed to the model
    counts: jax.Array       # int32 [B, V]: output token counts (penalties)
    prompt_mask: jax.Array  # bool [B, V]: tokens of the prompt (repetition penalty)
    count: jax.Array        # int32 [B]: tokens generated (the pending one included)
    length: jax.Array       # int32 [B]: keys/values in the slot's pages (the pending token's not yet)


def unpack(packed: np.ndarray, chunk: int, top: int = 0) -> tuple[np.ndarray, ...]:
    """A decode call's host output `[B, 2 * chunk + 3 + 2 * chunk * top]` int32 as (tokens [B, chunk],
    their log-probs [B, chunk] float32, new tokens [B], lengths [B], finish [B], and with `top`
    > 0 the most likely tokens [B, chunk, top] and their log-probs [B, chunk, top] float32)."""
    c, b = chunk, packed.shape[0]
    out = (packed[:, :c], packed[:, c:2 * c].view(np.float32), packed[:, 2 * c], packed[:, 2 * c + 1],
           packed[:, 2 * c + 2])
    if top:
        at = 2 * c + 3
        out += (packed[:, at:at + c * top].reshape(b, c, top),
                np.ascontiguousarray(packed[:, at + c * top:]).view(np.float32).reshape(b, c, top))
    return out


class Programs:
    """The jitted programs of one engine (`graphdef`: the model's graph; weights are arguments)."""

    def __init__(self, graphdef: Any, chunk: int, page_size: int, replicated: Any = None, top_logprobs: int = 0):
        """`replicated`: a sharding that replicates over the engine's mesh (None without one);
        `top_logprobs`: the most likely tokens' log-probs each step can return (0: none; computed
        only in steps where a slot asks for them)."""
        self.graphdef, self.chunk, self.page_size, self.replicated = graphdef, chunk, page_size, replicated
        self.top = top_logprobs
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
            i, done, count, length, finish, new, out, logp, token, counts, pool, topi, topv = carry
            feed = ~done  # the pending token goes in: its keys/values at position `length`
            positions = length[:, None]
            write = self._slots(slots.page_tables, positions, feed[:, None])
            x, pages, _ = model.hidden_states(token[:, None], positions,
                                              pages=Pages(pool, slots.page_tables, write, length + 1),
                                              rope=slots.rope, layers=layers)
            length = length + feed
            nxt, lp, (ti, tv) = self._draw(model.logits(x)[:, 0], slots.arrays, slots.seeds, count, counts,
                                           state.prompt_mask, want=~done)
            nxt = jnp.where(done, token, nxt)
            column = jnp.where(done, c, i)  # done rows write nowhere (dropped)
            out = out.at[rows, column].set(nxt, mode="drop")
            logp = logp.at[rows, column].set(lp, mode="drop")
            topi = topi.at[rows, column].set(ti, mode="drop")
            topv = topv.at[rows, column].set(tv, mode="drop")
            counts = counts.at[rows, nxt].add(feed.astype(jnp.int32))
            count = count + feed
            new = new + feed
            hit = jnp.any(nxt[:, None] == slots.stop_ids, axis=1) & feed
            full = (count >= slots.max_tokens) & feed & ~hit
            finish = jnp.where(hit, STOP, jnp.where(full, LENGTH, finish))
            return (i + 1, done | hit | full, count, length, finish, new, out, logp, nxt, counts, pages.pool,
                    topi, topv)

        zeros = jnp.zeros((b,), jnp.int32)
        k = self.top
        carry = (jnp.int32(0), ~slots.active, state.count, state.length, zeros, zeros,
                 jnp.zeros((b, c), jnp.int32), jnp.zeros((b, c), jnp.float32), state.token, state.counts, pool,
                 jnp.zeros((b, c, k), jnp.int32), jnp.zeros((b, c, k), jnp.float32))
        (_, done, count, length, finish, new, out, logp, token, counts, pool, topi,
         topv) = jax.lax.while_loop(cond, body, carry)
        # One host transfer (see `unpack`): tokens, log-prob bits, new counts, lengths, finish reasons
        # (and the top tokens and their log-prob bits).
        packed = jnp.concatenate([out, jax.lax.bitcast_convert_type(logp, jnp.int32),
                                  jnp.stack([new, length, finish], axis=1), topi.reshape(b, c * k),
                                  jax.lax.bitcast_convert_type(topv, jnp.int32).reshape(b, c * k)], axis=1)
        return pool, self._placed(SlotState(token, counts, state.prompt_mask, count, length)), packed

    def _draw(self, logits, arrays, seeds, count, counts, prompt_mask, want=None):
        """Each row's next token and its log-prob under the model (before penalties and
        temperature), and the `self.top` most likely tokens with theirs ([B, top] each; computed
        only when a row in `want` asks for them, else zeros); row b draws with the key
        `fold_in(key(seed_b), count_b)`."""
        keys = jax.vmap(lambda seed, k: jax.random.fold_in(jax.random.key(seed), k))(seeds, count.astype(jnp.uint32))
        if self.replicated is not None:  # whole rows for the top-k/top-p thresholds: a sort across
            # `tensor` shards (vocab-sharded logits) made a step on two CPU devices 10x slower, and each of
            # the bisection's 64 row reductions would cross the shards
            logits = jax.lax.with_sharding_constraint(logits, self.replicated)
        token = sample(logits, arrays, keys, counts, prompt_mask).astype(jnp.int32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        lp = jnp.take_along_axis(logp, token[:, None], axis=1)[:, 0]
        b, k = logits.shape[0], self.top
        none = (jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), jnp.float32))
        top = none
        if k:
            asked = arrays.logprobs > 0 if want is None else (arrays.logprobs > 0) & want

            def top_k():
                v, i = jax.lax.top_k(logp, k)
                return i.astype(jnp.int32), v

            top = jax.lax.cond(jnp.any(asked), top_k, lambda: none)
        return token, lp, top

    def _placed(self, state: SlotState) -> SlotState:
        """The slot state as the engine places it (replicated on a mesh): decode and insert return
        what they take, so neither compiles again for the other's output."""
        if self.replicated is None:
            return state
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.replicated), state)

    def _insert_fn(self, state: SlotState, slot, logits, counts, prompt_mask, count, length, arrays, seed):
        """Slot `slot` for a sequence with `count` tokens generated (their `counts`), `length`
        keys/values in its pages and `logits [1, V]` for its next token, drawn here: returns the
        state and `[token, log-prob bits, top tokens, their log-prob bits]` (int32 [2 + 2 * top])."""
        token, lp, (ti, tv) = self._draw(logits.reshape(1, -1).astype(jnp.float32), arrays, seed.reshape(1),
                                         count.reshape(1), counts[None], prompt_mask[None])
        state = SlotState(state.token.at[slot].set(token[0]), state.counts.at[slot].set(counts.at[token[0]].add(1)),
                          state.prompt_mask.at[slot].set(prompt_mask), state.count.at[slot].set(count + 1),
                          state.length.at[slot].set(length))
        return self._placed(state), jnp.concatenate([jnp.stack([token[0], jax.lax.bitcast_convert_type(lp[0], jnp.int32)]),
                                                     ti[0], jax.lax.bitcast_convert_type(tv[0], jnp.int32)])

    @staticmethod
    def _copy_fn(pool, src, dst):
        axis = 1 if pool.per_layer else 2  # [K, P, ...] per layer; [L, K, P, ...] stacked

        def copy(a):
            page = jax.lax.dynamic_index_in_dim(a, src, axis, keepdims=True)
            return jax.lax.dynamic_update_index_in_dim(a, page, dst, axis)

        return jax.tree.map(copy, pool)
