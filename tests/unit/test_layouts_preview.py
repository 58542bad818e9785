"""The layout preview builds the real parallel layout on meta tensors, for any world size, in one process."""

import math

from resurgo.checkpoint.state.layout import TensorLayout
from resurgo.launch.layouts import target_layouts
from resurgo.trainer.config import load_config


def test_preview_covers_every_tensor_on_every_rank_once():
    cfg = load_config({"parallel": {"pp": 2, "tp": 2}})
    entries = target_layouts(cfg, world_size=8)
    by_name = {e["layout"]["name"]: e for e in entries}
    assert len(by_name) == len(entries)
    params = [n for n in by_name if n.startswith("model/")]
    assert len(params) == 4 * 9 + 3  # 4 blocks of 9 tensors, embedding, final norm, output
    assert all(f"optim/state/{n.removeprefix('model/')}/exp_avg" in by_name for n in params)
    embedding = TensorLayout.from_json(by_name["model/tok_embeddings.weight"]["layout"])
    output = TensorLayout.from_json(by_name["model/output.weight"]["layout"])
    assert set(embedding.ranks) == {0, 1, 2, 3} and set(output.ranks) == {4, 5, 6, 7}  # first and last stage
    # The shards of every rank tile the tensor exactly (dp_shard=2 over tp=2: strided shards).
    covered = sum(box.numel for r in embedding.ranks for box in embedding.fragment(r).boxes())
    assert covered == math.prod(embedding.shape)
