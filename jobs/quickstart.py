"""The main job on the embedded default: toy data, Ray Train pretraining + fine-tuning, a synthetic dataset
bulk-generated from the validation label maps on Ray Data, its evaluation, and a contact sheet.

    python -m jobs.quickstart --out runs/quickstart

Everything lands under --out on local files; running it again reuses what is complete.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import islice

import numpy as np
from PIL import Image

from jobs import generate, train
from jobs.specs import GenerateSpec, TrainSpec
from sdm import storage
from sdm.data.card import CARD_FILE, read_card
from sdm.data.inspect import colourise
from sdm.data.shards import iter_samples
from sdm.imageio import encode_png
from sdm.data.toy import write_toy_dataset
from sdm.errors import EXIT_REFUSED
from sdm.generated_dataset import SETTINGS_FILE
from sdm.metrics.evaluate import EvalSettings, builtin_segmenter, evaluate, summary
from sdm.metrics.image_sets import open_set
from sdm.pipeline import SDMPipeline
from sdm.run_report import REPORT_FILE


SEGMENTER_STEPS = 200


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def _contact_sheet(model_uri: str, data_uri: str, path: str, scales: tuple[float, ...] = (1.0, 1.5, 3.0), n: int = 6) -> None:
    """Rows of: palette label | real image | one sample per guidance scale (same seed); one batched call per scale."""
    pipe = SDMPipeline.from_pretrained(model_uri)
    card = read_card(data_uri)
    val = list(islice(iter_samples(data_uri, split="val"), n))
    labels, instances = [s["label"] for s in val], [s["instance"] for s in val]
    columns = [pipe(labels, instances=instances, guidance_scale=g, seed=[0] * len(val)) for g in scales]
    rows = [np.concatenate([colourise(s["label"], card.palette), s["image"], *(c[i] for c in columns)], axis=1) for i, s in enumerate(val)]
    sheet = np.concatenate(rows, axis=0)
    Image.fromarray(sheet).resize((sheet.shape[1] * 4, sheet.shape[0] * 4), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.quickstart", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--samples", type=int, default=512, help="toy dataset size")
    p.add_argument("--pretrain-steps", type=int, default=240)
    p.add_argument("--finetune-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8, help="per worker")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--samples-per-label", type=int, default=2, help="generated images per validation label map")
    p.add_argument("--segmenter-steps", type=int, default=SEGMENTER_STEPS,
                   help="training steps of the built-in segmenter that scores label consistency")
    args = p.parse_args(argv)
    if args.samples_per_label < 2:
        p.error("--samples-per-label must be >= 2: diversity compares the samples of one label map")
    if args.segmenter_steps < 1:
        p.error(f"--segmenter-steps must be >= 1, got {args.segmenter_steps}")
    start = time.perf_counter()
    data, pre, ft, gen, report = (storage.join(args.out, d) for d in ("data", "pretrain", "finetune", "generated", "eval"))

    _banner(f"1/6 toy dataset -> {data}")
    if storage.exists(storage.join(data, CARD_FILE)):
        print("complete already; reusing it")
    else:
        card = write_toy_dataset(data, n=args.samples, size=32, seed=0)
        print(f"wrote {card.split_sizes} in {len(card.shards)} shards")
    # The built-in segmenter scores the label consistency of the training's validation draws, of every generated pair
    # and of the evaluation: trained once (same data, steps and cache).
    segmenter = builtin_segmenter(data, args.segmenter_steps, storage.join(args.out, "cache"), lambda msg: print(msg, flush=True))

    # The tiny preset's EMA decay (0.995) would still hold 30% of the random initialisation after 240 steps:
    # the exported EMA weights of a run this short would draw noise. 0.98 averages over the last ~50 steps.
    common = {"preset": "tiny", "data": data, "num_workers": args.num_workers, "log_every": 20,
              "batch_size": args.batch_size, "overrides": ("train.ema_decay=0.98",), "segmenter": segmenter}
    _banner(f"2/6 pretraining on Ray Train ({args.num_workers} workers) -> {pre}")
    if status := train.run(TrainSpec(run=pre, steps=args.pretrain_steps, checkpoint_every=100, **common)):
        return status
    _banner(f"3/6 fine-tuning with label dropout 0.2 -> {ft}")
    # Fine-tuning's draws are guided (two network passes a step): validated twice, to keep their share small.
    if status := train.run(TrainSpec(run=ft, stage="finetune", init_from=pre, steps=args.finetune_steps,
                                     checkpoint_every=50, eval_every=max(1, args.finetune_steps // 2), **common)):
        return status

    _banner(f"4/6 bulk generation on Ray Data: {args.samples_per_label} images per validation label map -> {gen}")
    if status := generate.run(GenerateSpec(model=ft, labels=data, split="val", out=gen, samples_per_label=args.samples_per_label,
                                           segmenter_steps=args.segmenter_steps, cache_dir=storage.join(args.out, "cache"))):
        if status == EXIT_REFUSED and storage.exists(storage.join(gen, SETTINGS_FILE)):
            print(f"{gen} was generated with other settings (by an older version?): remove it to generate it again",
                  file=sys.stderr)
        return status

    _banner(f"5/6 evaluation of the generated dataset against the real validation images -> {report}")
    results = _evaluate(data, gen, report, args.out, args.segmenter_steps)
    print(summary(results))

    _banner("6/6 guided samples of validation label maps")
    sheet = storage.join(args.out, "contact_sheet.png")
    if storage.exists(sheet):
        print("complete already; reusing it")
    else:
        _contact_sheet(ft, data, sheet)
    print(f"contact sheet (label | real | guidance 1.0, 1.5, 3.0): {sheet}")
    label_png = storage.join(args.out, "label.png")
    storage.write_bytes(label_png, encode_png(next(iter_samples(data, split="val"))["label"]))

    _banner(f"done in {time.perf_counter() - start:.0f}s")
    print(f"  dataset:          {data}   (inspect: sdm data inspect {data})")
    print(f"  trained model:    {ft}/model")
    print(f"  training reports: {storage.join(pre, REPORT_FILE)}, {storage.join(ft, REPORT_FILE)}   "
          f"(curves: tensorboard --logdir {args.out})")
    print(f"  generated data:   {gen}   ({args.samples_per_label} images per validation label map)")
    print(f"  evaluation:       {results['files']['report']}   (numbers: {results['files']['json']})")
    print(f"  samples:          {sheet}, {results['files']['contact_sheet']}")
    config_note = "" if ft == "runs/quickstart/finetune" else f"  (set model_uri: {ft} in the config)"
    print(f"  serve it:         serve run serve/config.yaml{config_note}")
    print(f"  query it:         curl -s -o out.png -F label=@{label_png} -F guidance_scale=1.5 -F seed=7 "
          "http://127.0.0.1:8000/v1/generate")
    return 0


def _evaluate(data: str, gen: str, report: str, out: str, segmenter_steps: int) -> dict:
    """The built-in segmenter's mIoU (also on the real images), its Frechet distance, the spectrum against the
    real images (grain and blur) and the diversity (LPIPS with its weights, else low-pass pixel L1);
    a report of this very generated dataset (same card checksum) with these metrics and segmenter is reused."""
    metrics = ("miou", "segmenter-fd", "spectrum", "diversity")
    done = storage.join(report, "results.json")
    if storage.exists(done):
        results = json.loads(storage.read_bytes(done))
        prior = results["settings"]
        if (results["generated"]["checksum"] == open_set(gen).checksum and prior["metrics"] == list(metrics)
                and prior.get("segmenter_steps") == segmenter_steps):
            print("complete already; reusing it")
            return results
    settings = EvalSettings(real=data, generated=gen, out=report, metrics=metrics, segmenter_steps=segmenter_steps,
                            cache_dir=storage.join(out, "cache"))
    return evaluate(settings, log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    sys.exit(main())
