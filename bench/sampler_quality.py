"""Quality against cost for every sampler: one model, one seed set, scored against the real images and against
the 1000-step ancestral reference.

    python bench/sampler_quality.py                                  # the quick start's model and data
    python bench/sampler_quality.py --model runs/r1-ft --data data/toy --maps 64 --steps 10,25,50,100

For each sampler at each step count (and the reference, `ddpm` at 1000 steps) it draws `--k` samples of each of
`--maps` validation label maps with the same seeds, and prints: network evaluations per image, wall time, the
texture (mean absolute difference of neighbouring pixels, real images alongside), the spectrum distance to the
real images and to the reference, the built-in segmenter's mIoU and feature Frechet distance, and the low-pass
pixel diversity. With --cache-intervals, the model's default sampler also runs with the feature cache
(sdm.unet.FeatureCache: the deep features recomputed every k-th step only) at --cache-steps, each row next to its
uncached setting, so its speed-up and its quality loss come from one run. The cheapest uncached setting within the
tolerances is printed last (texture within --texture-tolerance
of the real images', mIoU at most --miou-tolerance under the reference's): that is how the presets' default
sampler is chosen (docs/evaluation.md). A contact sheet PNG shows one column per setting.

Before the sweep it prints two diagnoses of why deterministic samplers draw grain: how much of the noise in x_t
the model finds at each timestep, and the texture of DDIM switched between eta 1 and eta 0 at a timestep.

With --students (distilled models of --model: sdm.distill), it instead compares them with their teacher at each
guidance scale of --guidances: the teacher's 1000-step reference and its default sampler, then every student at its
own steps (a step student with DDIM eta 0, as distilled, and eta 1; a guidance student at the teacher's default and
at 10 steps), each row with its network rows per image, time, every figure, and whether it is usable: within the
tolerances above. One contact sheet per scale.

    python bench/sampler_quality.py --students runs/distill/dg,runs/distill/ds4 --guidances 1,1.5,3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import islice

import numpy as np
import torch

from sdm import storage
from sdm.data.card import read_card
from sdm.data.shards import iter_samples
from sdm.metrics.diversity import LowPassL1Distance, mean_pairwise_distance
from sdm.metrics.evaluate import builtin_segmenter
from sdm.metrics.frechet import feature_stats, frechet_distance
from sdm.metrics.report import contact_sheet_png
from sdm.metrics.segmenter import load_builtin, segment_scores
from sdm.metrics.spectrum import SpectrumFeatures, spectral_fidelity
from sdm.pipeline import SDMPipeline
from sdm.samplers import DDIM, SAMPLERS, NoiseSource, make_denoiser, sample
from sdm.runner import to_uint8
from sdm.seeds import sample_seeds

REFERENCE = ("ddpm", 1000)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/quickstart/finetune")
    p.add_argument("--data", default="runs/quickstart/data", help="the real dataset (val split scored, train split for the segmenter)")
    p.add_argument("--out", default="runs/sampler_quality")
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--steps", default="10,25,50,100")
    p.add_argument("--maps", type=int, default=32, help="validation label maps")
    p.add_argument("--k", type=int, default=2, help="samples per label map")
    p.add_argument("--guidance", type=float, help="default: the model's")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (ddim-eta1 rows use 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--segmenter", help="a built-in segmenter directory to score with (default: one trained on --data)")
    p.add_argument("--segmenter-steps", type=int, default=200)
    p.add_argument("--cache-dir", default="runs/quickstart/cache")
    p.add_argument("--texture-tolerance", type=float, default=0.15, help="|texture / real texture - 1| allowed")
    p.add_argument("--miou-tolerance", type=float, default=0.01, help="mIoU below the reference's allowed")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--switch-steps", type=int, default=25, help="steps of the switched-DDIM diagnosis")
    p.add_argument("--cache-intervals", default="2,3,5", help="feature-cache intervals k to measure ('' for none)")
    p.add_argument("--cache-steps", default="25,50", help="step counts of the feature-cache rows (the model's default sampler)")
    p.add_argument("--students", default="", help="distilled students of --model to compare with it instead of the sweep")
    p.add_argument("--guidances", default="1,1.5,3", help="--students: the guidance scales to compare at")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, flush=True)


class Scorer:
    """Everything measured on a set of generated images, against the real validation images."""

    def __init__(self, real_images: np.ndarray, maps: list[dict], k: int, segmenter_uri: str, num_classes: int):
        self.seg = load_builtin(segmenter_uri)
        self.spectrum = SpectrumFeatures()
        self.real_spectrum = self.spectrum(real_images).mean(0)
        self.real_fd = feature_stats(self.seg.features(real_images))
        self.labels = np.repeat(np.stack([m["label"] for m in maps]), k, axis=0)
        self.keys = [m["key"] for m in maps]
        self.k = k
        self.num_classes = num_classes
        self.real_miou = segment_scores(self.seg, real_images, np.stack([m["label"] for m in maps]), num_classes).miou()

    def __call__(self, images: np.ndarray, reference: np.ndarray | None) -> dict:
        spec = self.spectrum(images).mean(0)
        fid = spectral_fidelity(self.real_spectrum, spec)
        groups = {key: images[i * self.k : (i + 1) * self.k] for i, key in enumerate(self.keys)}
        out = {
            "texture": fid.texture_generated, "texture_ratio": fid.texture_ratio, "spectrum_db": fid.spectrum_db,
            "hf_ratio": fid.high_frequency_ratio,
            "miou": segment_scores(self.seg, images, self.labels, self.num_classes).miou(),
            "segmenter_fd": frechet_distance(feature_stats(self.seg.features(images)), self.real_fd),
            "diversity": mean_pairwise_distance(groups, LowPassL1Distance()).mean,
        }
        if reference is not None:
            out["spectrum_db_vs_ref"] = spectral_fidelity(self.spectrum(reference).mean(0), spec).spectrum_db
        return out


@torch.no_grad()
def noise_left_by_timestep(pipe: SDMPipeline, maps: list[dict], guidance: float, seed: int,
                           timesteps: tuple[int, ...] = (0, 10, 25, 50, 100, 200, 400, 700, 999)) -> list[dict]:
    """How much of the noise in x_t the guided model finds, on real images: the share of the true eps it predicts
    (regression slope), and the noise its x_0 estimate keeps, in uint8 levels. A deterministic sampler carries
    what the model misses at small t into the image; an ancestral one replaces it with fresh, smaller noise."""
    x0 = torch.from_numpy(np.stack([m["image"] for m in maps])).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    label = pipe.prepare_labels([m["label"] for m in maps], [m["instance"] for m in maps])
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in timesteps:
        eps = torch.randn(x0.shape, generator=g)
        tt = torch.full((len(maps),), t, dtype=torch.long)
        xt = pipe.diffusion.q_sample(x0, tt, eps)
        denoise = make_denoiser(pipe.net, pipe.diffusion, label, guidance, pipe.dtype)
        pred = denoise(xt, tt).eps
        ab = pipe.diffusion.alphas_cumprod[t]
        miss = (pred - eps).pow(2).mean().sqrt().item()
        out.append({"t": t, "noise_level": float(np.sqrt(1 - ab) * 127.5), "found": float((pred * eps).sum() / eps.pow(2).sum()),
                    "eps_rmse": miss, "x0_noise_levels": float(np.sqrt((1 - ab) / ab) * miss * 127.5)})
    return out


class SwitchedDDIM(DDIM):
    """DDIM whose eta depends on the noise level: `above` at original timesteps >= `at`, `below` under it."""

    def __init__(self, at: int, above: float, below: float):
        super().__init__()
        self.at, self.above, self.below = at, above, below

    def step(self, d, i, x, x0, pred, noise):
        self.eta = self.above if d.timesteps[i] >= self.at else self.below
        return super().step(d, i, x, x0, pred, noise)


@torch.no_grad()
def texture_by_switch(pipe: SDMPipeline, maps: list[dict], guidance: float, steps: int, seed: int,
                      switches: tuple[int, ...] = (800, 600, 400, 200, 100)) -> list[dict]:
    """Where along the trajectory grain enters: texture when DDIM is stochastic (eta 1) above a timestep and
    deterministic (eta 0) below it, and the other way round."""
    label = pipe.prepare_labels([m["label"] for m in maps], [m["instance"] for m in maps])
    seeds = sample_seeds(seed, len(maps))
    spectrum = SpectrumFeatures()
    out = []
    for at in switches:
        row = {"switch_t": at}
        for name, above, below in (("stochastic_above", 1.0, 0.0), ("deterministic_above", 0.0, 1.0)):
            x = sample(lambda d: make_denoiser(pipe.net, d, label, guidance, pipe.dtype), pipe.diffusion,
                       SwitchedDDIM(at, above, below), steps, NoiseSource(seeds, (3, *label.shape[-2:]), pipe.device))
            row[name] = float(spectrum(to_uint8(x))[:, -1].mean())
        out.append(row)
    return out


def _draw(pipe: SDMPipeline, maps: list[dict], k: int, seed: int, **params) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    images = pipe([m["label"] for m in maps], instances=[m["instance"] for m in maps], seed=seed, num_samples=k, **params)
    return images, time.perf_counter() - t0


def _usable(r: dict, ref: dict, args: argparse.Namespace) -> bool:
    """Within the sweep's tolerances: texture near the real images', mIoU near the reference's."""
    return abs(r["texture_ratio"] - 1) <= args.texture_tolerance and r["miou"] >= ref["miou"] - args.miou_tolerance


def _student_settings(pipe: SDMPipeline, teacher: SDMPipeline, few: list[int]) -> list[tuple[str, dict]]:
    """(label, sampling parameters) of a student's rows: a step student's own steps with DDIM eta 0 (as distilled)
    and eta 1; a guidance student's at its teacher's default sampler, at 10 steps and at the step students' `few`
    steps (DDIM eta 0 and 1: what those steps draw without step distillation)."""
    s = pipe.config.student
    if s.timesteps:
        n = len(s.timesteps)
        return [(f"ddim eta 0 {n}", {"eta": 0.0}), (f"ddim eta 1 {n}", {"eta": 1.0})]
    d = teacher.config.sampling
    rows = [(f"{d.sampler} eta {d.eta:g} {n}", {"sampler": d.sampler, "eta": d.eta, "num_inference_steps": n})
            for n in (d.num_inference_steps, 10)]
    return rows + [(f"ddim eta {eta:g} {n}", {"sampler": "ddim", "eta": eta, "num_inference_steps": n}) for n in few for eta in (0.0, 1.0)]


def compare_students(args: argparse.Namespace, teacher: SDMPipeline, maps: list[dict], scorer: Scorer, palette) -> int:
    """The students against their teacher at each guidance scale (see the module's doc)."""
    students = {uri: SDMPipeline.from_pretrained(uri, precision=args.precision, micro_batch=args.maps * args.k)
                for uri in args.students.split(",")}
    default = teacher.config.sampling
    few = sorted({len(p.config.student.timesteps) for p in students.values() if p.config.student.timesteps})
    all_rows = []
    for g in (float(v) for v in args.guidances.split(",")):
        ref_images, ref_seconds = _draw(teacher, maps, args.k, args.seed, guidance_scale=g, sampler=REFERENCE[0],
                                        num_inference_steps=REFERENCE[1], eta=0.0)
        ref = {"setting": f"teacher {REFERENCE[0]} {REFERENCE[1]} (reference)", "rows_per_image": REFERENCE[1] * (1 if g == 1 else 2),
               "seconds": ref_seconds, **scorer(ref_images, None)}
        images, seconds = _draw(teacher, maps, args.k, args.seed, guidance_scale=g)
        rows = [ref, {"setting": f"teacher {default.sampler} eta {default.eta:g} {default.num_inference_steps} (default)",
                      "rows_per_image": default.num_inference_steps * (1 if g == 1 else 2), "seconds": seconds,
                      **scorer(images, ref_images)}]
        columns = [ref_images, images]
        for uri, pipe in students.items():
            lo, hi = pipe.config.student.guidance_range
            if not lo <= g <= hi:
                continue
            for name, params in _student_settings(pipe, teacher, few):
                images, seconds = _draw(pipe, maps, args.k, args.seed, guidance_scale=g, **params)
                steps = params.get("num_inference_steps", pipe.config.sampling.num_inference_steps)
                rows.append({"setting": f"{uri.rstrip('/').split('/')[-1]} {name}", "rows_per_image": steps, "seconds": seconds,
                             **scorer(images, ref_images)})
                columns.append(images)
        for r in rows:
            r.update(guidance=g, usable=_usable(r, ref, args), speedup_vs_default=rows[1]["seconds"] / r["seconds"],
                     speedup_vs_reference=ref["seconds"] / r["seconds"])
        print(f"\nguidance {g:g}\n{STUDENT_HEADER}")
        for r in rows:
            print(_student_row(r, len(ref_images)))
        sheet = [(maps[i]["label"], maps[i]["image"], np.stack([c[i * args.k] for c in columns])) for i in range(min(8, len(maps)))]
        uri = storage.join(args.out, f"students_g{g:g}.png")
        storage.write_bytes(uri, contact_sheet_png(sheet, palette, min_cell=64))
        print(f"contact sheet (label | real | {' | '.join(r['setting'] for r in rows)}): {uri}")
        all_rows += rows
    storage.write_bytes(storage.join(args.out, "students.json"), json.dumps({"settings": vars(args), "rows": all_rows}, indent=1).encode())
    return 0


STUDENT_HEADER = (f"{'setting':<40}{'rows/img':>9}{'ms/img':>8}{'x default':>10}{'x ref':>7}{'tex/real':>9}{'spec dB':>8}"
                  f"{'HF x':>6}{'vs ref dB':>10}{'mIoU':>8}{'seg-FD':>8}{'diversity':>10}  usable")


def _student_row(r: dict, n: int) -> str:
    vs_ref = f"{r['spectrum_db_vs_ref']:>10.2f}" if "spectrum_db_vs_ref" in r else f"{'-':>10}"
    return (f"{r['setting']:<40}{r['rows_per_image']:>9}{1000 * r['seconds'] / n:>8.1f}{r['speedup_vs_default']:>9.2f}x"
            f"{r['speedup_vs_reference']:>6.0f}x{r['texture_ratio']:>9.2f}{r['spectrum_db']:>8.2f}{r['hf_ratio']:>6.2f}{vs_ref}"
            f"{r['miou']:>8.4f}{r['segmenter_fd']:>8.4f}{r['diversity']:>10.4f}  {'yes' if r['usable'] else 'no'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    # One network batch per setting, unpadded: every row is a real sample.
    pipe = SDMPipeline.from_pretrained(args.model, precision=args.precision, micro_batch=args.maps * args.k)
    guidance = pipe.config.sampling.guidance_scale if args.guidance is None else args.guidance
    card = read_card(args.data)
    maps = list(islice(iter_samples(args.data, split="val"), args.maps))
    real = np.stack([m["image"] for m in maps])
    seg_uri = args.segmenter or builtin_segmenter(args.data, args.segmenter_steps, args.cache_dir, log)
    scorer = Scorer(real, maps, args.k, seg_uri, card.num_classes)
    if args.students:
        log(f"model {args.model}, {len(maps)} label maps x {args.k} samples, precision {args.precision}; real images: texture "
            f"{scorer.spectrum(real)[:, -1].mean():.2f}, segmenter mIoU {scorer.real_miou:.4f}")
        status = compare_students(args, pipe, maps, scorer, card.palette)
        print(f"done in {time.perf_counter() - start:.0f}s")
        return status
    log(f"model {args.model}, {len(maps)} label maps x {args.k} samples, guidance {guidance:g}, precision {args.precision}; "
        f"real images: texture {scorer.spectrum(real)[:, -1].mean():.2f}, segmenter mIoU {scorer.real_miou:.4f}")

    log(f"\n{'t':>5}{'noise (levels)':>16}{'eps found':>11}{'eps RMSE':>10}{'noise left in x0 estimate (levels)':>36}")
    diagnosis = noise_left_by_timestep(pipe, maps, guidance, args.seed)
    for d in diagnosis:
        log(f"{d['t']:>5}{d['noise_level']:>16.2f}{d['found']:>11.3f}{d['eps_rmse']:>10.3f}{d['x0_noise_levels']:>36.2f}")
    log(f"\ntexture of DDIM {args.switch_steps} steps switched at timestep t (real images: {scorer.spectrum(real)[:, -1].mean():.2f})")
    log(f"{'t':>5}{'eta 1 above t, 0 below':>26}{'eta 0 above t, 1 below':>26}")
    switched = texture_by_switch(pipe, maps, guidance, args.switch_steps, args.seed)
    for r in switched:
        log(f"{r['switch_t']:>5}{r['stochastic_above']:>26.2f}{r['deterministic_above']:>26.2f}")
    log("")

    def draw(sampler: str, steps: int, eta: float, cache: int = 1) -> tuple[np.ndarray, float]:
        return _draw(pipe, maps, args.k, args.seed, guidance_scale=guidance, num_inference_steps=steps, sampler=sampler,
                     eta=eta, cache_interval=cache)

    settings = [(s, n, args.eta, 1) for s in args.samplers.split(",") for n in (int(v) for v in args.steps.split(","))]
    if "ddim" in args.samplers.split(","):
        settings += [("ddim", n, 1.0, 1) for n in (int(v) for v in args.steps.split(","))]
    default = pipe.config.sampling
    intervals = [int(v) for v in args.cache_intervals.split(",") if v]
    for n in (int(v) for v in args.cache_steps.split(",")) if intervals else ():
        settings += [(default.sampler, n, default.eta, k) for k in [1, *intervals] if (default.sampler, n, default.eta, k) not in settings]
    ref_images, ref_seconds = draw(*REFERENCE, 0.0)
    rows = [{"setting": f"{REFERENCE[0]} {REFERENCE[1]} (reference)", "sampler": REFERENCE[0], "steps": REFERENCE[1],
             "eta": 0.0, "seconds": ref_seconds, **scorer(ref_images, None)}]
    sheet_columns = [ref_images]
    log(_fmt_row(rows[0], guidance, len(ref_images)))
    for sampler, steps, eta, cache in settings:
        images, seconds = draw(sampler, steps, eta, cache)
        name = f"{sampler}{f' eta {eta:g}' if sampler == 'ddim' else ''} {steps}{f' cache {cache}' if cache > 1 else ''}"
        rows.append({"setting": name, "sampler": sampler, "steps": steps, "eta": eta if sampler == "ddim" else None,
                     "cache_interval": cache, "seconds": seconds, **scorer(images, ref_images)})
        sheet_columns.append(images)
        log(_fmt_row(rows[-1], guidance, len(images)))

    ref = rows[0]
    ok = [r for r in rows[1:] if abs(r["texture_ratio"] - 1) <= args.texture_tolerance and r["miou"] >= ref["miou"] - args.miou_tolerance
          and r["cache_interval"] == 1]
    choice = min(ok, key=lambda r: (r["steps"], r["seconds"])) if ok else None
    print("\n" + _table(rows, guidance, len(ref_images)))
    tol = f"texture within {args.texture_tolerance:.0%} of the real images', mIoU at most {args.miou_tolerance} below the reference's"
    print(f"\ncheapest uncached setting with {tol}: {choice['setting'] if choice else 'none'}")
    cached = [r for r in rows[1:] if r["cache_interval"] > 1]
    if cached:
        print("\nfeature cache against the same setting uncached (speed-up in wall time; quality deltas):")
        print(f"{'setting':<30}{'speed-up':>9}{'d texture':>10}{'d spec dB':>10}{'d mIoU':>8}{'d seg-FD':>9}")
        for r in cached:
            base = next(b for b in rows[1:] if b["cache_interval"] == 1 and (b["sampler"], b["steps"], b["eta"]) == (r["sampler"], r["steps"], r["eta"]))
            print(f"{r['setting']:<30}{base['seconds'] / r['seconds']:>8.2f}x{r['texture'] - base['texture']:>+10.2f}"
                  f"{r['spectrum_db'] - base['spectrum_db']:>+10.2f}{r['miou'] - base['miou']:>+8.4f}{r['segmenter_fd'] - base['segmenter_fd']:>+9.4f}")
    storage.write_bytes(storage.join(args.out, "results.json"), json.dumps(
        {"settings": vars(args), "guidance": guidance, "noise_left": diagnosis, "switched_ddim": switched, "rows": rows, "choice": choice and choice["setting"]}, indent=1).encode())
    sheet_rows = [(maps[i]["label"], maps[i]["image"], np.stack([c[i * args.k] for c in sheet_columns])) for i in range(min(8, len(maps)))]
    storage.write_bytes(storage.join(args.out, "contact_sheet.png"), contact_sheet_png(sheet_rows, card.palette, min_cell=64))
    print(f"contact sheet (label | real | {' | '.join(r['setting'] for r in rows)}): {storage.join(args.out, 'contact_sheet.png')}")
    print(f"done in {time.perf_counter() - start:.0f}s")
    return 0


def _nfe(r: dict, guidance: float) -> int:
    """Whole-network evaluations per image: one per step (every k-th with the feature cache), two with guidance
    (one batched pass holds both)."""
    return -(-r["steps"] // r.get("cache_interval", 1)) * (1 if guidance == 1.0 else 2)


HEADER = (f"{'setting':<30}{'NFE/img':>8}{'ms/img':>8}{'texture':>9}{'tex/real':>9}{'spec dB':>8}{'HF x':>7}"
          f"{'vs ref dB':>10}{'mIoU':>8}{'seg-FD':>8}{'diversity':>10}")


def _fmt_row(r: dict, guidance: float, n: int) -> str:
    vs_ref = f"{r['spectrum_db_vs_ref']:>10.2f}" if "spectrum_db_vs_ref" in r else f"{'-':>10}"
    return (f"{r['setting']:<30}{_nfe(r, guidance):>8}{1000 * r['seconds'] / n:>8.1f}{r['texture']:>9.2f}{r['texture_ratio']:>9.2f}"
            f"{r['spectrum_db']:>8.2f}{r['hf_ratio']:>7.2f}{vs_ref}{r['miou']:>8.4f}{r['segmenter_fd']:>8.4f}{r['diversity']:>10.4f}")


def _table(rows: list[dict], guidance: float, n: int) -> str:
    return "\n".join([HEADER] + [_fmt_row(r, guidance, n) for r in rows])


if __name__ == "__main__":
    sys.exit(main())
