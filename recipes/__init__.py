"""The packaged Hydra config tree (data only)."""
