"""The engine owns tinygrad on a node: its model, the KV sessions of the requests it serves, and the passes it runs
for them (core), with prompts in prefill steps (prefill), single-token steps batched across requests (batching),
and a lone request's next pass launched ahead of its input (ahead)."""
from exo_node.engine.core import Engine
from exo_node.engine.steps import EngineError, SessionLimitError

__all__ = ["Engine", "EngineError", "SessionLimitError"]
