"""The copies of one model's weights that a GRPO run keeps (qwq_jax/rl/grpo.py trains them), and how
each is made from the float32 masters.

    weights = WeightCopies(model, mesh, compute_copy="split", rollout_weights="split")
    params = weights.masters(model)           # float32, laid out by the `train` rules: what the optimizer updates
    compute = weights.compute(params)         # inside the jitted update: what the micro-batches run on
    model, layers = weights.bind(compute, params, weights.frozen)   # ... as a model to call
    weights.sync(engine, params)              # the rollout engine's copy of the current weights

The masters (and the optimizer state beside them) are held by the trainer, which updates them;
`WeightCopies` holds what stays fixed: the layouts (tree structures, dtypes, shardings), the KL
reference (`ref`) and a LoRA run's frozen base (`frozen`).

Sharding: with `mesh`, the fp32 master weights (and the AdamW state laid out as them) follow the
`train` rules (FSDP over `fsdp`, tensor parallel over `tensor`); the KL reference is a copy in the
model's dtype laid out as the masters. The rollout engine gets a copy in the model's dtype laid
out by the `generate` rules, one array per layer (`rollout_weights="split"`: the engine's
layer_loop="split" reads each weight and its layer's KV cache in place), or decodes from the
masters themselves (`rollout_weights="master"`: no copy, 2x the weight reads, stacked).

Compute copies (`compute_copy`, what the update's forward and backward read): "split", every
master but the embedding table cast to the compute dtype once per update, each layer's weights
arrays of their own (straight-line layers: no weight slices of the stacks copied per
micro-batch, benchmarks/gpu_aot.py), shared by the micro-batches; "step", that copy stacked
[L, ...] (a lax.scan over layers: compiles faster); "micro_batch", the masters themselves, each
micro-batch casting each weight where it is used (forward, remat recompute, backward: least
memory, most traffic).

LoRA (a model with `model.lora`, qwq_jax/lora.py): only the adapters are trained. They are the
float32 masters, the optimizer's parameters and, with its state, all a checkpoint holds; the base
stays frozen as the model holds it (the compute dtype, or int8: QLoRA), split once into one array
per layer (`split_layers`), which the update's forward and the rollout engine both read in place:
no float32 copy, no optimizer state, nothing synced but the adapters (cast to the model's adapter
dtype). The KL reference is the base itself (the initial adapters, B = 0). `compute_copy` then only
says whether the adapters are cast to the compute dtype once per update ("split", "step") or used
as float32 ("micro_batch"); `rollout_weights` does not apply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qwq_jax.lora import LoRAParam
from qwq_jax.model import Qwen2, drop_axes, split_layers
from qwq_jax.rl.losses import tis_default

if TYPE_CHECKING:
    from qwq_jax.generate import Engine

ROLLOUT_WEIGHTS = ("split", "master")
COMPUTE_COPIES = ("split", "step", "micro_batch")


def _merge_trees(a: Mapping, b: Mapping) -> dict:
    """Two nested dicts with disjoint leaves (a frozen base and its adapters) as one."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge_trees(out[k], v) if k in out else v
    return out


class WeightCopies:
    """The layouts of one model's weights and the copies made from its float32 masters: the compute
    copy of an update, the rollout engine's copy, the KL reference and a LoRA run's frozen base.

    Holds no reference to `model`'s arrays (the caller may delete it) except, with LoRA, the base
    that `freeze` takes over. The masters are nested dicts of arrays (`nnx.to_pure_dict` of the
    trainable state: the whole model, or with LoRA the adapters alone).
    """

    def __init__(self, model: Qwen2, mesh: Any = None, compute_copy: str = "split", rollout_weights: str = "split"):
        if compute_copy not in COMPUTE_COPIES or rollout_weights not in ROLLOUT_WEIGHTS:
            raise ValueError(f"compute_copy must be one of {', '.join(COMPUTE_COPIES)} and rollout_weights one of "
                             f"{', '.join(ROLLOUT_WEIGHTS)}, got {compute_copy!r}, {rollout_weights!r}")
        self.lora = getattr(model, "lora", None)
        self.compute_copy, self.rollout_weights = compute_copy, rollout_weights
        self.mesh = mesh
        self.graphdef, state = nnx.split(model)
        # An abstract model (qwq_jax.model.abstract_model, leaves ShapeDtypeStruct): no weights exist,
        # every copy is shapes placed on `mesh`, and only the update can be lowered.
        self.abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
        self.compute_dtype = jnp.dtype(model.dtype)
        self.num_layers = model.config.num_layers
        self._state_def = jax.tree.structure(state)
        self._layers_def = jax.tree.structure(state["layers"])
        trainable = self._trainable(model)
        pure = nnx.to_pure_dict(trainable)
        self._pure_def = jax.tree.structure(pure)
        self._engine_dtypes = [x.dtype for x in jax.tree.leaves(pure)]
        if mesh is not None:
            from sharding import state_shardings

            self.param_shardings = self._pure(state_shardings(trainable, mesh, "train"))
            engine_shardings = state_shardings(trainable, mesh, "generate")
        else:
            self.param_shardings = engine_shardings = None
        self.ref = None     # the KL reference (`add_reference`), laid out as the masters
        self.frozen = None  # LoRA: the base, its layers one tree per layer (read in place by update and engine)
        if self.lora is not None:
            self._to_engine_lora = jax.jit(self._lora_engine_fn)
        elif rollout_weights == "split":
            split_shardings = None
            if mesh is not None:
                rest = self._pure(engine_shardings)
                stacked = rest.pop("layers")
                one = jax.tree.map(lambda s, x: drop_axes(s, x.ndim, (0,)), stacked, pure["layers"])
                split_shardings = (rest, [one] * self.num_layers)
            self._to_engine_split = jax.jit(self._split_fn, out_shardings=split_shardings)

    # ---- trees and shardings --------------------------------------------------------------------
    def _trainable(self, model: Qwen2) -> nnx.State:
        """The trained part of `model`'s state: all of it, or with LoRA the adapters."""
        return nnx.state(model, LoRAParam) if self.lora is not None else nnx.state(model)

    def _pure(self, state_like) -> dict:
        """A trainable-state-shaped tree (nnx.State of anything) as the nested dict the masters are."""
        return jax.tree.unflatten(self._pure_def, jax.tree.leaves(state_like))

    def as_state(self, tree) -> nnx.State:
        """A whole-model tree (nested dicts in the model's order) as the model's `nnx.State`."""
        return jax.tree.unflatten(self._state_def, jax.tree.leaves(tree))

    def model(self, params) -> Qwen2:
        """The model on whole-model weights `params` (the graph of the model the copies were made of)."""
        return nnx.merge(self.graphdef, self.as_state(params))

    def build(self, fn: Callable, tree, shardings):
        """`fn(tree)` placed on `shardings`: computed, or for an abstract model its shapes only."""
        if not self.abstract:
            return jax.jit(fn, out_shardings=shardings)(tree)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            jax.eval_shape(fn, tree), shardings)

    # ---- the fixed copies: masters' initial values, the KL reference, the frozen base -----------
    def masters(self, model: Qwen2) -> dict:
        """`model`'s trainable weights (LoRA: the adapters) in float32, laid out by the `train` rules."""
        return self.build(lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t),
                          nnx.to_pure_dict(self._trainable(model)), self.param_shardings)

    def add_reference(self, masters, reference: Qwen2 | None = None) -> None:
        """Keep the KL reference as `ref`: `reference`'s weights, or else the initial `masters` (LoRA: the
        initial adapters, B = 0, i.e. the frozen base), in the model's dtype laid out as the masters."""
        ref = self._pure(nnx.state(reference)) if reference is not None else masters
        self.ref = self.build(lambda t: jax.tree.map(lambda x: x.astype(self.compute_dtype), t), ref,
                              self.param_shardings)

    def freeze(self, model: Qwen2) -> None:
        """LoRA: take over `model`'s base as `frozen`, its layers split into one tree per layer (the
        model's stacks deleted: do not use `model` afterwards). Without LoRA nothing is frozen."""
        if self.lora is None:
            return
        base = nnx.to_pure_dict(nnx.state(model, nnx.Not(LoRAParam)))
        self.frozen = dict(base, layers=split_layers(base["layers"], donate=True))

    def optimizer_shardings(self, optimizer: optax.GradientTransformation, masters) -> Any:
        """The shardings of `optimizer`'s state on `masters`: its per-parameter leaves (AdamW's moments)
        laid out as the masters, the rest (step counts) replicated; None without a mesh."""
        if self.mesh is None:
            return None
        from jax.sharding import NamedSharding, PartitionSpec

        abstract = jax.eval_shape(optimizer.init, masters)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return optax.tree_map_params(optimizer, lambda _, s: s, abstract, self.param_shardings,
                                     transform_non_params=lambda _: replicated)

    @staticmethod
    def _lora_layers(frozen, adapters: Sequence[Any]) -> list[dict]:
        """Per-layer trees of the whole model: the frozen base's layer i with adapters[i]."""
        return [_merge_trees(b, a) for b, a in zip(frozen["layers"], adapters)]

    # ---- the update's copy (traced inside the jitted update) ------------------------------------
    def compute(self, params) -> dict:
        """What the micro-batches run on (and differentiate). compute_copy "split" / "step": every
        float32 master but the embedding table cast to the compute dtype, once per update ("split":
        the layers as a list of per-layer trees). The model casts each weight to that dtype before
        any use, so the forward is unchanged, and the gradient of the copy, accumulated in float32,
        is the gradient of the master (the cast's transpose is that same conversion). The embedding
        stays float32: the model casts only its gathered rows, and its gradient sums repeated tokens.
        "micro_batch": the masters themselves. LoRA: the adapters, one tree per layer (as the frozen
        base), cast unless "micro_batch"."""
        dt = self.compute_dtype

        def cast(x):
            return x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dt else x

        if self.lora is not None:
            keep = self.compute_copy == "micro_batch"
            return {"layers": [jax.tree.map(lambda x, i=i: x[i] if keep else cast(x[i]), params["layers"])
                               for i in range(self.num_layers)]}
        if self.compute_copy == "micro_batch":
            return params

        out = {k: v if k in ("embed", "layers") else jax.tree.map(cast, v) for k, v in params.items()}
        if self.compute_copy == "split":  # a list: one tree of arrays per layer
            out["layers"] = [jax.tree.map(lambda x, i=i: cast(x[i]), params["layers"]) for i in range(self.num_layers)]
        else:
            out["layers"] = jax.tree.map(cast, params["layers"])
        return out

    def bind(self, compute, masters=None, frozen=None) -> tuple[Qwen2, list[dict] | None]:
        """The model to run on `compute` (`compute(masters)`, or any whole-model tree) and the per-layer
        weights to pass as its `layers` (None: the model's own stacks). LoRA (`frozen`, the frozen
        base as the jitted function was given it): the base plus the adapters `compute`, layer by
        layer. "split": the per-layer copy, the stacked masters only giving the graph its shapes."""
        if frozen is not None:
            layers = self._lora_layers(frozen, compute["layers"])
            return self.model(dict(frozen, layers=layers[0])), layers
        if isinstance(compute["layers"], list):
            return self.model(dict(compute, layers=masters["layers"])), compute["layers"]
        return self.model(compute), None

    # ---- the rollout engine's copy --------------------------------------------------------------
    def sync(self, engine: Engine, params) -> None:
        """Give `engine` the weights `params` (the masters): a copy in the model dtype and `generate`
        layout, one array per layer (rollout_weights="split"), or the fp32 master arrays themselves
        (rollout_weights="master"). LoRA: the frozen base's per-layer arrays themselves, with a copy of
        the adapters in the model's adapter dtype."""
        if self.frozen is not None:
            layers = self._lora_layers(self.frozen, self._to_engine_lora(params))
            engine.params = self.as_state(dict(self.frozen, layers=layers[0]))
            engine.layer_params = [jax.tree.unflatten(self._layers_def, jax.tree.leaves(lp)) for lp in layers]
        elif self.rollout_weights == "master":
            engine.params = self.as_state(params)
        else:
            rest, layers = self._to_engine_split(params)
            # The engine's graph still has `layers`: it holds layer 0's arrays (the same buffers).
            engine.params = self.as_state(dict(rest, layers=layers[0]))
            engine.layer_params = [jax.tree.unflatten(self._layers_def, jax.tree.leaves(lp)) for lp in layers]

    def engine_differs(self, engine: Engine) -> bool:
        """Whether `engine`'s numerics differ from the update's: another compute or KV-cache dtype, int8
        weights or an int8 KV cache (`losses.tis_default`; TIS is then on unless `tis = false`). A LoRA
        run's int8 base is no difference: the update reads the very same weights."""
        weights = jax.tree.leaves(engine.params)
        int8 = engine.kv_int8 or (self.lora is None and any(x.dtype == jnp.int8 for x in weights))
        return tis_default(self.compute_dtype, [engine.compute_dtype, engine.cache_dtype], int8=int8)

    def _engine_cast(self, params) -> dict:
        """`params` in the model's own dtypes (the engine's)."""
        return jax.tree.unflatten(self._pure_def, [x.astype(d) for x, d in
                                                   zip(jax.tree.leaves(params), self._engine_dtypes)])

    def _split_fn(self, params):
        """The engine's copy of `params` (model dtypes) as (everything but the layers, one tree per layer)."""
        cast = self._engine_cast(params)
        stacked = cast.pop("layers")
        return cast, [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(self.num_layers)]

    def _lora_engine_fn(self, params):
        """The engine's adapters: `params` in the model's adapter dtypes, one tree per layer."""
        cast = self._engine_cast(params)
        return [jax.tree.map(lambda x, i=i: x[i], cast["layers"]) for i in range(self.num_layers)]
