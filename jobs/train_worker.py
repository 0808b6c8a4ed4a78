"""The per-worker training loop that Ray Train runs on every worker."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any

import ray.train
import ray.train.torch
import torch

from jobs.specs import TrainSpec
from jobs.train_data import TrainBatch
from jobs.train_watch import Watch
from sdm import storage
from sdm.checkpoint import (
    EMA_FILE,
    RUN_MODEL_DIR,
    STATE_FILE,
    WEIGHTS_FILE,
    Progress,
    is_train_state,
    load_state_dict,
    load_train_state,
    load_model,
    load_weights,
    save_classes,
    save_model,
    save_train_state,
)
from sdm.config import SDMConfig
from sdm.diffusion import GaussianDiffusion
from sdm.device import training_precision
from sdm.errors import CheckpointError, StorageError
from sdm.labels import LabelEncoder
from sdm.seeds import derive_seed

from sdm.distill import GuidanceDistillation, ProgressiveDistillation, halving_grids, init_student, round_config
from sdm.training import Loss, StepResult, make_ema, make_optimizer, to_memory_format, train_step, weights_layout
from sdm.unet import SDMUNet

CHECKPOINT_PREFIX = "checkpoint_"


def checkpoint_dirs(run_uri: str) -> list[str]:
    """The URIs of a run's Ray Train checkpoints that have their state file, newest first."""
    try:
        names = [n for n in storage.list_dirs(run_uri) if n.startswith(CHECKPOINT_PREFIX) and n[len(CHECKPOINT_PREFIX):].isdigit()]
    except StorageError:  # an unreachable store holds no checkpoint to resume from
        return []
    uris = [storage.join(run_uri, name) for name in reversed(names)]
    return [uri for uri in uris if is_train_state(uri)]


def latest_checkpoint_dir(run_uri: str) -> str | None:
    """The URI of a run's newest complete Ray Train checkpoint, or None."""
    dirs = checkpoint_dirs(run_uri)
    return dirs[0] if dirs else None


def _step_of(checkpoint_uri: str) -> int:
    return int(os.path.basename(checkpoint_uri.rstrip("/"))[len(CHECKPOINT_PREFIX):])


def _resume(run_uri: str, net: SDMUNet, ema: torch.nn.Module, opt: torch.optim.Optimizer, scaler,
            teacher: torch.nn.Module | None = None) -> tuple[Progress, str] | None:
    """Load the newest checkpoint that reads back whole: Ray Train's latest registered one, or a newer one on
    the store (a driver killed between a checkpoint's upload and its registration leaves one there), else an
    older complete one on the store."""
    registered = ray.train.get_checkpoint()
    floor = -1 if registered is None else _step_of(registered.path)
    newer, older = [], []
    for uri in checkpoint_dirs(run_uri):
        fs, path = storage.resolve(uri)
        if registered is None or path != registered.path:
            (newer if _step_of(uri) > floor else older).append(ray.train.Checkpoint(path, filesystem=fs))
    for checkpoint in [*newer, *([registered] if registered is not None else []), *older]:
        try:
            with checkpoint.as_directory() as d:
                return load_train_state(d, net, ema, opt, scaler, teacher), checkpoint.path
        except CheckpointError as e:
            print(f"skipping an unreadable checkpoint: {e}")
    return None


def _init_weights(net: SDMUNet, ema: torch.nn.Module, uri: str) -> None:
    """Start a fine-tuning run from a pretrained run's latest weights (and EMA), or an exported model."""
    ckpt = latest_checkpoint_dir(uri)
    if ckpt is None:
        weights = load_state_dict(uri)
        net.load_state_dict(weights)
        ema.module.load_state_dict(weights)
        return
    net.load_state_dict(load_weights(ckpt, WEIGHTS_FILE))
    ema.load_state_dict(load_weights(ckpt, EMA_FILE))


def _teacher(a: TrainSpec, device: torch.device) -> torch.nn.Module:
    """The frozen teacher of a distillation, on this worker's device (in the weights' layout the student uses)."""
    teacher, _ = load_model(a.teacher)
    if a.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher.to(device).requires_grad_(False)


def _objective(stage: str, teacher: torch.nn.Module | None, diffusion: GaussianDiffusion, cfg: SDMConfig) -> Loss | None:
    """The loss a stage trains with: None for the diffusion loss of pretraining and fine-tuning."""
    s = cfg.student
    if stage == "distill-guidance":
        return GuidanceDistillation(teacher, diffusion, s.guidance_range)
    if stage == "distill-steps":
        grids = halving_grids(cfg.diffusion.num_timesteps, s.from_steps, len(s.timesteps))
        return ProgressiveDistillation(teacher, diffusion, grids, s.guidance_range, s.eta)
    return None


def _round_teacher(objective: Loss | None) -> torch.nn.Module | None:
    """What a checkpoint must keep of a distillation: the current round's teacher, where rounds change it."""
    return objective.teacher if isinstance(objective, ProgressiveDistillation) and objective.round > 0 else None


def _round_sampling(objective: Loss | None, cfg: SDMConfig) -> SDMConfig | None:
    """How the validation draws sample during a progressive round: on the grid its student is learning."""
    if not isinstance(objective, ProgressiveDistillation):
        return None
    return round_config(cfg, objective.grids[objective.round + 1])


def _next_round(objective: ProgressiveDistillation, progress: Progress, ema_net: torch.nn.Module, total: int, rank: int) -> None:
    """Start the round that step progress.step + 1 belongs to (the run's steps split evenly over the rounds): its
    teacher is the EMA student so far."""
    per_round = -(-total // objective.rounds)
    wanted = min(progress.step // per_round, objective.rounds - 1)
    if wanted != objective.round:
        objective.set_teacher(ema_net, wanted)
        progress.teacher_round = wanted
        if rank == 0:
            grid = objective.grids[wanted + 1]
            print(f"round {wanted + 1}/{objective.rounds} from step {progress.step + 1}: {len(grid) * 2} -> {len(grid)} steps", flush=True)


def _batches(shard: Any, a: TrainSpec, collate: TrainBatch, batch_size: int, epoch: int, rank: int, skip: int,
             clock: WaitClock) -> Iterator[dict[str, Any]]:
    """This worker's micro-batches for one epoch, reshuffled per epoch, after skipping those already trained on;
    decoded and augmented here, on the iterator's prefetch thread (jobs.train_data.TrainBatch)."""
    it = shard.iter_torch_batches(
        batch_size=batch_size,
        local_shuffle_buffer_size=a.shuffle_buffer or None,
        local_shuffle_seed=derive_seed(a.seed, epoch, rank) % 2**31,
        drop_last=True,
        collate_fn=collate,
    )
    for i, batch in enumerate(clock.wrap(it)):
        if i >= skip:
            yield batch


class WaitClock:
    """Seconds spent waiting for the next batch, since the last reset: the input pipeline's share of a step."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, iterable: Iterable[Any]) -> Iterator[Any]:
        it = iter(iterable)
        while True:
            start = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - start
            yield item

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def _to_inputs(batch: dict[str, torch.Tensor], cfg: SDMConfig, device: torch.device, has_instance: bool,
               channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x0 = batch["image"].to(device, torch.float32)
    inst = batch["instance"] if has_instance else None
    return to_memory_format(x0, LabelEncoder(cfg)(batch["label"], inst, device), channels_last)


def _log_line(step: int, total: int, r: StepResult, lr: float, ips: float, waiting: float, elapsed: float, done_before: int,
              dropped: float | None) -> str:
    rate = (step - done_before) / max(elapsed, 1e-9)
    eta = (total - step) / rate if rate > 0 else float("inf")
    quarters = " ".join(f"{k[-2:]}={v:.3f}" for k, v in sorted(r.quarters.items()))
    return (
        f"step {step}/{total} loss {r.loss:.4f} mse {r.mse:.4f} vb {r.vb:.4f} [{quarters}] "
        f"grad {r.grad_norm:.2f} lr {lr:.2e} {ips:.1f} img/s ({100 * waiting:.0f}% waiting for data) eta {eta:.0f}s"
        + (f" labels dropped {dropped:.3f}" if dropped is not None else "")
    )


def _quiet_report_log() -> None:
    """Ray Train logs every report's full metrics at INFO from each worker; our step line says it once."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # that module names its logger by its file


def train_worker(c: dict[str, Any]) -> None:
    """Ray Train entry point, run on every worker."""
    _quiet_report_log()
    os.environ.update(c["tracking_env"])
    cfg = SDMConfig.from_dict(c["config"])
    a: TrainSpec = c["spec"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(a.cpus_per_worker)))
    torch.manual_seed(derive_seed(a.seed, "init"))

    teacher = _teacher(a, device) if a.distilling else None
    net = init_student(teacher, cfg) if teacher is not None else SDMUNet(cfg.model)
    if a.channels_last:  # before the EMA copy, so both hold the same layout (the EMA update is one fused lerp)
        net = net.to(memory_format=torch.channels_last)
    ema = make_ema(net, cfg.train.ema_decay)
    finetune = a.stage == "finetune"
    lr = cfg.student.lr if a.distilling else a.lr or (cfg.train.finetune_lr if finetune else cfg.train.lr)
    drop_rate = (cfg.train.drop_rate if a.drop_rate is None else a.drop_rate) if finetune else 0.0
    autocast_dtype, scaler = training_precision(device, a.precision)

    diffusion = GaussianDiffusion.from_config(cfg.diffusion, cfg.model.learn_sigma)
    objective = _objective(a.stage, teacher, diffusion, cfg)
    progress = Progress(stage=a.stage)
    opt = make_optimizer(net, lr, cfg.train.weight_decay)
    resumed = _resume(a.run, net, ema, opt, scaler, objective.teacher if isinstance(objective, ProgressiveDistillation) else None)
    if resumed is not None:
        progress, path = resumed
        if rank == 0:
            print(f"resumed from {path} at step {progress.step}")
    elif a.init_from:
        _init_weights(net, ema, a.init_from)
    ema.to(device)
    model = ray.train.torch.prepare_model(net)
    if rank == 0:
        dtype = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + grad scaler"}[autocast_dtype]
        print(f"{world} worker(s) x {torch.get_num_threads()} torch thread(s), {dtype}, {weights_layout(model)} weights", flush=True)
    if isinstance(objective, ProgressiveDistillation):
        objective.round = progress.teacher_round
    watch = Watch(a, cfg, progress.step, device) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    total, accum = a.steps, a.grad_accum
    gen = torch.Generator()
    collate, clock = TrainBatch(cfg, c["has_instance"]), WaitClock()
    bad_in_row, skipped, kept, seen = 0, 0, 0, 0
    start, done_before = time.perf_counter(), progress.step
    window_start, window_images = time.perf_counter(), 0

    while progress.step < total:
        micro: list[tuple[torch.Tensor, torch.Tensor]] = []
        keys_seen: list[str] = []
        for batch in _batches(shard, a, collate, c["batch_size"], progress.epoch, rank, progress.batches_in_epoch, clock):
            micro.append(_to_inputs(batch, cfg, device, c["has_instance"], a.channels_last))
            if a.audit_keys:
                keys_seen.extend(str(k) for k in batch["key"])
            if len(micro) < accum:
                continue
            gen.manual_seed(derive_seed(a.seed, rank, progress.step))  # the step's noise, reproducible on resume
            if isinstance(objective, ProgressiveDistillation):
                _next_round(objective, progress, ema.module, total, rank)
            r = train_step(model, opt, diffusion, micro, cfg, drop_rate, gen, autocast_dtype, scaler, loss=objective)
            micro = []
            progress.batches_in_epoch += accum
            if not r.finite:
                bad_in_row, skipped = bad_in_row + 1, skipped + 1
                if rank == 0:
                    print(f"warning: non-finite loss or gradient at step {progress.step + 1}; update skipped")
                if bad_in_row >= a.max_bad_steps:
                    raise RuntimeError(
                        f"{bad_in_row} non-finite steps in a row at step {progress.step + 1}; stopping. "
                        "The last good checkpoint is kept."
                    )
                continue
            bad_in_row = 0
            ema.update_parameters(net)
            progress.step += 1
            kept, seen = kept + r.kept_labels, seen + r.images
            window_images += r.images * world
            last = progress.step == total
            if watch is not None and watch.wants_validation(progress.step):
                watch.validate(progress.step, ema.module, _round_sampling(objective, cfg))
            metrics = {"step": progress.step, "loss": r.loss}
            if progress.step % a.log_every == 0 or last:
                window = time.perf_counter() - window_start
                ips, waiting = window_images / window, clock.take() / window
                window_start, window_images = time.perf_counter(), 0
                metrics |= {
                    "epoch": progress.epoch, "mse": r.mse, "vb": r.vb,
                    "grad_norm": r.grad_norm, "lr": lr, "images_per_s": ips, "data_wait_fraction": waiting,
                    "label_drop_fraction": 1 - kept / max(seen, 1), "skipped_steps": skipped, **r.quarters,
                }
                if watch is not None:
                    watch.scalars(progress.step, metrics)
                    if watch.wants_line(progress.step):
                        dropped = metrics["label_drop_fraction"] if finetune else None
                        print(_log_line(progress.step, total, r, lr, ips, waiting, time.perf_counter() - start, done_before,
                                        dropped), flush=True)
            # Ray Train hears of the run at its checkpoints only: each report is a barrier across the workers (about
            # 1.2 s on CPU), which at --log-every 1 more than doubled a step; rank 0 writes the curves itself.
            if progress.step % a.checkpoint_every == 0 or last:
                _report(metrics, progress, net, ema, opt, scaler, cfg, rank, run_uri=a.run, watch=watch,
                        teacher=_round_teacher(objective))
            if last:
                break
        if a.audit_keys:
            _write_keys(a.run, rank, progress.epoch, keys_seen)
        if progress.step < total:
            progress.epoch += 1
            progress.batches_in_epoch = 0

    if rank == 0:  # the final EMA weights, in the pipeline's format, with the dataset's class names and palette
        model_uri = storage.join(a.run, RUN_MODEL_DIR)
        save_classes(model_uri, c["class_names"], c["palette"])
        save_model(model_uri, ema.module, cfg, metadata={"step": str(progress.step), "stage": progress.stage})
        watch.close()


def _report(metrics: dict[str, Any], progress: Progress, net, ema, opt, scaler, cfg: SDMConfig, rank: int,
            run_uri: str, watch: Watch | None, teacher: torch.nn.Module | None = None) -> None:
    """Report metrics from every worker (a barrier); rank 0 attaches the checkpoint, with the curves published just
    before it (sdm.tracking: a resumed run purges what lies beyond its checkpoint) and MLflow's scalars sent once it
    is saved.

    The checkpoint is uploaded through sdm.storage (each file one atomic, retried write; state.json last), not
    Ray Train's default copy: if the store fails it for good, report raises before the checkpoint is registered,
    so Ray Train neither records it nor deletes an older complete one for it, and the worker group restarts from
    the last complete checkpoint (--max-failures)."""
    if rank != 0:
        ray.train.report(metrics)
        return

    def upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        uri = storage.join(run_uri, dir_name)
        storage.publish_dir(checkpoint.path, uri, last=STATE_FILE)
        fs, path = storage.resolve(uri)
        return ray.train.Checkpoint(path, filesystem=fs)

    watch.publish()
    with tempfile.TemporaryDirectory() as tmp:
        save_train_state(tmp, net, ema, opt, scaler, progress, cfg, teacher)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{progress.step:08d}",
            checkpoint_upload_fn=upload,
        )
    watch.commit()


def _write_keys(run_uri: str, rank: int, epoch: int, keys: list[str]) -> None:
    uri = storage.join(run_uri, "audit", f"epoch{epoch:04d}_rank{rank}.txt")
    storage.write_bytes(uri, "\n".join(keys).encode())

