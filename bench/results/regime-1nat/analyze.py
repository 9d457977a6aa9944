#!/usr/bin/env python3
"""Prints each pilot's validation curve and where it first reaches the qualifying loss.

Reads only val_loss (the pilots' plan: README.md beside this file). Usage:
  bench/results/regime-1nat/analyze.py bench/results/regime-1nat/pilots
"""
import json
import pathlib
import sys

UNIGRAM_VAL = 6.015
QUALIFY = UNIGRAM_VAL - 1.10


def main(root):
    for pilot in sorted(p for p in pathlib.Path(root).iterdir()
                        if (p / "metrics.jsonl").is_file()):
        rows = [json.loads(line) for line in (pilot / "metrics.jsonl").read_text().splitlines()
                if line.strip()]
        rows = [r for r in rows if "val_loss" in r]
        if not rows:
            print(f"{pilot.name}: no evaluation yet")
            continue
        per_step = rows[-1]["wall_seconds"] / rows[-1]["step"]
        crossed = next((r for r in rows if r["val_loss"] <= QUALIFY), None)
        best = min(rows, key=lambda r: r["val_loss"])
        print(f"{pilot.name}: {rows[-1]['step']} steps, {per_step:.3f} s/step, best val "
              f"{best['val_loss']:.4f} at {best['step']} (margin {UNIGRAM_VAL - best['val_loss']:.3f} nat)"
              + (f", reaches {QUALIFY:.3f} at step {crossed['step']}" if crossed else
                 f", does not reach {QUALIFY:.3f}"))
        at_mask = all("val_loss_at_mask" in r for r in rows)
        print("  step  val_loss  train_loss" + ("  val_loss_at_mask" if at_mask else ""))
        for r in rows:
            print(f"  {r['step']:5d}  {r['val_loss']:.4f}    {r['train_loss']:.4f}"
                  + (f"      {r['val_loss_at_mask']:.4f}" if at_mask else ""))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent / "pilots")
