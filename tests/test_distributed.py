"""Several processes (gloo on CPU), gradient accumulation and the sharded data stream."""

import copy
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from dssn.engine.sampling import ResumableSampler
from nets import PixelwiseNet
from test_engine import tiny, tiny_overrides


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(fn, args, nprocs: int, timeout: float = 180) -> None:
    """``mp.spawn`` that fails (and kills the workers) instead of hanging when a worker waits forever."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    try:
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {nprocs} worker processes did not finish within {timeout} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()


def test_rank_shards_split_each_epoch_without_overlap():
    whole = list(ResumableSampler(11, seed=3))
    ranks = [ResumableSampler(11, seed=3, rank=r, world_size=2) for r in range(2)]
    shards = [list(s) for s in ranks]
    assert [len(s) for s in shards] == [5, 5]  # the tail is cut so both ranks take as many steps
    # Interleaved, the shards are the single-process order (and its per-sample seeds), first 10 positions.
    assert [shards[i % 2][i // 2] for i in range(10)] == whole[:10]
    # Skipping is per rank: rank 1 resuming after 3 of its samples continues with its 4th.
    ranks[1].set_epoch(0, 3)
    assert list(ranks[1]) == shards[1][3:]
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != shards[0]


def _join(rank: int, world: int, port: int) -> None:
    """This worker's torchrun-style environment, then the gloo group."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")  # train() joins this group and leaves it open


def _keep_final_networks(trainer_cls, kept: dict) -> None:
    """Make ``Trainer.fit`` also store every network's final state in ``kept``."""
    plain_fit = trainer_cls.fit

    def fit_and_keep(self):
        result = plain_fit(self)
        kept.update({name: copy.deepcopy(m.state_dict()) for name, m in self.method.modules().items()})
        return result

    trainer_cls.fit = fit_and_keep


def _ddp_worker(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    from dssn.config import build_config
    from dssn.engine import evaluate as ev
    from dssn.engine import trainer as tr
    from dssn.engine.distributed import DistInfo, all_reduce_sum, shard

    models = {}
    _keep_final_networks(tr.Trainer, models)
    first_labels = []
    plain_steps = tr.Trainer._steps

    def steps(self):  # remember which labeled images this rank trained on
        for micro_batches in plain_steps(self):
            if len(first_labels) < 3:
                first_labels.append(micro_batches[0].labeled[1].clone())
            yield micro_batches

    tr.Trainer._steps = steps
    _join(rank, world, port)
    try:
        result = tr.train(build_config(cfg_dict))

        # Distributed evaluation: 5 images on 2 ranks (3 + 2), against one process on all 5.
        g = torch.Generator().manual_seed(0)
        images = torch.randn(5, 3, 8, 8, generator=g)
        masks = torch.randint(0, 4, (5, 8, 8), generator=g)
        masks[:, 0] = 255
        data = TensorDataset(images, masks)
        mine = torch.utils.data.Subset(data, shard(range(len(data)), DistInfo(rank, world, rank)))
        net, cpu = PixelwiseNet(), torch.device("cpu")
        loader = torch.utils.data.DataLoader(mine, batch_size=2)
        dist_conf = ev.evaluate({"m": net}, loader, 4, cpu, reduce=all_reduce_sum)["m"].confusion
        whole = ev.evaluate({"m": net}, torch.utils.data.DataLoader(data, batch_size=2), 4, cpu)["m"]
    finally:
        torch.distributed.destroy_process_group()
    dumped = dict(models=models, first_labels=first_labels, confusion=dist_conf, whole_confusion=whole.confusion,
                  n_shard=len(mine), final=result.final)
    torch.save(dumped, Path(out) / f"rank{rank}.pt")


def test_two_processes_train_as_one(data_root, tmp_path):
    """DDP on gloo: both ranks end with the same student and teacher, saw different images, only
    rank 0 wrote files, and sharded evaluation scores every image once."""
    run = tmp_path / "run"
    cfg = tiny(data_root, run, "method.name=dssn", "train.iters=4", "train.eval_every=1")
    run_processes(_ddp_worker, (2, free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for name in ("student", "teacher"):
        for key, value in r0["models"][name].items():
            assert torch.equal(value, r1["models"][name][key]), f"{name}.{key} differs between ranks"
    # Training moved the weights, and the teacher is an EMA (not a copy) of the student.
    assert not all(torch.equal(v, r0["models"]["teacher"][k]) for k, v in r0["models"]["student"].items()
                   if v.is_floating_point())
    assert not all(torch.equal(a, b) for a, b in zip(r0["first_labels"], r1["first_labels"]))
    assert r0["final"] == r1["final"]  # the same (all-reduced) scores on both ranks
    # Rank 0 owns the run folder: one metrics file, checkpoints, config.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["data"]["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2
    n_unlabeled = len((Path(data_root) / cfg.data.unlabeled_split).read_text().splitlines())
    assert ckpt["data"]["iters_per_epoch"] == n_unlabeled // 2 // 2  # each rank: half, in batches of 2
    # Evaluation: 3 + 2 images, the summed confusion equals one process over all 5.
    assert (r0["n_shard"], r1["n_shard"]) == (3, 2)
    assert torch.equal(r0["confusion"], r0["whole_confusion"]) and torch.equal(r1["confusion"], r0["confusion"])
    assert int(r0["confusion"].sum()) == 5 * 7 * 8  # every valid pixel of every image, once


def test_resuming_with_another_number_of_processes_is_refused(data_root, tmp_path):
    from dssn.engine.trainer import TrainingError, train

    run = tmp_path / "run"
    train(tiny(data_root, run, "method.name=supervised", "train.iters=4", "train.stop_after=2",
               "train.checkpoint_every=2"))
    ckpt = torch.load(run / "last.pt", weights_only=True)
    ckpt["data"].update(world_size=4, global_batch=[8, 0])  # what 4 processes of 2 labeled trained with
    torch.save(ckpt, run / "last.pt")
    with pytest.raises(TrainingError, match=r"trained by 4 process.*global batch of 8 images.*gives 2 \(2 per "
                                            r"process x 1 process x accumulate 1 = 2\).*train.allow_replan=true"):
        train(tiny(data_root, run, "method.name=supervised", "train.iters=4", "train.checkpoint_every=2"))
    # Asked for, it goes on with the new batch.
    result = train(tiny(data_root, run, "method.name=supervised", "train.iters=4", "train.checkpoint_every=2",
                        "train.allow_replan=true"))
    assert result.iters == 4


def test_torchrun_command_line(data_root, tmp_path):
    """The README's command: two CPU processes through torchrun; one table printed, one run folder."""
    run = tmp_path / "run"
    overrides = tiny_overrides(data_root, run, "method.name=supervised", "train.iters=2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dssn", "train", "synthetic", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("mIoU") >= 1 and done.stdout.count("student") == 1, done.stdout
    assert (run / "last.pt").is_file()



def test_accumulation_equals_one_step_over_the_summed_gradients(data_root, tmp_path, monkeypatch):
    """accumulate=2: two micro-batches, each loss halved, gradients summed, one SGD step; and an
    epoch has half as many (twice as large) steps."""
    from dssn.engine import trainer as tr

    seen = []
    plain_steps = tr.Trainer._steps

    def steps(self):
        for micro_batches in plain_steps(self):
            seen.append(micro_batches)
            yield micro_batches

    monkeypatch.setattr(tr.Trainer, "_steps", steps)
    cfg = tiny(data_root, tmp_path / "run", "method.name=supervised", "train.iters=1", "train.accumulate=2",
               "train.batch_size=2", "train.lr=0.05")
    for run in ("run", "run1"):
        (tmp_path / run).mkdir()
    trainer = tr.Trainer(cfg, tmp_path / "run")
    start = copy.deepcopy(trainer.method.student_net)
    single = tr.Trainer(tiny(data_root, tmp_path / "run1", "method.name=supervised", "train.batch_size=2"),
                        tmp_path / "run1")
    assert trainer.iters_per_epoch == single.iters_per_epoch // 2
    trainer.fit()
    assert len(seen) == 1 and len(seen[0]) == 2
    assert not torch.equal(seen[0][0].labeled[0], seen[0][1].labeled[0])

    reference = tr.build_optimizer(start, cfg)
    for group in reference.param_groups:
        group["lr"] = group["base_lr"]  # poly schedule at step 0
    start.train()
    for batch in seen[0]:
        x, y = batch.labeled
        (torch.nn.functional.cross_entropy(start(x), y, ignore_index=255) / 2).backward()
    reference.step()
    for (name, a), b in zip(trainer.method.student_net.named_parameters(), start.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


def _train_worker(rank: int, world: int, port: int, cfg_dicts: list, out: str) -> None:
    """Train each config in turn (2 processes), then save this rank's final networks."""
    from dssn.config import build_config
    from dssn.engine import trainer as tr

    kept = {}
    _keep_final_networks(tr.Trainer, kept)
    _join(rank, world, port)
    try:
        for cfg_dict in cfg_dicts:
            tr.train(build_config(cfg_dict))
    finally:
        torch.distributed.destroy_process_group()
    torch.save(kept, Path(out) / f"rank{rank}.pt")


MODELS = {"deeplabv3plus": (), "dpt": ("model.name=dpt", "model.backbone=dinov2_tiny", "model.pretrained=null",
                                       "data.crop_size=28", "train.optimizer=adamw", "train.lr=0.001"),
          # DINOv3 with the RoPE coordinate rescale on: its random factors must come back on resume too
          "dpt-dinov3": ("model.name=dpt", "model.backbone=dinov3_tiny", "model.pretrained=null",
                         "model.rope_rescale=2", "data.crop_size=32", "train.optimizer=adamw", "train.lr=0.001")}


@pytest.mark.parametrize("model", list(MODELS))
def test_two_process_run_resumes_exactly(data_root, tmp_path, model):
    """Stopped after 2 of 4 steps and resumed, a two-process run ends where an uninterrupted one
    does: every rank's data position and random streams come back from the checkpoint. Also
    with the DINOv2 + DPT network (DDP, AdamW's state, the feature dropout's draws)."""
    common = ("method.name=dssn", "train.iters=4", "train.checkpoint_every=2", "train.deterministic=true",
              "train.eval_every=100", *MODELS[model])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir()
    resumed.mkdir()
    run_processes(_train_worker, (2, free_port(), [tiny(data_root, tmp_path / "a", *common).to_dict()],
                                  str(straight)), nprocs=2)
    stop = tiny(data_root, tmp_path / "b", *common, "train.stop_after=2").to_dict()
    go_on = tiny(data_root, tmp_path / "b", *common).to_dict()
    run_processes(_train_worker, (2, free_port(), [stop, go_on], str(resumed)), nprocs=2)
    for rank in range(2):
        a = torch.load(straight / f"rank{rank}.pt", weights_only=True)
        b = torch.load(resumed / f"rank{rank}.pt", weights_only=True)
        for name in ("student", "teacher"):
            for key, value in a[name].items():
                assert torch.equal(value, b[name][key]), f"rank {rank}: {name}.{key}"


def _preempt_worker(rank: int, world: int, port: int, cfg_dicts: list, out: str) -> None:
    """One spawn, three runs: ``cfg_dicts[0]`` straight through; ``cfg_dicts[1]`` with SIGTERM to rank 1
    alone during step 2; then ``cfg_dicts[1]`` again, which resumes it."""
    import signal

    from dssn.config import build_config
    from dssn.engine import trainer as tr
    from dssn.errors import TrainingPreempted

    kept, seen, ran = {}, {}, []
    _keep_final_networks(tr.Trainer, kept)
    plain_step = tr.optimizer_step
    signal_at = [None]

    def counted_step(method, optimizer, micro_batches, step, *args, **kwargs):
        ran.append(step)
        if rank == 1 and step == signal_at[0]:
            os.kill(os.getpid(), signal.SIGTERM)
        return plain_step(method, optimizer, micro_batches, step, *args, **kwargs)

    tr.optimizer_step = counted_step
    _join(rank, world, port)
    try:
        tr.train(build_config(cfg_dicts[0]))
        straight = copy.deepcopy(kept)
        signal_at[0] = 1
        try:
            tr.train(build_config(cfg_dicts[1]))
        except TrainingPreempted as err:
            seen.update(status=err.exit_status, message=str(err))
        signal_at[0] = None
        tr.train(build_config(cfg_dicts[1]))
    finally:
        torch.distributed.destroy_process_group()
    torch.save({"straight": straight, "resumed": kept, "ran": ran, **seen}, Path(out) / f"rank{rank}.pt")


def test_sigterm_to_one_of_two_processes_stops_both_and_resumes_exactly(data_root, tmp_path):
    """Both ranks finish step 2, rank 0 writes its checkpoint, both stop with the preemption status;
    resumed, the run ends bit-identical to one that was never stopped (steps lost: 0)."""
    common = ("method.name=dssn", "train.iters=4", "train.checkpoint_every=100", "train.deterministic=true",
              "train.eval_every=100")
    cfgs = [tiny(data_root, tmp_path / run, *common).to_dict() for run in ("a", "b")]
    run_processes(_preempt_worker, (2, free_port(), cfgs, str(tmp_path)), nprocs=2)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert out["status"] == 75 and "after step 2/4" in out["message"] and "steps lost: 0" in out["message"]
        assert out["ran"] == [0, 1, 2, 3] + [0, 1] + [2, 3]  # straight; stopped after step 2; resumed there
        for name in ("student", "teacher"):
            for key, value in out["straight"][name].items():
                assert torch.equal(value, out["resumed"][name][key]), f"rank {rank}: {name}.{key}"
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4]  # step 2's checkpoint: nothing trained twice, nothing lost


@pytest.mark.parametrize(("nodelist", "host"), [
    ("node[01-03,07]", "node01"), ("node[01-03,07],gpu5", "node01"), ("gpu5,node[1-2]", "gpu5"),
    ("rack[1-2]-n[4-5]", "rack1-n4"), ("n[7]", "n7"), ("127.0.0.1", "127.0.0.1")])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    from dssn.engine.distributed import first_host

    assert first_host(nodelist) == host


def test_slurm_variables_give_torchruns_and_torchruns_win():
    from dssn.engine.distributed import slurm_env

    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[003-004]",
             "SLURM_JOB_ID": "123456"}
    assert slurm_env(slurm) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu003",
                                "MASTER_PORT": str(10000 + 123456 % 50000)}
    assert slurm_env({**slurm, "RANK": "0", "WORLD_SIZE": "2"}) == {}  # under torchrun: its variables
    assert slurm_env({**slurm, "MASTER_PORT": "29500"})["MASTER_PORT"] == "29500"
    assert slurm_env({**slurm, "SLURM_NTASKS": "1"}) == {} and slurm_env({}) == {}


def test_srun_style_launch_with_only_slurm_variables(data_root, tmp_path):
    """Two `dssn train` processes started as srun starts them (SLURM's variables, no torchrun's) on
    127.0.0.1: one gloo group, a run that trains and checkpoints."""
    port = free_port()
    while not 10000 <= port < 60000:
        port = free_port()
    run = tmp_path / "run"
    overrides = tiny_overrides(data_root, run, "method.name=supervised", "train.iters=2", "train.checkpoint_every=1")
    torchrun_names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    base = {k: v for k, v in os.environ.items() if k not in torchrun_names and not k.startswith("SLURM")}
    base.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1] / "src"), SLURM_NTASKS="2",
                SLURM_JOB_NODELIST="127.0.0.1", SLURM_JOB_ID=str(port - 10000))
    procs = [subprocess.Popen([sys.executable, "-m", "dssn", "train", "synthetic", *overrides],
                              env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "batch plan: 2 per process x 2 processes x accumulate 1 = 4" in outs[0][1]  # rank 0 logs the plan
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["data"]["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2
