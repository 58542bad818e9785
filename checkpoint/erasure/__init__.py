"""L2, erasure coding across nodes: the Reed-Solomon code, the erasure plan as pure data, where
shares are scaled, the keeper-to-keeper wire, the parity service, and reading (and decoding) what
peers' memory holds, for the keeper's rebuilds and the workers' restores alike."""
