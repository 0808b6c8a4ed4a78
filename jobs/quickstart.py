"""The main job on the embedded default: toy data, Ray Train pretraining + fine-tuning, guided samples.

    python -m jobs.quickstart --out runs/quickstart

Everything lands under --out on local files; running it again reuses what is complete.
"""

from __future__ import annotations

import argparse
import sys
import time
from itertools import islice

import numpy as np
from PIL import Image

from jobs import train
from sdm import storage
from sdm.data.card import CARD_FILE, read_card
from sdm.data.inspect import colourise
from sdm.data.shards import iter_samples
from sdm.data.toy import write_toy_dataset
from sdm.pipeline import SDMPipeline


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def _contact_sheet(model_uri: str, data_uri: str, path: str, scales: tuple[float, ...] = (1.0, 1.5, 3.0), n: int = 6) -> None:
    """Rows of: palette label | real image | one sample per guidance scale (same seed)."""
    pipe = SDMPipeline.from_pretrained(model_uri)
    card = read_card(data_uri)
    rows = []
    for s in islice(iter_samples(data_uri, split="val"), n):
        tiles = [colourise(s["label"], card.palette), s["image"]]
        for g in scales:
            tiles.append(pipe(s["label"], instances=s["instance"], guidance_scale=g, num_steps=25, seed=0)[0])
        rows.append(np.concatenate(tiles, axis=1))
    sheet = np.concatenate(rows, axis=0)
    Image.fromarray(sheet).resize((sheet.shape[1] * 4, sheet.shape[0] * 4), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.quickstart", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--samples", type=int, default=512, help="toy dataset size")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--num-workers", type=int, default=2)
    args = p.parse_args(argv)
    start = time.perf_counter()
    data, pre, ft = (storage.join(args.out, d) for d in ("data", "pretrain", "finetune"))

    _banner(f"1/4 toy dataset -> {data}")
    if storage.exists(storage.join(data, CARD_FILE)):
        print("complete already; reusing it")
    else:
        card = write_toy_dataset(data, n=args.samples, size=32, seed=0)
        print(f"wrote {card.split_sizes} in {len(card.shards)} shards")

    common = ["--preset", "tiny", "--data", data, "--num-workers", str(args.num_workers), "--log-every", "25"]
    _banner(f"2/4 pretraining on Ray Train ({args.num_workers} workers) -> {pre}")
    if train.main([*common, "--run", pre, "--steps", str(args.pretrain_steps), "--checkpoint-every", "100"]):
        return 1
    _banner(f"3/4 fine-tuning with label dropout 0.2 -> {ft}")
    if train.main([*common, "--run", ft, "--stage", "finetune", "--init-from", pre,
                   "--steps", str(args.finetune_steps), "--checkpoint-every", "50"]):
        return 1

    _banner("4/4 guided samples of validation label maps")
    sheet = storage.join(args.out, "contact_sheet.png")
    _contact_sheet(ft, data, sheet)
    print(f"contact sheet (label | real | guidance 1.0, 1.5, 3.0): {sheet}")

    _banner(f"done in {time.perf_counter() - start:.0f}s")
    print(f"  dataset:        {data}   (inspect: sdm data inspect {data})")
    print(f"  trained model:  {ft}/model")
    print(f"  samples:        {sheet}")
    print("  serve it:       serve run serve/config.yaml   (model_uri in the config points here)")
    print("  query it:       curl -s -o out.png -F label=@label.png -F steps=25 http://127.0.0.1:8000/v1/generate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
