"""exo-node: a peer-to-peer LLM inference cluster. Each node runs a contiguous range of layers."""
__version__ = "0.1.0"

import os
# gRPC's older I/O manager, not its EventEngine, for every channel and server: read before grpc is first imported.
# The EventEngine's threads add ~50 us to every message each way (a one-way ring of two processes, 3 ms between
# messages, 2-core CPU: 280 -> 180 us round trip), and a pipeline pays it on every hop of every token.
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_listener")
