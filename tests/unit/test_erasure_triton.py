"""The Triton kernel, run by Triton's CPU interpreter, computes the reference's bytes exactly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

# The interpreter is chosen when triton is imported, so the kernel runs in a fresh process.
SCRIPT = textwrap.dedent(
    """
    import os
    assert os.environ["TRITON_INTERPRET"] == "1"
    import numpy as np, torch
    import gf256_reference as ref
    from resurgo.kernels import gf256
    from resurgo.kernels.erasure_triton import combine_triton

    rng = np.random.default_rng(0)
    cases = [(1, 1, 4), (3, 1, 8), (4, 2, 60), (5, 3, 128), (8, 4, 4100 * 4 + 8)]
    for n, r, width in cases:
        matrix = rng.integers(0, 256, (r, n), dtype=np.uint8)
        matrix[0, 0] = 0
        src = rng.integers(0, 256, (n, width), dtype=np.uint8)
        out = torch.empty((r, width), dtype=torch.uint8)
        combine_triton(matrix, torch.from_numpy(src), out)
        if width <= 128:
            want = ref.combine(matrix.tolist(), [s.tobytes() for s in src])
        else:
            dsts = [np.empty(width, np.uint8) for _ in range(r)]
            gf256.combine_numpy(matrix, list(src), dsts)
            want = [d.tobytes() for d in dsts]
        assert [o.numpy().tobytes() for o in out] == want, (n, r, width)

    # a full round trip: encode with the Cauchy rows, lose two data buffers, rebuild them
    k, m, width = 4, 2, 64
    data = torch.from_numpy(rng.integers(0, 256, (k, width), dtype=np.uint8))
    parity = torch.empty((m, width), dtype=torch.uint8)
    combine_triton(gf256.cauchy_parity(k, m), data, parity)
    assert [p.numpy().tobytes() for p in parity] == ref.encode([d.numpy().tobytes() for d in data], m)
    have = [2, 3, 4, 5]
    g = gf256.generator(k, m)
    rows = gf256.mat_inv(g[have])[[0, 1]]
    rebuilt = torch.empty((2, width), dtype=torch.uint8)
    combine_triton(rows, torch.cat([data[2:], parity]), rebuilt)
    assert torch.equal(rebuilt, data[:2])

    # the device path's staging: ragged sources read as zero-extended, outputs cut to their lengths
    from resurgo.checkpoint.erasure import code as erasure
    ragged = [torch.from_numpy(rng.integers(0, 256, n, dtype=np.uint8)) for n in (70, 3, 0, 65)]
    parity = [torch.empty(70, dtype=torch.uint8) for _ in range(3)]
    matrix = gf256.cauchy_parity(4, 3)
    for start in range(0, 70, 64):
        erasure._cuda_chunk(matrix, ragged, parity, start=start, stop=min(start + 64, 70))
    want = ref.encode([r.numpy().tobytes() for r in ragged], 3)
    assert [p.numpy().tobytes() for p in parity] == want
    short = torch.empty(5, dtype=torch.uint8)
    erasure._cuda_chunk(matrix[:1], ragged, [short], start=0, stop=64)
    assert short.numpy().tobytes() == want[0][:5]

    # a worker's scaled shares (fault.erasure.encode=device), through the kernel, as the holders would scale them
    from resurgo.checkpoint.state.slot_layout import SlotLayout
    from resurgo.checkpoint.erasure.coding import NodeCoding, share_recipe
    from resurgo.checkpoint.snapshot.engine import Shares, scale_on_device
    erasure._on_device = lambda srcs: all(isinstance(b, torch.Tensor) for b in srcs)
    tensors = [torch.randn(33, 7), torch.zeros(0), torch.arange(50, dtype=torch.int16), torch.randn(6, 4)[:, 1:3]]  # the last one not contiguous
    layout = SlotLayout.build([(f"t{i}", str(t.dtype)[6:], tuple(t.shape), t.numel() * t.element_size(), {})
                               for i, t in enumerate(tensors)])
    slot = torch.zeros(layout.nbytes, dtype=torch.uint8)
    for e, t in zip(layout.entries, tensors):
        slot[e.offset : e.offset + e.nbytes] = t.reshape(-1).view(torch.uint8)
    recipe = share_recipe(NodeCoding(3, ((0, 700), (1, layout.nbytes))), 1, m=3, token="t")
    assert len(recipe.ranges) >= 2  # the slot straddles segments, so coefficients change inside it
    want = np.zeros(2 * layout.nbytes, dtype=np.uint8)
    recipe.scale(slot.numpy(), want)
    got = torch.zeros(2 * layout.nbytes, dtype=torch.uint8)
    scale_on_device(Shares(recipe, got, slot, layout), tensors)
    assert got.numpy().tobytes() == want.tobytes()
    print("ok")
    """
)


def test_interpreted_kernel_equals_reference() -> None:
    here = Path(__file__).parent
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-4000:]
