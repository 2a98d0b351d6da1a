"""exo-node: a peer-to-peer LLM inference cluster. Each node runs a contiguous range of layers."""
__version__ = "0.1.0"
