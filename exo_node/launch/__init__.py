"""`exo-cluster`: brings up one exo-node per GPU (or CPU slot), on this host or over ssh, and supervises them."""
