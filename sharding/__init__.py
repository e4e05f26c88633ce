"""Meshes, logical-axis rules and multi-host start-up: generic JAX, independent of the model package
(the memory planner that reads the model lives with it)."""

from sharding.distributed import add_distributed_args, init_distributed
from sharding.mesh import MESH_AXES, make_mesh, mesh_spec, parse_mesh_spec
from sharding.rules import (RULES, batch_sharding, get_rules, init_sharded, logical_to_mesh, put_global,
                            shard_model, state_shardings, suggest_mesh)

__all__ = ["MESH_AXES", "RULES", "add_distributed_args", "batch_sharding", "get_rules", "init_distributed",
           "init_sharded", "logical_to_mesh", "make_mesh", "mesh_spec", "parse_mesh_spec", "put_global",
           "shard_model", "state_shardings", "suggest_mesh"]
