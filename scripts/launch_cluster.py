#!/usr/bin/env python3
"""Bring up a whole cluster: one exo-node per GPU (or CPU slot), here or over ssh. Same as the `exo-cluster` command."""
from exo_node.launch.cli import main

if __name__ == "__main__": main()
