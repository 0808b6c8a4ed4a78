"""Train SDM on a Ray cluster: Ray Train DDP over Parquet shards, checkpoints on the object store.

    python -m jobs.train --preset tiny --data DATA_URI --run RUN_URI --steps 300 --num-workers 2
    python -m jobs.train --preset tiny --data DATA_URI --run FT_RUN_URI --stage finetune --init-from RUN_URI
    python -m jobs.train --stage distill-guidance --teacher FT_RUN_URI --data DATA_URI --run DG_RUN_URI --steps 300
    python -m jobs.train --stage distill-steps --teacher DG_RUN_URI --target-steps 8 --data DATA_URI --run DS_RUN_URI --steps 400

Rerunning the same command on an existing run resumes it from its latest checkpoint (--fresh starts over).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import ray
import ray.data
import ray.train
import ray.train.torch
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from jobs.ray_setup import init_ray, integrity_failure
from jobs.specs import TrainSpec, from_namespace
from jobs.train_data import check_dataset_fits, make_train_dataset
from jobs.train_worker import checkpoint_dirs, latest_checkpoint_dir, train_worker
from sdm import storage
from sdm.checkpoint import RUN_MODEL_DIR, exported_step, find_model_dir, load_config, load_progress, model_id
from sdm.config import MAX_GUIDANCE, SDMConfig, get_preset
from sdm.distill import DEFAULT_GUIDANCE_RANGE, halving_grids, student_config
from sdm.data.card import DatasetCard, read_card
from sdm.errors import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, SDMError
from sdm.metrics.segmenter import load_segmenter
from sdm.run_report import write_run_report
from sdm.validation import MAX_VALIDATION_MAPS


STAGES = ["pretrain", "finetune", "distill-guidance", "distill-steps"]
DISTILL_FIELDS = {"teacher", "guidance_range", "target_steps", "from_steps", "teacher_eta"}


def parse_args(argv: list[str] | None = None) -> TrainSpec:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="a named preset, e.g. tiny, ade20k (pretrain, finetune)")
    src.add_argument("--config", help="a YAML/JSON config file or URI (may name a `preset:` to override)")
    src.add_argument("--teacher", help="distill-guidance, distill-steps: the teacher model (its config is the student's base)")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. train.lr=3e-4")
    p.add_argument("--data", required=True, help="dataset URI (shards + dataset card)")
    p.add_argument("--run", required=True, help="run URI: checkpoints and the exported model go here")
    p.add_argument("--stage", choices=STAGES, default="pretrain",
                   help="distill-guidance: a student that runs guidance in one pass; distill-steps: one that samples in "
                        "--target-steps steps (progressive distillation)")
    p.add_argument("--init-from", help="finetune: the pretrained run (or exported model) to start from")
    p.add_argument("--guidance-range", type=float, nargs=2, default=DEFAULT_GUIDANCE_RANGE, metavar=("LOW", "HIGH"),
                   help="distillation: the guidance scales the student learns (default: %(default)s)")
    p.add_argument("--target-steps", type=int, default=8, help="distill-steps: the student's sampling steps (default: "
                   "%(default)s, the fewest that drew within the sampler sweep's tolerances: docs/distillation.md)")
    p.add_argument("--from-steps", type=int, default=32, help="distill-steps: the teacher's steps that the first round halves "
                   "(--target-steps x 2^rounds; default: %(default)s)")
    p.add_argument("--teacher-eta", type=float, default=1.0,
                   help="distill-steps: the DDIM eta of the teacher's steps the student learns, and its sampling default "
                        "(1, the default: ancestral, the student learning their mean; 0: deterministic, as Salimans and Ho, "
                        "which keeps the deterministic samplers' grain: docs/distillation.md)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps in total for this run")
    p.add_argument("--batch-size", type=int, help="per-worker micro-batch (default: the config's)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="default: train.lr (pretrain) or train.finetune_lr (finetune)")
    p.add_argument("--drop-rate", type=float, help="finetune: null-label probability (default: train.drop_rate)")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="hold the weights and input batches in channels_last (default on: faster convolutions)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts before the run fails")
    p.add_argument("--max-bad-steps", type=int, default=5, help="consecutive non-finite steps that stop the run")
    p.add_argument("--shuffle-buffer", type=int, default=256, help="rows in each worker's local shuffle buffer")
    p.add_argument("--eval-every", type=int, help="draw and score the validation maps every N steps "
                   "(default: 4 times over the run, at most 5000 steps apart)")
    p.add_argument("--eval-maps", type=int, default=6, help="validation label maps drawn each time (fixed seeds)")
    p.add_argument("--segmenter", help="a segmenter (built-in directory, TorchScript file, module:callable) to score "
                   "the validation samples' label consistency with")
    p.add_argument("--audit-keys", action="store_true", help="write the sample keys each worker read, per epoch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="delete an existing run at --run and start over")
    p.add_argument("--address", default=None, help="Ray address (default: the job's cluster, or a local one)")
    return from_namespace(TrainSpec, p.parse_args(argv))


def build_config(args: TrainSpec) -> SDMConfig:
    if args.distilling:
        cfg = _student_config(args)
    elif args.preset:
        cfg = get_preset(args.preset)
    else:
        cfg = SDMConfig.from_yaml(storage.read_bytes(args.config).decode())
    overrides = list(args.overrides)
    if args.activation_checkpointing:
        overrides.append("model.use_checkpoint=true")
    return cfg.with_overrides(overrides) if overrides else cfg


def _student_config(args: TrainSpec) -> SDMConfig:
    """The student's config: its teacher's, with what the student is and where it came from (sdm.distill)."""
    teacher = load_config(args.teacher)
    timesteps: tuple[int, ...] = ()
    if args.stage == "distill-steps":
        try:
            timesteps = tuple(halving_grids(teacher.diffusion.num_timesteps, args.from_steps, args.target_steps)[-1])
        except ValueError as e:
            raise SDMError(f"--from-steps, --target-steps: {e}") from None
    if not 0 <= args.teacher_eta <= 1:
        raise SDMError(f"--teacher-eta must lie in [0, 1], got {args.teacher_eta:g}")
    lo, hi = args.guidance_range
    if not 0 <= lo <= hi <= MAX_GUIDANCE:
        raise SDMError(f"--guidance-range must satisfy 0 <= LOW <= HIGH <= {MAX_GUIDANCE:g}, got {lo:g} {hi:g}")
    return student_config(teacher, "guidance" if args.stage == "distill-guidance" else "progressive", model_id(args.teacher),
                          args.teacher, guidance_range=(lo, hi), timesteps=timesteps,
                          from_steps=args.from_steps if timesteps else 0, eta=args.teacher_eta if timesteps else 0.0,
                          optimizer_steps=args.steps,
                          lr=args.lr or teacher.train.finetune_lr)


def validate(args: TrainSpec, cfg: SDMConfig) -> None:
    """Refuse to start on inputs that cannot work, before any worker is scheduled."""
    for name in ("steps", "grad_accum", "num_workers", "checkpoint_every", "log_every", "keep"):
        if getattr(args, name) < 1:
            raise SDMError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.stage == "finetune" and not args.init_from and not storage.exists(args.run):
        raise SDMError("--stage finetune needs --init-from: the pretrained run to start from")
    if args.init_from:
        if latest_checkpoint_dir(args.init_from) is None:
            find_model_dir(args.init_from)  # raises CheckpointError naming what is missing
    drop = cfg.train.drop_rate if args.drop_rate is None else args.drop_rate
    if args.eval_every is not None and args.eval_every < 1:
        raise SDMError(f"--eval-every must be >= 1, got {args.eval_every}")
    if not 1 <= args.eval_maps <= MAX_VALIDATION_MAPS:
        raise SDMError(f"--eval-maps must lie in [1, {MAX_VALIDATION_MAPS}], got {args.eval_maps}")
    if args.segmenter:
        load_segmenter(args.segmenter)  # raises naming what does not load
    if not 0.0 <= drop < 1.0:
        raise SDMError(f"--drop-rate must lie in [0, 1), got {drop}")
    try:
        storage.exists(args.run)
    except SDMError as e:
        raise SDMError(f"run URI {args.run} is unreachable: {e}") from None


def run_config(args: TrainSpec) -> RunConfig:
    fs, path = storage.resolve(args.run)
    return RunConfig(
        name=os.path.basename(path.rstrip("/")),
        storage_path=os.path.dirname(path.rstrip("/")),
        storage_filesystem=fs,
        checkpoint_config=CheckpointConfig(num_to_keep=args.keep),
        failure_config=FailureConfig(max_failures=args.max_failures),
    )


def _start_ray(args: TrainSpec) -> None:
    """A local cluster leaves a CPU for Ray Data beside the training workers. Its nodes are this machine, which no
    cloud preempts: Ray Train's preemption watcher (an actor that logs an error line as it starts) is left out."""
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # read by the driver, passed on by Ray Train
    needed = int(args.num_workers * args.cpus_per_worker) + 1
    init_ray(args.address, num_cpus=max(os.cpu_count() or 1, needed), dashboard=True)


def _check_source(args: TrainSpec) -> None:
    """A distillation starts from --teacher; training from --preset or --config."""
    if args.distilling and not args.teacher:
        raise SDMError(f"--stage {args.stage} needs --teacher: the model to distil")
    if not args.distilling and not (args.preset or args.config):
        raise SDMError(f"--stage {args.stage} needs --preset or --config" + (" (--teacher is for distillation)" if args.teacher else ""))
    if args.teacher:
        find_model_dir(args.teacher)  # raises CheckpointError naming what is missing


def prepare(args: TrainSpec) -> tuple[SDMConfig, DatasetCard]:
    """The config and dataset card, checked against each other and the URIs (raises SDMError)."""
    _check_source(args)
    cfg = build_config(args)
    validate(args, cfg)
    card = read_card(args.data)
    check_dataset_fits(card, cfg, args.data)
    return cfg, card


def fit(args: TrainSpec, cfg: SDMConfig, card: DatasetCard) -> ray.train.Result:
    """Run (or resume) the Ray Train job; raises when it fails after its allowed restarts."""
    if args.fresh and storage.exists(args.run):
        storage.delete(args.run)
    batch = args.batch_size or cfg.train.batch_size
    print(
        f"global batch {args.num_workers * batch * args.grad_accum} = {args.num_workers} workers x {batch} per worker "
        f"x {args.grad_accum} accumulation; {args.steps} steps ({args.stage}) -> {args.run}"
    )
    # Our own per-step progress line replaces Ray Train's print mirroring, and Ray Data's bars: the training reads
    # run in an actor, whose bars cannot draw on the job's console (Ray Data's note that they are off goes to its log).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ray.data.DataContext.get_current().enable_progress_bars = False
    if not ray.is_initialized():
        _start_ray(args)
    loop_config = {
        "config": cfg.to_dict(),
        "spec": args,
        "batch_size": batch,
        "has_instance": card.has_instance,
        "class_names": card.class_names,
        "palette": card.palette,
        # MLflow is configured by the environment of whoever submits the run; the workers may run elsewhere
        "tracking_env": {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")},
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=args.num_workers,
            use_gpu=args.use_gpu,
            resources_per_worker={"CPU": args.cpus_per_worker, **({"GPU": 1} if args.use_gpu else {})},
        ),
        datasets={"train": make_train_dataset(args.data, card, cfg, args.seed)},
        # Ray Data's defaults, given here: Ray Train's own default copies the deprecated `exclude_resources`
        # into them, which warns in every run.
        dataset_config=DataConfig(execution_options=ExecutionOptions()),
        run_config=run_config(args),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def completed_step(args: TrainSpec) -> int | None:
    """The step of a run that already reached --steps in this stage and exported that step's model (nothing left
    to do: a rerun reuses it instead of starting workers to re-export it); None otherwise."""
    latest = None if args.fresh else latest_checkpoint_dir(args.run)
    if latest is None:
        return None
    progress = load_progress(latest)
    if progress.stage != args.stage or progress.step < args.steps:
        return None
    return progress.step if exported_step(storage.join(args.run, RUN_MODEL_DIR)) == progress.step else None


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: TrainSpec) -> int:
    """Check, train (or resume), export; returns the exit status."""
    try:
        cfg, card = prepare(args)
    except SDMError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    if (step := completed_step(args)) is not None:
        print(f"complete already; reusing it (step {step}, model {storage.join(args.run, RUN_MODEL_DIR)})")
        return EXIT_OK
    start = time.perf_counter()
    try:
        result = fit(args, cfg, card)
    except Exception as e:  # Ray Train's own error types; the workers' tracebacks were printed already
        print(f"error: training failed: {integrity_failure(e) or e}", file=sys.stderr)
        return EXIT_FAILED
    metrics = result.metrics or {}
    model_uri = storage.join(args.run, RUN_MODEL_DIR)
    print(
        f"done in {time.perf_counter() - start:.0f}s: step {metrics.get('step')}, loss {metrics.get('loss', float('nan')):.4f}; "
        f"checkpoints under {args.run}, model exported to {model_uri}"
    )
    report = write_run_report(args.run, _settings(args, cfg), list(reversed(checkpoint_dirs(args.run))), model_uri)
    print(f"report: {report}; curves: tensorboard --logdir {args.run}")
    print(f"sample from it: sdm sample --model {args.run} --labels LABEL.png --out samples/")
    return 0


def _settings(args: TrainSpec, cfg: SDMConfig) -> dict[str, object]:
    """What the report records of how the run was asked for (the fields given, and the config's name)."""
    batch = args.batch_size or cfg.train.batch_size
    skipped = {"address"} | (set() if args.distilling else DISTILL_FIELDS)
    given = {k: v for k, v in dataclasses.asdict(args).items() if v is not None and v is not False and v != () and k not in skipped}
    return {"config": cfg.name, **given, "global batch": f"{args.num_workers} x {batch} x {args.grad_accum}",
            "validation every": args.validation_interval}


if __name__ == "__main__":
    sys.exit(main())
