"""A miniature of the paper's Table 4 on the toy dataset, plus a guidance sweep (samplers: bench/sampler_quality.py).

    python bench/reproduce_toy.py                  # about 30-40 minutes on 2 CPU cores
    python bench/reproduce_toy.py --quick          # a smoke run of a minute or two; its numbers mean nothing

The SDM network (SPADE) and the `concat` baseline are pretrained and then fine-tuned with label dropout under
identical budgets (steps, batch, learning rates, seed). Validation label maps are sampled with and without
classifier-free guidance and scored with the built-in segmenter, trained on the real training split:
mIoU, a Frechet distance in the segmenter's feature space (Inception weights are absent here, so this is
not FID), the texture ratio to the real images (grain or blur) and the low-pass pixel L1 between the samples of
one label map (diversity that grain does not inflate; not LPIPS).
Everything lands under --out (git-ignored runs/ by default); rerunning reuses the data, segmenter and models.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from sdm import storage
from sdm.checkpoint import save_model
from sdm.config import get_preset
from sdm.data.card import CARD_FILE
from sdm.data.shards import iter_samples
from sdm.data.toy import write_toy_dataset
from sdm.metrics.diversity import LowPassL1Distance, mean_pairwise_distance
from sdm.metrics.frechet import FeatureStats, feature_stats, frechet_distance
from sdm.metrics.plots import Panel, bar_panels_png
from sdm.metrics.spectrum import SpectrumFeatures, spectral_fidelity
from sdm.metrics.segmenter import Segmenter, is_builtin, load_builtin, segment_scores, train_segmenter
from sdm.pipeline import SDMPipeline
from sdm.training import local_batches, train_local
from sdm.unet import SDMUNet

COLUMNS = ("mIoU", "segmenter-feature FD", "texture / real", "low-pass pixel L1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/reproduce_toy")
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks that everything runs")
    p.add_argument("--samples", type=int, default=1024, help="toy dataset size (1/8 is validation)")
    p.add_argument("--pretrain-steps", type=int, default=800)
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--drop-rate", type=float, default=0.2)
    p.add_argument("--guidance", type=float, default=1.5, help="the guided rows of Table 4")
    p.add_argument("--val-maps", type=int, default=64, help="validation label maps per row")
    p.add_argument("--k", type=int, default=4, help="samples per label map")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.out = args.out if args.out != "runs/reproduce_toy" else "runs/reproduce_toy_quick"
        args.samples, args.pretrain_steps, args.finetune_steps = 128, 20, 10
        args.val_maps, args.k = 8, 2
    return args


def log(msg: str) -> None:
    print(msg, flush=True)


def train_model(structure: str, data: str, out: str, args: argparse.Namespace, preset: str = "tiny",
                seed: int | None = None, bf16: bool = False) -> SDMPipeline:
    """Pretrain, then fine-tune with label dropout; the fine-tuned EMA weights are saved and returned."""
    seed = args.seed if seed is None else seed
    cfg = get_preset(preset).with_overrides([f"model.conditioning={structure}"])
    if storage.exists(storage.join(out, "config.json")):
        log(f"{structure}: reusing {out}")
        return SDMPipeline.from_pretrained(out, micro_batch=args.val_maps * args.k)
    start = time.perf_counter()

    def progress(stage: str, total: int):
        def report(step: int, r, elapsed: float) -> None:
            if step % 100 == 0 or step == total:
                log(f"{structure} seed {seed} {stage} step {step}/{total} loss {r.loss:.4f} ({time.perf_counter() - start:.0f}s)")
        return report

    fast = {"autocast_dtype": torch.bfloat16, "channels_last": True} if bf16 else {}
    batches = local_batches(data, cfg, args.batch_size, seed)
    net, _, _ = train_local(cfg, batches, args.pretrain_steps, seed=seed, log=progress("pretrain", args.pretrain_steps), **fast)
    net, ema, _ = train_local(cfg, batches, args.finetune_steps, net=net.train(), lr=cfg.train.finetune_lr,
                              drop_rate=args.drop_rate, seed=seed + 1, log=progress("finetune", args.finetune_steps), **fast)
    model = SDMUNet(cfg.model)
    model.load_state_dict(ema.module.state_dict())
    save_model(out, model, cfg, metadata={"origin": f"bench {preset} {structure} seed {seed}"})
    return SDMPipeline(model.eval(), cfg, micro_batch=args.val_maps * args.k)  # one unpadded batch per row of the table


def score(pipe: SDMPipeline, maps: list[dict], k: int, guidance: float, sampler: str, steps: int, seg: Segmenter,
          real: FeatureStats, real_spectrum: np.ndarray, num_classes: int, seed: int) -> dict:
    """Sample k images per label map and score them (same seeds for every row)."""
    start = time.perf_counter()
    images = pipe([m["label"] for m in maps], instances=[m["instance"] for m in maps], guidance_scale=guidance,
                  num_inference_steps=steps, sampler=sampler, seed=seed, num_samples=k)
    seconds = time.perf_counter() - start
    labels = np.repeat(np.stack([m["label"] for m in maps]), k, axis=0)
    groups = {m["key"]: images[i * k : (i + 1) * k] for i, m in enumerate(maps)}
    cm = segment_scores(seg, images, labels, num_classes)
    return {
        "mIoU": cm.miou(),
        "segmenter-feature FD": frechet_distance(feature_stats(seg.features(images)), real),
        "texture / real": spectral_fidelity(real_spectrum, SpectrumFeatures()(images).mean(0)).texture_ratio,
        "low-pass pixel L1": mean_pairwise_distance(groups, LowPassL1Distance()).mean,
        "per_class_iou": [None if np.isnan(v) else float(v) for v in cm.iou()],
        "images": len(images), "sampler": sampler, "steps": steps, "guidance": guidance, "sampling_seconds": seconds,
        "samples": images,  # not stored in results.json
    }


def table(title: str, rows: list[tuple[str, dict]]) -> str:
    lines = [title, f"{'':<34}" + "".join(f"{c:>22}" for c in COLUMNS) + f"{'images':>8}{'sampling s':>12}"]
    for name, r in rows:
        lines.append(f"{name:<34}" + "".join(f"{r[c]:>22.4f}" for c in COLUMNS) + f"{r['images']:>8}{r['sampling_seconds']:>12.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    data, seg_uri = storage.join(args.out, "data"), storage.join(args.out, "segmenter")
    if not storage.exists(storage.join(data, CARD_FILE)):
        card = write_toy_dataset(data, n=args.samples, size=32, seed=args.seed)
        log(f"toy dataset {card.split_sizes} -> {data}")
    seg = load_builtin(seg_uri) if is_builtin(seg_uri) else train_segmenter(data, seg_uri, steps=60 if args.quick else 300, log=log)
    val = list(iter_samples(data, split="val"))
    real_images, real_labels = np.stack([s["image"] for s in val]), np.stack([s["label"] for s in val])
    num_classes = 6
    real_cm = segment_scores(seg, real_images, real_labels, num_classes)
    real = feature_stats(seg.features(real_images))
    real_spectrum = SpectrumFeatures()(real_images).mean(0)
    log(f"built-in segmenter on the {len(val)} real validation images: mIoU {real_cm.miou():.4f}")

    pipes = {s: train_model(s, data, storage.join(args.out, "models", s), args) for s in ("spade", "concat")}
    maps = val[: args.val_maps]
    results: dict[str, list] = {"table4": [], "guidance_sweep": []}

    def run(section: str, name: str, structure: str, guidance: float, sampler: str, steps: int, n_maps: int, k: int) -> dict:
        r = score(pipes[structure], maps[:n_maps], k, guidance, sampler, steps, seg, real, real_spectrum, num_classes, args.seed)
        r.update(structure=structure, row=name)
        results[section].append(r)
        log(f"{section}: {name}: mIoU {r['mIoU']:.4f} FD {r['segmenter-feature FD']:.4f} texture/real {r['texture / real']:.2f} L1 {r['low-pass pixel L1']:.4f} ({r['sampling_seconds']:.0f}s)")
        return r

    default = get_preset("tiny").sampling
    for structure in ("spade", "concat"):
        for g in (1.0, args.guidance):
            run("table4", f"{'SDM (SPADE)' if structure == 'spade' else 'concat'}, s={g:g}", structure, g,
                default.sampler, default.num_inference_steps, args.val_maps, args.k)
    for g in (1.0, 1.5, 2.0, 3.0):
        done = next((r for r in results["table4"] if r["structure"] == "spade" and r["guidance"] == g), None)
        if done is not None:
            results["guidance_sweep"].append({**done, "row": f"s={g:g}"})
        else:
            run("guidance_sweep", f"s={g:g}", "spade", g, default.sampler, default.num_inference_steps, args.val_maps, args.k)

    results["real_val_segmenter"] = {"mIoU": real_cm.miou(), "images": len(val),
                                     "per_class_iou": [float(v) for v in real_cm.iou()]}
    results["settings"] = {k: v for k, v in vars(args).items()}
    results["settings"]["table_sampler"] = f"{default.sampler} {default.num_inference_steps} steps"
    text = "\n\n".join([
        f"built-in segmenter mIoU on the real validation images: {real_cm.miou():.4f} ({len(val)} images)",
        table(f"Table 4 (toy): {args.val_maps} val label maps x {args.k} samples, {default.sampler} {default.num_inference_steps} steps",
              [(r["row"], r) for r in results["table4"]]),
        table(f"Guidance sweep, SDM (SPADE), {default.sampler} {default.num_inference_steps} steps", [(r["row"], r) for r in results["guidance_sweep"]]),
    ])
    print("\n" + text)
    for r in results["table4"] + results["guidance_sweep"]:
        r.pop("samples", None)
    storage.write_bytes(storage.join(args.out, "results.json"), json.dumps(results, indent=1).encode())
    storage.write_bytes(storage.join(args.out, "results.txt"), (text + "\n").encode())
    panels = []
    for col in COLUMNS:
        rows = results["table4"] + results["guidance_sweep"][2:]
        panels.append(Panel(col, [r["row"].replace("SDM (SPADE)", "SDM") for r in rows], [r[col] for r in rows],
                            y_max=1.0 if col == "mIoU" else None,
                            colours=[0] * len(results["table4"]) + [1] * (len(rows) - len(results["table4"]))))
    storage.write_bytes(storage.join(args.out, "results.png"), bar_panels_png(panels, panel_width=480, height=360))
    print(f"\nwrote {storage.join(args.out, 'results.json')}, results.txt and results.png in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
