"""L3, the universal store: a checkpoint as one zarr v3 group with one consolidated array per tensor;
save plans, chunk writes and reads, the atomic commit, metadata, codecs, safetensors interop, and
what the `resurgo-ckpt` commands compute. A new checkpoint format goes here."""
