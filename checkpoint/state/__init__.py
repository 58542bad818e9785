"""What state is and where each rank's piece of it lives: Stateful adapters, named tensors and their
JSON tree, fragments of global tensors, slot layouts, dtypes and checksums. Imports nothing above it."""
