"""Write a checkpoint directory at a release shape with random weights (speed does not depend on values).

    python benchmarks/make_random_checkpoint.py --config benchmarks/configs/infinitevl-4b-config.json --out DIR

The tokenizer, chat template and processor files come from the tiny checkpoint (same special tokens and
template; a small vocabulary whose ids all fall inside the real embedding). The weights use the release's
legacy tensor names, so the directory loads through the same code as the real release."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from model.config import parse_config
from model.tiny import tiny_weights, write_tiny_checkpoint

SHARD_BYTES = 4 * 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, help="a release-shaped config.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = json.loads(Path(args.config).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_checkpoint(Path(tmp) / "tiny", seed=args.seed)
        for f in tiny.iterdir():
            if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
                shutil.copy(f, out / f.name)
        tiny_gen = json.loads((tiny / "generation_config.json").read_text())
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
    (out / "generation_config.json").write_text(json.dumps(tiny_gen, indent=2, sort_keys=True))
    weights = tiny_weights(parse_config(raw), seed=args.seed)
    shards: list[dict] = [{}]
    size = 0
    for name, t in weights.items():
        if size and size + t.numel() * t.element_size() > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * t.element_size()
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())},
        "weight_map": {},
    }
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        index["weight_map"].update({name: fname for name in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    print(f"wrote {len(weights)} tensors in {len(shards)} shards to {out}")


if __name__ == "__main__":
    main()
