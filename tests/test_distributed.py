"""Two CPU processes (gloo) against one: the same loss curve for the same global batch, and
the same teacher shards when the build is split between processes."""

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distill_helpers import build_data, tiny_config, write_teacher_file

from comfyui_ternary_flux.distill.distributed import DistEnv
from comfyui_ternary_flux.distill.student import load_student
from comfyui_ternary_flux.distill.teacher import TeacherDataset
from comfyui_ternary_flux.distill.train import distill


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, job: str, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    env = DistEnv(rank, world, 0, torch.device("cpu"))
    tmp = Path(tmp)
    try:
        if job == "teacher":
            build_data(tmp / "data-2", rank=rank, world_size=world, barrier=env.barrier)
        else:
            config = tiny_config(tmp, output=tmp / "two.safetensors", work_dir=tmp / "two")
            student = load_student(config.model, config.lora_rank, dtype=torch.float32)
            result = distill(student, TeacherDataset(config.data), config, env, log=print)
            torch.save(result.losses, tmp / f"losses-{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(job: str, tmp: Path) -> None:
    mp.spawn(_worker, args=(2, free_port(), job, str(tmp)), nprocs=2, join=True)


def test_two_processes_give_the_one_process_loss_curve(tmp_path):
    build_data(tmp_path / "data")
    write_teacher_file(tmp_path / "teacher.safetensors")
    config = tiny_config(tmp_path, output=tmp_path / "one.safetensors", work_dir=tmp_path / "one")
    student = load_student(config.model, config.lora_rank, dtype=torch.float32)
    one = distill(student, TeacherDataset(config.data), config, log=lambda _: None).losses
    spawn("train", tmp_path)
    two = torch.load(tmp_path / "losses-0.pt")
    assert two == torch.load(tmp_path / "losses-1.pt")  # every rank sees the global loss
    assert len(two) == len(one) == config.steps
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=0)
    assert one[-1] < one[0]


def test_teacher_build_split_over_two_processes_gives_the_same_shards(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: CPU float sums depend on the thread count
    try:
        one = build_data(tmp_path / "data-1")
    finally:
        torch.set_num_threads(threads)
    spawn("teacher", tmp_path)
    two = (tmp_path / "data-2" / "manifest.json").read_text()
    assert '"complete": true' in two
    for shard in one["shards"]:
        a = (tmp_path / "data-1" / shard["file"]).read_bytes()
        assert a == (tmp_path / "data-2" / shard["file"]).read_bytes(), shard["file"]
