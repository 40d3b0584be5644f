"""The tamper-evident audit log: segments on disk and the Merkle tree over them."""
