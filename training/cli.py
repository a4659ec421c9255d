"""python -m training {prepare,train,merge,eval,serve}: every failure is one line on stderr and a non-zero exit."""
import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from training.checkpoint import CheckpointError
from training.config import PRESETS, ConfigError, TrainConfig
from training.data import DataError


# `train --help`: one line per TrainConfig field (config.py says more where a choice needs it); the default is added.
TRAIN_HELP = {
    "data": "a folder written by `prepare`",
    "out": "the run folder: checkpoint, events.jsonl, export; run the same command again to resume",
    "preset": "the model's shape (with --init-from, the export's)",
    "vocab_size": "0: the tokenizer's; larger pads the embedding (50304, a multiple of 64, is faster on GPUs); "
                  "with --init-from, the export's",
    "init_from": "an exported model folder to adapt instead of a fresh model",
    "method": "full | lora | last-layer | bias; all but full adapt an export given by --init-from",
    "lora_rank": "LoRA's rank",
    "lora_alpha": "LoRA's scale numerator (the update is scaled by alpha/rank)",
    "lora_targets": "the projections LoRA adapts",
    "batch_size": "sequences per micro-batch and process",
    "seq_len": "tokens per sequence (at most the model's context)",
    "grad_accum": "micro-batches per optimizer step",
    "max_steps": "optimizer steps of the whole run",
    "lr": "peak learning rate, after warm-up",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "linear warm-up steps",
    "weight_decay": "AdamW's decay, on matrices only",
    "beta1": "AdamW's beta1",
    "beta2": "AdamW's beta2",
    "grad_clip": "clip the gradients' global norm to this (0: no clipping)",
    "eval_interval": "steps between validation losses",
    "eval_batches": "validation batches per evaluation",
    "checkpoint_interval": "steps between checkpoints (SIGTERM checkpoints too)",
    "seed": "seed of the initialisation and the data order",
    "device": "auto | cpu | cuda",
    "dtype": "auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16",
    "compile": "torch.compile the model: auto (on CUDA) | yes | no",
    "compile_mode": "default | reduce-overhead (CUDA graphs; one process, no accumulation) | max-autotune-no-cudagraphs",
    "attention": "the SDPA kernel tried first: auto (PyTorch's choice) | cudnn | flash | efficient | math",
    "residual_dtype": "float32 (as transformers) | bfloat16 (as torchtitan; needs bf16)",
    "head_loss": "auto (fused) | fused (the head and the loss as one step, no logits kept) | plain | triton (fused, "
                 "its pass over the logits a Triton kernel; CUDA)",
    "compile_optimizer": "torch.compile the clipping and AdamW: auto (with the model) | yes | no",
    "run_id": "the run's id in events and the manifest (default: a new one; a resumed run keeps its own)",
    "license": "the exported card's license (default: the data's)",
    "datasets": "registry dataset ids (org/name) named in the exported card",
    "base_model_id": "the base's registry id (org/name), the card's base_model",
}


def _train_parser(sub):
    parser = sub.add_parser("train", help="train a model, or adapt an exported one (--init-from)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = ",".join(default) if isinstance(default, tuple) else default
        text = TRAIN_HELP[f.name] + (f" (default {shown})" if shown not in ("", None) else "")
        if isinstance(default, tuple):
            parser.add_argument(flag, default=shown, help=f"{text}; comma-separated")
        elif isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=TRAIN_HELP[f.name])
        else:
            parser.add_argument(flag, type=type(default), default=default, help=text,
                                **({"choices": list(PRESETS)} if f.name == "preset" else {}))
    parser.add_argument("--echo", action="store_true", help="also print events to stdout")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints its usage too: every failure here is one line
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m training", description="Gatehouse training module")
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare", help="tokenize text files, folders and JSONL into shards + manifest")
    prep.add_argument("inputs", nargs="*", type=Path, help="text files, folders (read recursively) and .jsonl files")
    prep.add_argument("--out", type=Path, required=True,
                      help="a new or empty folder, or an earlier prepared dataset to replace")
    prep.add_argument("--demo-corpus", choices=["stdlib"], help="use the Python standard library's sources (PSF-2.0)")
    prep.add_argument("--vocab-size", type=int, default=2048, help="the BPE tokenizer's size (default 2048)")
    prep.add_argument("--val-fraction", type=float, default=0.05,
                      help="share of documents held out for validation, in (0, 0.5] (default 0.05)")
    prep.add_argument("--tokenizer-from", type=Path, help="reuse the tokenizer of a prepared or exported folder")
    prep.add_argument("--redact", action="store_true", help="replace personal data with placeholders")
    prep.add_argument("--license", default="", help="the source data's licence, recorded as given")
    prep.add_argument("--text-field", default="text", help="JSONL field holding the text")
    prep.add_argument("--max-bytes", type=int, help="stop reading inputs after this many bytes")
    prep.add_argument("--description", default="", help="a line about the data, kept in the manifest")
    prep.add_argument("--mixture", type=Path, help='JSON list of {"name", "paths", "weight", "license"}: a weighted '
                      "mixture of datasets, with facts kept per dataset")

    _train_parser(sub)

    merge = sub.add_parser("merge", help="merge a LoRA adapter export into full weights")
    merge.add_argument("adapter", type=Path, help="a LoRA run's export (adapter_config.json, adapter_model.safetensors)")
    merge.add_argument("--base", type=Path, required=True, help="the exported base model the adapter was trained on")
    merge.add_argument("--out", type=Path, required=True, help="a new or empty folder, or an earlier export to replace")

    ev = sub.add_parser("eval", help="score an exported model on the built-in tasks")
    ev.add_argument("model", type=Path, help="an exported model folder")

    srv = sub.add_parser("serve", help="serve an exported model over OpenAI-compatible HTTP (loopback)")
    srv.add_argument("--model", type=Path, required=True, help="a Llama-architecture Hugging Face folder")
    srv.add_argument("--model-id", default="", help="the id clients ask for (default: the folder's name)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8100, help="port to listen on (default 8100; 0: one the system picks)")
    srv.add_argument("--port-file", type=Path, help="once serving, write the port listened on to this file (replaced "
                     "whole; with --port 0, how a supervisor learns the port)")
    srv.add_argument("--max-batch", type=int, default=32, help="requests decoded together (KV cache slots)")
    srv.add_argument("--max-waiting", type=int, default=256,
                     help="requests that may wait for a slot; beyond it new ones get 503 + Retry-After")
    srv.add_argument("--max-seq-len", type=int, help="context served, prompt and answer (default the model's "
                     "max_position_embeddings; the KV cache holds --max-batch x this many positions)")
    srv.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N (default auto)")
    srv.add_argument("--decode", default="auto", choices=["auto", "dynamic", "static", "graphs", "compiled"],
                     help="decode step: CUDA graphs on a GPU, eager slices on a CPU (auto); compiled: torch.compile, then graphs")
    srv.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                     help="prefill every prompt whole, even where a slot still holds its start")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an --out that is a file, a folder we may not write: the path and the reason
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which checkpoints and exits 75 on its own)
        print(f"interrupted: {args.command} stopped; what it was writing was discarded", file=sys.stderr)
        return 130


def _run(args) -> int:
    if args.command == "prepare":
        from training.data import load_mixture, prepare, stdlib_corpus

        # One kind of input at a time: each carries its own licence, and one must not relabel another's files.
        given = [flag for flag, value in (("input paths", args.inputs), ("--mixture", args.mixture),
                                          ("--demo-corpus", args.demo_corpus)) if value]
        if not given:
            raise DataError("give input files or folders, --mixture FILE, or --demo-corpus stdlib")
        if len(given) > 1:
            raise DataError(f"{' and '.join(given)} cannot be combined: to combine datasets, each with its own "
                            "licence, list them in a --mixture file")
        if args.license and not args.inputs:
            raise DataError("--license is for input paths: --demo-corpus stdlib is PSF-2.0, and a --mixture file "
                            "gives each dataset's licence")
        inputs, license, groups = list(args.inputs), args.license, None
        if args.demo_corpus == "stdlib":
            inputs, license = stdlib_corpus()
        if args.mixture:
            groups = load_mixture(args.mixture)
        prepared = prepare(inputs, args.out, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                           tokenizer_from=args.tokenizer_from, redact=args.redact, license=license,
                           text_field=args.text_field, max_bytes=args.max_bytes, description=args.description,
                           groups=groups)
        m = prepared.manifest
        undecodable = [s for s in m["sources"] if s["undecodable_bytes"]]
        binary = [s for s in m["sources"] if s["skipped"] == "binary"]
        if undecodable or binary:
            found = [f"{sum(s['undecodable_bytes'] for s in undecodable)} bytes that are not UTF-8 (read as U+FFFD) "
                     f"in {len(undecodable)} files"] if undecodable else []
            found += [f"{len(binary)} binary files skipped"] if binary else []
            print(f"warning: {'; '.join(found)}: see sources in {prepared.directory / 'manifest.json'}",
                  file=sys.stderr)
        print(json.dumps({"out": str(prepared.directory), "documents": m["documents"], "tokens": m["tokens"],
                          "exact_duplicates_removed": m["exact_duplicates_removed"],
                          "personal_data_found": m["personal_data_found"]}))
        return 0
    if args.command == "train":
        from training.trainer import train

        values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "extra"}
        values["lora_targets"] = tuple(t for t in values["lora_targets"].split(",") if t)
        values["datasets"] = tuple(t for t in values["datasets"].split(",") if t)
        return train(TrainConfig(**values), echo=args.echo)
    if args.command == "merge":
        return _merge(args)
    if args.command == "eval":
        from training.evaluate import run_tasks
        from training.export import load_exported
        from training.tokenizer import load_tokenizer

        model, _ = load_exported(args.model)
        print(json.dumps(run_tasks(model, load_tokenizer(args.model))))
        return 0
    if args.command == "serve":
        from training.serve import serve

        if args.max_waiting < 1:
            raise ConfigError(f"--max-waiting must be at least 1, not {args.max_waiting}")
        if args.max_seq_len is not None and args.max_seq_len < 2:
            raise ConfigError(f"--max-seq-len must be at least 2, not {args.max_seq_len}")
        if args.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, not {args.max_batch}")
        if not 0 <= args.port <= 65535:
            raise ConfigError(f"--port must be from 0 to 65535, not {args.port}")
        if args.port_file is not None and not args.port_file.parent.is_dir():  # found out now, not after warm-up
            raise ConfigError(f"--port-file {args.port_file}: the folder {args.port_file.parent} does not exist")
        try:
            serve(str(args.model), model_id=args.model_id or args.model.resolve().name, host=args.host, port=args.port,
                  max_batch=args.max_batch, device=args.device, decode=args.decode, max_waiting=args.max_waiting,
                  max_seq_len=args.max_seq_len, prefix_cache=args.prefix_cache,
                  port_file=str(args.port_file) if args.port_file else None)
        except KeyboardInterrupt:
            pass
        return 0
    return 2


def _merge(args) -> int:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from training.adapt import apply_method, merge_lora
    from training.export import check_adapter_base, check_export_target, export, load_exported, merged_card

    config_path = args.adapter / "adapter_config.json"
    if not config_path.exists():
        raise ConfigError(f"{args.adapter} is not a LoRA adapter export (no adapter_config.json)")
    try:
        adapter_config = json.loads(config_path.read_text())
        rank, alpha, targets = adapter_config["r"], adapter_config["lora_alpha"], adapter_config["target_modules"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{config_path} is not a LoRA adapter config (needs r, lora_alpha, target_modules: "
                          f"{exc.__class__.__name__} {exc})") from None
    if args.out.resolve() in (args.base.resolve(), args.adapter.resolve()):
        raise ConfigError("--out must be a new folder, not the base model or the adapter (they would be replaced)")
    check_export_target(args.out)  # before the work, as export checks again before it writes
    check_adapter_base(args.adapter, args.base)
    model, _ = load_exported(args.base)
    apply_method(model, "lora", lora_rank=rank, lora_alpha=alpha, lora_targets=tuple(targets))
    try:
        state = {k.removeprefix("base_model.model.").replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B"): v
                 for k, v in load_file(str(args.adapter / "adapter_model.safetensors")).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (SafetensorError, RuntimeError) as exc:
        raise ConfigError(f"{args.adapter} does not fit {args.base}, or its weights are corrupt "
                          f"({str(exc).splitlines()[-1].strip()})") from None
    if unexpected or len([m for m in missing if "lora_" in m]):
        raise ConfigError(f"{args.adapter} does not fit {args.base}")
    merge_lora(model)
    manifest = json.loads((args.adapter / "manifest.json").read_text()) if (args.adapter / "manifest.json").exists() else {}
    # trainable_parameters stays: how many the adaptation trained; the model now has the base's parameters.
    manifest.update({"method": "lora-merged", "adapter": False, "merged_from": str(args.adapter),
                     "parameters": model.num_parameters()})
    manifest.pop("files", None)
    manifest.pop("format_version", None)
    card = merged_card((args.adapter / "README.md").read_text())
    export(model, args.out, tokenizer_dir=args.adapter, manifest=manifest, card=card)
    print(json.dumps({"out": str(args.out)}))
    return 0
