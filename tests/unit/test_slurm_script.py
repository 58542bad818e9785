"""launch/slurm.sbatch's rendezvous: etcd members on the first nodes where etcd is installed, else c10d."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "slurm.sbatch"


def srun_args(tmp_path: Path, hosts: list[str], **env: str) -> list[str]:
    """The arguments the script gives srun, with SLURM's commands replaced by stand-ins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_ins = {"scontrol": "printf '%s\\n' " + " ".join(hosts), "srun": 'printf "%s\\n" "$@"'}
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "n[0-9]",
        "SLURM_NNODES": str(len(hosts)),
        "SLURM_JOB_NAME": "demo",
        "SLURM_JOB_ID": "7",
        "SLURM_GPUS_ON_NODE": "8",
        **env,
    }
    done = subprocess.run(["bash", str(SCRIPT), "parallel.tp=8"], capture_output=True, text=True, env=environment)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.parametrize(
    "hosts, cluster",
    [
        (["a", "b", "c", "d"], "a=a:2379:2380,b=b:2379:2380,c=c:2379:2380"),
        (["a", "b"], "a=a:2379:2380"),
    ],
)
def test_etcd_members_run_on_the_first_nodes(tmp_path, hosts, cluster):
    args = srun_args(tmp_path, hosts, RDZV_BACKEND="etcd")
    assert args[args.index("--rdzv-backend") + 1] == "etcd" and "--rdzv-endpoint" not in args
    assert args[args.index("--etcd-cluster") + 1] == cluster
    assert args[args.index("--nnodes") + 1] == f"{len(hosts) - 1}:{len(hosts)}" and args[-2:] == ["--", "parallel.tp=8"]


def test_c10d_puts_the_store_on_the_first_node(tmp_path):
    args = srun_args(tmp_path, ["a", "b", "c"], RDZV_BACKEND="c10d")
    assert args[args.index("--rdzv-backend") + 1] == "c10d" and args[args.index("--rdzv-endpoint") + 1] == "a:29500"
    assert "--etcd-cluster" not in args
