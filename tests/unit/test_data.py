import numpy as np
import pytest
import torch

from resurgo.trainer import data
from resurgo.trainer.config import DataConfig
from resurgo.trainer.data import ByteTokenizer, GlobalSampler, load_tokens, read_ahead, token_stream


def make(seed: int = 7) -> GlobalSampler:
    return GlobalSampler(np.arange(1000, dtype=np.uint16) % 256, seq_len=16, seed=seed)


def global_batches(dp: int, steps: int, batch: int = 8) -> list[torch.Tensor]:
    samplers = [make() for _ in range(dp)]
    out = []
    for _ in range(steps):
        parts = [s.next_batch(global_batch=batch, dp_rank=r, dp=dp)[0] for r, s in enumerate(samplers)]
        out.append(torch.cat(parts))
    return out


def test_same_global_stream_for_any_dp_degree():
    reference = global_batches(1, 20)  # 20 steps of 8 crosses several epochs of 62 samples
    for dp in (2, 4):
        for a, b in zip(reference, global_batches(dp, 20)):
            assert torch.equal(a, b)


def test_deterministic_and_targets_are_shifted_inputs():
    x1, y1 = make().next_batch(global_batch=4, dp_rank=0, dp=1)
    x2, _ = make().next_batch(global_batch=4, dp_rank=0, dp=1)
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    assert not torch.equal(x1, make(seed=8).next_batch(global_batch=4, dp_rank=0, dp=1)[0])


def test_resume_continues_the_stream_on_another_dp_degree():
    straight = make()
    for _ in range(3):
        straight.next_batch(global_batch=8, dp_rank=0, dp=1)
    expected = straight.next_batch(global_batch=8, dp_rank=0, dp=1)[0]
    saved = make()
    for _ in range(3):
        saved.next_batch(global_batch=8, dp_rank=1, dp=2)
    resumed = [make(), make()]
    for r in resumed:
        r.load_state_dict(saved.state_dict())
    got = torch.cat([r.next_batch(global_batch=8, dp_rank=i, dp=2)[0] for i, r in enumerate(resumed)])
    assert torch.equal(got, expected)


def test_mismatched_stream_is_refused():
    with pytest.raises(ValueError, match="seq_len"):
        GlobalSampler(np.zeros(100, np.uint16), seq_len=8, seed=7).load_state_dict(make().state_dict())


def test_sources(tmp_path):
    tok = ByteTokenizer()
    assert len(load_tokens(DataConfig(), tok)) > 3_000_000
    (tmp_path / "a.txt").write_text("hello")
    assert load_tokens(DataConfig(source=str(tmp_path / "a.txt")), tok).tolist() == list(b"hello")
    (tmp_path / "a.jsonl").write_text('{"text": "ab"}\n{"text": "c"}\n')
    assert load_tokens(DataConfig(source=str(tmp_path / "a.jsonl")), tok).tolist() == list(b"ab\n\nc")
    np.arange(10, dtype=np.uint32).tofile(tmp_path / "t.bin")
    assert load_tokens(DataConfig(source=str(tmp_path / "t.bin"), token_dtype="uint32"), tok).tolist() == list(
        range(10)
    )
    np.save(tmp_path / "t.npy", np.arange(5, dtype=np.uint16))
    assert load_tokens(DataConfig(source=str(tmp_path / "t.npy")), tok).tolist() == list(range(5))
    with pytest.raises(ValueError, match="not a file"):
        load_tokens(DataConfig(source=str(tmp_path / "missing.txt")), tok)


def test_the_token_stream_read_ahead_is_what_workers_get_without_reading_again(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("warm")
    cfg = DataConfig(source=str(tmp_path / "a.txt"))
    read_ahead(DataConfig(source=str(tmp_path / "missing.txt")))  # left for the worker to report
    read_ahead(cfg)
    monkeypatch.setattr(data, "load_tokens", lambda *_: pytest.fail("read again"))
    assert token_stream(cfg, ByteTokenizer()).tolist() == list(b"warm")
