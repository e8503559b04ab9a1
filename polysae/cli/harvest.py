"""``polysae harvest``: record activations of one or more hook points to resumable shards."""

from __future__ import annotations

import argparse

HELP = "harvest activations of hook points from a language model to disk (resumable)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (bundled, default), minilm-l6 (bundled encoder), a "
                        "TransformerLens model name (needs a hub), or a local HF model folder")
    p.add_argument("--hooks", nargs="+", default=[], metavar="HOOK",
                   help="hook names recorded in one forward (default: the middle layer's "
                        "hook_resid_post); list them with `polysae hooks --model M`")
    p.add_argument("--dataset", default="bbc",
                   help="bbc (default), tweets, fortunes, a local .txt/.jsonl/.csv/.parquet "
                        "file, a pre-tokenized .npy, or hf:NAME[:config][@split] (a Hugging Face "
                        "dataset streamed via `datasets`: hub id, local data folder or "
                        "save_to_disk folder)")
    p.add_argument("--text-column", default=None,
                   help="text column of .jsonl/.csv/.parquet/hf: datasets (default text)")
    p.add_argument("--tokens", type=int, default=100_000, help="tokens to forward (default 100000)")
    p.add_argument("--ctx", type=int, default=128, help="context length (default 128)")
    p.add_argument("--out", required=True, help="output folder (re-run the same command to resume)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                   help="storage dtype (default float16; overflow is detected)")
    p.add_argument("--model-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype the model runs in (default float32)")
    p.add_argument("--batch-size", type=int, default=32, help="contexts per forward (default 32)")
    p.add_argument("--shard-size", type=int, default=65_536, help="rows per shard (default 65536)")
    p.add_argument("--bos", default="chunk", choices=("chunk", "doc", "none"),
                   help="BOS policy: chunk = BOS starts every context (default); doc = BOS "
                        "before every document; none")
    p.add_argument("--exclude-special", action="store_true",
                   help="do not store BOS/EOS/PAD/CLS/SEP positions")
    p.add_argument("--seed", type=int, default=0, help="document order of bundled corpora")
    p.add_argument("--device", default="cpu", help="device to run the model on (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from polysae.cli import CLIError
    from polysae.harvest import HarvestConfig, HarvestError, harvest

    cfg = HarvestConfig(model=args.model, hooks=list(args.hooks), dataset=args.dataset,
                        tokens=args.tokens, ctx=args.ctx, out=args.out, dtype=args.dtype,
                        model_dtype=args.model_dtype, batch_size=args.batch_size,
                        shard_size=args.shard_size, bos=args.bos,
                        exclude_special=args.exclude_special, text_column=args.text_column,
                        seed=args.seed, device=args.device, progress=not args.no_progress)
    try:
        r = harvest(cfg)
    except HarvestError as e:
        raise CLIError(str(e)) from None
    rate = f", {r.tokens_per_s:,.0f} tok/s" if r.seconds else " (already complete)"
    print(f"{r.out}: {r.n_rows:,} rows x {len(r.d_in)} hook(s) in {r.n_shards} shard(s){rate}")
    return 0
