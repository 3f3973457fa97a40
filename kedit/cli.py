"""The ``kedit`` command: parses arguments, calls the library, prints. No logic lives here."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import InputError, KeditError

KIND_COMMANDS = {"editors": "editors", "regularizers": "regularizers", "evaluators": "evaluators",
                 "importers": "spec_importers", "architectures": "architectures"}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``kedit: error:`` line and exit code 2, like every
    other bad input, instead of the usage text and a SystemExit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(f"{message} (see `{self.prog} --help`)")


def positive_int(text: str) -> int:
    """argparse type of counts and sizes: a whole number of at least 1 (0 would silently mean 1 or nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seed_int(text: str) -> int:
    """argparse type of --seed: a whole number in the range :class:`kedit.config.RunConfig` accepts."""
    from .config import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_SEED}, got {value}")
    return value


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def _fmt(p: float | None) -> str:
    return "   -  " if p is None else f"{p:6.4f}"


def run_config(args: argparse.Namespace) -> Any:
    """The :class:`kedit.config.RunConfig` that a command's arguments describe."""
    from .config import RunConfig, StatsConfig

    evaluators = getattr(args, "eval", None) or getattr(args, "evaluator", None) or ()
    return RunConfig(model=args.model, seed=getattr(args, "seed", 0),
                     stats=StatsConfig(corpus=getattr(args, "corpus", None),
                                       n_tokens=getattr(args, "stats_tokens", None)),
                     evaluators=tuple(evaluators), data=tuple(getattr(args, "data", None) or ()),
                     use_cache=not getattr(args, "no_cache", False), quiet=getattr(args, "quiet", False),
                     device=getattr(args, "device", None) or "cpu", dtype=getattr(args, "dtype", None) or "float32",
                     device_map=getattr(args, "device_map", None))


def distributed_command(cmd):
    """Wrap a command that may run as several processes (``--nproc N``, or started by torchrun).

    ``--nproc N`` outside torchrun re-runs the same command line under torchrun. Inside it every
    rank joins the process group, runs the command, and leaves; ranks other than 0 show no
    progress and print nothing (rank 0 alone writes files and caches). A rank that fails leaves
    without waiting for the others, so torchrun stops them instead of them waiting forever.
    """
    import contextlib
    import functools
    import io

    @functools.wraps(cmd)
    def run(args: argparse.Namespace) -> int:
        from . import distributed

        nproc = getattr(args, "nproc", 1) or 1
        if nproc > 1 and not distributed.in_torchrun():
            argv = [a for a in args.argv if not a.startswith("--nproc=")]
            if "--nproc" in argv:  # the "--nproc N" form: drop its value too
                i = argv.index("--nproc")
                argv = argv[:i] + argv[i + 2:]
            return distributed.relaunch(nproc, argv)
        if not distributed.in_torchrun():
            return cmd(args)
        from .models import resolve

        # before the process group exists: transformers' save_pretrained writes nothing on ranks
        # other than 0 once it does, and any rank may be the one that fills the model cache
        resolve(getattr(args, "model", None))
        distributed.join(run_config(args).placement()["device"])
        try:
            if distributed.is_writer():
                code = cmd(args)
            else:
                args.quiet = True
                with contextlib.redirect_stdout(io.StringIO()):
                    code = cmd(args)
        except BaseException:
            distributed.leave(wait=False)
            raise
        distributed.leave()
        distributed.exit_rank(int(code or 0))
    return run


@distributed_command
def cmd_apply(args: argparse.Namespace) -> int:
    from .config import EditJob
    from .options import parse_pairs
    from .workflows import apply

    job = EditJob(args.spec, editor=args.plugin, options=parse_pairs(args.option), regs=tuple(args.reg),
                  reg_in_loop=args.reg_in_loop, mode=args.mode, batch_size=args.batch_size, squash=args.squash,
                  after=tuple(args.after), continue_chain=args.continue_chain, out=args.out,
                  eval_at=tuple(args.eval_at), overwrite=args.overwrite)
    result = apply(job, run_config(args))
    if job.sequential:
        return _print_sequence(result, args.json)
    if args.json:
        _print_json(result)
        return 0
    _print_probe_table(result)
    print(f"wrote {result['diff']} ({result['bytes'] / 1024:.1f} KiB, {result['id']})")
    if "metrics" in result:
        print()
        _print_metrics(result)
    return 0


def _short(text: str, width: int) -> str:
    """``text`` in ``width`` characters: whole, or cut (at a word boundary where one is near) with
    an ellipsis, never silently."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    cut = text[: width - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space >= width // 2 else cut).rstrip() + "…"


def _print_probe_table(result: dict[str, Any], table: bool = True) -> None:
    """The edit's own prompt before and after, and what the spec's paraphrases and neighbours say
    (a ✗ marks a neighbour the edit broke: its own answer no longer beats the new target)."""
    rows = result["results"]
    has_para = any(r["paraphrases"] for r in rows)
    has_neigh = any(r["neighbours"] for r in rows)
    cells = []
    for r in rows:
        cell = [_short(r["id"], 24), _short(r["target_new"], 16), f"{_fmt(r['p_new_before'])} → {_fmt(r['p_new_after'])}",
                f"{_fmt(r['p_true_before'])} → {_fmt(r['p_true_after'])}"]
        if has_para:
            cell.append(f"{r['paraphrases_changed']}/{r['paraphrases']}" if r["paraphrases"] else "-")
        if has_neigh:
            cell.append((f"{r['neighbours_kept']}/{r['neighbours']}" + (" ✗" if r["neighbours_damaged"] else ""))
                        if r["neighbours"] else "-")
        cell.append("yes" if r["changed"] else "no")
        cells.append(cell)
    head = ["spec", "new target", "P(new) before→after", "P(old) before→after"] + (["para"] if has_para else []) + \
        (["neigh"] if has_neigh else []) + ["changed"]
    widths = [max(len(c[i]) for c in cells + [head]) for i in range(len(head))]
    for c in [head] + cells if table else []:
        print("  ".join(x.ljust(w) for x, w in zip(c, widths)).rstrip())
    line = f"changed {result['changed']}/{result['count']} facts (new target now more probable than the old)"
    if has_para:
        line += f"; paraphrases {result['paraphrases_changed']}/{result['paraphrases']}"
    if has_neigh:
        line += (f"; neighbours kept {result['neighbours_kept']}/{result['neighbours']}, "
                 f"{result['neighbours_damaged']} damaged by the edit")
    print(line)


def _print_sequence(result: dict[str, Any], as_json: bool) -> int:
    if as_json:
        _print_json(result)
        return 0
    print(f"{'step':>4} {'edits':>6} {'seconds':>8} {'mean|W|':>9} {'mean|ΔW|':>10} {'L1 dist':>10} "
          f"{'δ>0.077':>8} {'δ>0.171':>8}")
    for i, st in enumerate(result["steps"], start=1):
        rows = list(st["drift"].values())
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        print(f"{i:>4} {st['edits']:>6} {st['seconds']:>8.1f} {mean['mean_abs_w']:>9.5f} {mean['mean_abs_dw']:>10.3g} "
              f"{sum(r['l1_distance'] for r in rows):>10.4g} {mean['share_rel_gt_0.077']:>8.3f} "
              f"{mean['share_rel_gt_0.171']:>8.3f}")
    print("(drift: means over the edited matrices, against the sequence's base)")
    for point in result["evaluation"]:
        print(f"\n{point['at']} evaluation after {point['edits']} edits, on {point['specs']} specs:")
        _print_metrics(point)
    if result.get("forgetting"):
        print(f"\n{'forgetting':<28} {'immediate':>10} {'final':>10} {'gap':>10}")
        for name, g in result["forgetting"].items():
            print(f"{name:<28} {g['immediate']:>10.4g} {g['final']:>10.4g} {g['gap']:>10.4g}")
    print()
    _print_probe_table(result, table=False)  # the totals; --json has every spec
    print(f"wrote {result.get('chain') or result.get('diff')} ({len(result['steps'])} batches of up to "
          f"{result['batch_size']}, {result['edits']} edits in effect)")
    return 0


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}"


def _print_metrics(result: dict[str, Any]) -> None:
    """One line per metric: base, edited, difference and its 95% interval."""
    has_base = "base" in result
    head = f"{'evaluator':<16} {'metric':<16} " + (f"{'unedited':>10} {'edited':>10} {'change':>10}  95% CI of change"
                                                   if has_base else f"{'value':>10}  95% CI")
    print(head)
    for ev, metrics in result["metrics"].items():
        for name, value in metrics.items():
            ci = result["ci"].get(ev, {}).get(name)
            ci_text = f"[{_num(ci[0])}, {_num(ci[1])}]" if ci else ""
            if has_base:
                b = result["base"][ev].get(name)
                d = result["delta"][ev].get(name)
                print(f"{ev:<16} {name:<16} {_num(b):>10} {_num(value):>10} {_num(d):>10}  {ci_text}")
            else:
                print(f"{ev:<16} {name:<16} {_num(value):>10}  {ci_text}")
    for ev, protocol in result["protocols"].items():
        print(f"  {ev}: {protocol}")


@distributed_command
def cmd_eval(args: argparse.Namespace) -> int:
    import contextlib

    from .atomic import atomic_write_text
    from .distributed import is_writer
    from .outputs import claimed
    from .workflows import eval_model

    with contextlib.ExitStack() as stack:
        if args.out:
            stack.enter_context(claimed(args.out, inputs=[*args.diff, args.specs], overwrite=args.overwrite))
        result = eval_model(run_config(args), args.diff, args.specs, label=args.label)
        if args.out and is_writer():
            atomic_write_text(args.out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if args.json:
        _print_json(result)
        return 0
    _print_metrics(result)
    if args.out:
        print(f"wrote {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    written = write_report(args.results, args.output, title=args.title)
    for p in written:
        print(f"wrote {p}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .spec import read_specs

    specs = read_specs(args.spec)
    if args.json:
        _print_json({"file": args.spec, "specs": len(specs), "ok": True})
    else:
        print(f"{args.spec}: {len(specs)} edit specs, all valid")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .outputs import claimed
    from .plugins import lookup
    from .spec import import_specs, write_specs

    importer = lookup("spec_importers", args.format).obj()
    with claimed(args.output, inputs=[args.file], overwrite=args.overwrite, flag="-o"):
        records = importer.read(Path(args.file))
        if args.limit is not None:
            records = (r for i, r in enumerate(records) if i < args.limit)
        specs, skipped = import_specs(records, args.skip_invalid)
        if not specs:
            raise InputError(f"{args.file}: no valid records to import")
        n = write_specs(args.output, specs)
    for problem in skipped:
        print(f"skipped {problem}", file=sys.stderr)
    print(f"wrote {n} specs to {args.output}" + (f" ({len(skipped)} invalid records skipped)" if skipped else ""))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .options import schema_listing
    from .plugins import plugin_listing, registry

    if args.command == "plugins":
        _print_json(plugin_listing())
        return 0
    reg = registry(KIND_COMMANDS[args.command])
    if args.command == "architectures":
        _print_json({n: {"mlp_out": r.obj.mlp_out, "transposed": r.obj.transposed, "package": r.package}
                     for n, r in sorted(reg.items())})
        return 0
    out = {}
    for name, r in sorted(reg.items()):
        item: dict[str, Any] = {"package": r.package, "plugin": r.plugin, "doc": (r.obj.__doc__ or "").strip().split("\n")[0]}
        if getattr(r.obj, "description", ""):
            item["doc"] = r.obj.description
        if args.command == "evaluators":
            item["default"] = bool(getattr(r.obj, "default", False))
        if args.options and hasattr(r.obj, "Options"):
            item["options"] = schema_listing(r.obj.Options)
            if getattr(r.obj, "TrainOptions", None) is not None:
                item["train_options"] = schema_listing(r.obj.TrainOptions)  # `kedit train NAME -o KEY VALUE`
            if getattr(r.obj, "primary", None):
                item["primary"] = r.obj.primary
        out[name] = item
    if args.json:
        _print_json(out)
    elif args.options:
        _print_options(out, args.command)
    else:
        width = max([len(i["package"]) for i in out.values()] + [7])
        for name, item in out.items():
            mark = " (default)" if item.get("default") else ""
            print(f"{name:<16} {item['package']:<{width}}  {item['doc']}{mark}")
    return 0


def _print_options(listing: dict[str, Any], command: str) -> None:
    """``kedit editors --options`` for people: per plugin its line, then one row per option
    (name, type, default, the first sentence of its description); ``--json`` has everything."""
    import shutil
    import textwrap

    width = shutil.get_terminal_size((100, 20)).columns
    for name, item in listing.items():
        print("\n".join(textwrap.wrap(f"{name} ({item['package']}): {item['doc']}", width, subsequent_indent="    ")))
        for title, key in (("options", "options"), ("training options (`kedit train`)", "train_options")):
            opts = item.get(key)
            if not opts:
                continue
            if key == "train_options":
                print(f"  {title}:")
            rows = [(k, str(o["type"] or ""), "required" if o["required"] else _show_default(o["default"]),
                     _first_sentence(o["description"]) + (f" (one of {', '.join(map(str, o['choices']))})"
                                                          if o.get("choices") else ""))
                    for k, o in opts.items()]
            w = [max(len(r[i]) for r in rows + [("option", "type", "default", "")]) for i in range(3)]
            indent = 2 + w[0] + w[1] + w[2] + 6
            for r in rows:
                marker = " *" if item.get("primary") == r[0] and key == "options" else ""
                text = textwrap.wrap(r[3] + marker, max(30, width - indent)) or [""]
                print(f"  {r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {text[0]}")
                for more in text[1:]:
                    print(" " * indent + more)
        print()
    print(f"(* the primary option, set by NAME:VALUE; `kedit {command} --options --json` gives the full schema)"
          if any(i.get("primary") for i in listing.values()) else
          f"(`kedit {command} --options --json` gives the full schema)")


def _show_default(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:23] + "…"


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    for end in (". ", "; "):
        if end in text:
            return text[: text.index(end) + 1].rstrip(";") if end == ". " else text[: text.index(end)]
    return text


def cmd_keys(args: argparse.Namespace) -> int:
    """``diff keygen`` and ``diff sign``: torch-free, like ``diff show``."""
    from . import signing

    if args.action == "keygen":
        if len(args.diffs) != 1 or args.key:
            raise InputError("diff keygen takes one argument, the private key file to make: "
                             "kedit diff keygen KEY.pem [--name NAME]")
        kid, pub = signing.generate(args.diffs[0], args.name or "")
        print(f"wrote {args.diffs[0]} (private key, mode 0600: keep it to yourself) and {pub} (public key: share it)")
        print(f"key id {kid}")
        return 0
    if not args.key:
        raise InputError("diff sign needs --key KEY.pem (a private key file; make one with `kedit diff keygen KEY.pem`)")
    signer = signing.load_signer(args.key, args.name)
    for p in args.diffs:
        rec = signing.sign_file(p, signer)
        print(f"{p}: {signing.describe(rec)}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    if args.action in ("keygen", "sign"):
        return cmd_keys(args)
    if args.key:
        raise InputError("--key goes with `kedit diff sign` and `kedit diff keygen`")
    if args.action == "show":  # the manifest, id and signatures are checked from the file's bytes: no torch
        from .manifest import read_parsed, summary

        for p in args.diffs:
            parsed = read_parsed(p)
            if args.json:
                _print_json({**parsed.manifest, "signatures": parsed.signatures} if parsed.signatures
                            else parsed.manifest)
            else:
                print(f"{p}\n{summary(parsed.manifest, parsed.signatures)}")
        return 0
    from . import workflows as wf
    from .signing import Trust, describe

    trust = Trust.load(args.trusted_keys, args.require_signature)
    if args.action == "verify":
        results = wf.verify(args.diffs, args.model, trust, dtype=args.dtype)
        if args.json:
            _print_json(results)
        elif any(r["independent"] for r in results):
            print(f"these {len(results)} diffs are not one chain (none names another as its parent): each is verified "
                  "against the model on its own; to apply several, squash or apply them one after another with --after")
        for r in results:
            if not args.json:
                print(f"{r['diff']}: {r['status']}" + (f" — {r['reason']}" if "reason" in r else ""))
                for s in r["signatures"]:
                    print(f"  {describe(s)}")
        return 1 if any(r["status"] == "refused" for r in results) else 0
    if args.action == "squash":
        if not args.output:
            raise InputError("diff squash needs -o OUT.kedit.safetensors")
        d = wf.squash(args.diffs, args.output, args.model, trust, args.overwrite, dtype=args.dtype)
        print(f"wrote {args.output} ({d.id}); max |squashed − chain| = {d.manifest['squash_max_abs_vs_chain']:.3g}")
        return 0
    if args.edit:
        if args.action != "revert" or len(args.diffs) != 1:
            raise InputError("--edit ID goes with `kedit diff revert --edit ID CHAIN` (one chain folder)")
        r = wf.remove_from_chain(args.diffs[0], args.edit, run_config(args))
        if args.json:
            _print_json(r)
        else:
            print(f"removed {', '.join(r['removes'])}: appended step {r['step']} ({r['id']}) to {r['chain']}; "
                  f"{r['edits']} edits in effect")
        return 0
    if not args.out:
        raise InputError(f"diff {args.action} needs --out DIR")
    if (args.format != "folder" or args.svd_rank) and args.action != "export":
        raise InputError("--format and --svd-rank go with `kedit diff export`")
    if args.format == "peft":
        info = wf.export_peft(args.diffs, args.out, args.model, args.overwrite, trust, args.svd_rank)
        if args.json:
            _print_json(info)
            return 0
        for path, m in info["modules"].items():
            print(f"{path}: rank {m['rank']}" + ("" if m["exact"] else
                                                 f" (SVD, relative error {m['svd_relative_error']:.3g})"))
        print(f"wrote {args.out} (PEFT LoRA adapter: PeftModel.from_pretrained(base, {str(args.out)!r}))")
        return 0
    if args.svd_rank:
        raise InputError("--svd-rank goes with --format peft")
    if args.action == "revert":
        statuses = wf.revert_in_folder(args.diffs, args.out, args.model, args.overwrite, trust, dtype=args.dtype)
    else:
        statuses = wf.apply_to_folder(args.diffs, args.out, args.model, args.overwrite, card=args.action == "export",
                                      trust=trust, dtype=args.dtype, max_shard_size=args.max_shard_size)
    for p, st in zip(args.diffs if args.action != "revert" else reversed(args.diffs), statuses):
        print(f"{p}: {st}")
    print(f"wrote {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .models import load
    from .options import parse_pairs
    from .training import train

    config = run_config(args)
    loaded = load(config.model, progress=config.progress(), **config.placement())
    result = train(args.editor, args.data, args.out, loaded, parse_pairs(args.option), importer=args.importer,
                   seed=args.seed, overwrite=args.overwrite, progress=config.progress())
    if args.json:
        _print_json(result)
        return 0
    report = result["report"]
    print(f"wrote {result['artifact']} (sha256 {result['sha256'][:12]}…; {result['data']['records']} training "
          f"records, {result['seconds']:.0f} s" + (f", resumed at step {result['resumed_at']}" if result["resumed_at"]
                                                   else "") + ")")
    for key, value in report.get("validation", {}).items():
        print(f"validation {key}: {value:.4g}" if isinstance(value, float) else f"validation {key}: {value}")
    return 0


@distributed_command
def cmd_stats(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from . import distributed
    from .config import StatsConfig
    from .models import load
    from .stats import parse_layers

    if not args.layers:
        raise InputError("stats compute needs --layers, e.g. --layers 3,4,5,6,7 (all layers at once is rarely wanted)")
    config = replace(run_config(args), stats=StatsConfig(args.corpus, args.tokens, args.max_len, args.batch_size))
    model, tok, _ = load(config.model, progress=config.progress(), **config.placement())
    stats = config.stats_provider()
    stats.second_moment(model, tok, parse_layers(args.layers, model.config))
    if not distributed.is_writer():
        return 0
    if args.json:
        _print_json({"layers": {str(k): v for k, v in stats.last.items()}, "record": stats.record()})
        return 0
    print(f"{'layer':>5} {'d_k':>6} {'tokens':>9} {'seconds':>8}  {'source':<8} cache file")
    for layer, info in stats.last.items():
        print(f"{layer:>5} {info['d_k']:>6} {info['tokens']:>9} {info['seconds']:>8.1f}  {info['source']:<8} {info['file']}")
    return 0


DIFF_HELP = """\
actions:
  show DIFF...                       the manifest, checked from the file's bytes, and its signatures
  verify DIFF... [--model M]         applies / already applied / refused, and who signed each diff
  apply|export DIFF... --out DIR     apply a chain and save a from_pretrained folder
  revert DIFF... --model DIR --out DIR2
  squash DIFF... -o OUT              one diff equal to the chain
  keygen KEY.pem [--name NAME]       make an ed25519 key pair: KEY.pem (private, mode 0600; encrypted
                                     with $KEDIT_KEY_PASSPHRASE when set) and KEY.pem.pub (share this)
  sign DIFF... --key KEY.pem [--name NAME]
                                     add (or renew) your signature; tensors and id are unchanged

Every signature present is verified whenever a diff is read: a bad one is refused (exit 2).
--trusted-keys FILE_OR_DIR marks which signers you trust; with --require-signature, verify,
apply, revert, squash and export refuse diffs that no trusted key signed. Private keys are only
read to sign; they never go into diffs or output.
"""


def _placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu (default), cuda, cuda:N or auto (CUDA when there is one)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the model's weights (default float32); solves stay float64, deltas float32, and "
                   "a diff records the dtype it was computed against")
    p.add_argument("--device-map", choices=["auto"], help="spread a model too large for one device over all of them "
                   "(accelerate); placement then ignores --device")


def _nproc_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--nproc", type=positive_int, default=1,
                   help=f"processes (torch.distributed; gloo on the CPU, nccl on CUDA, one GPU per process): {what}; "
                   "rank 0 alone writes and prints (also under `torchrun --nproc-per-node N -m kedit …`)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .plugins import extend_cli

    parser = _Parser(prog="kedit", description="Edit facts in a causal LM and share the edit as a verifiable diff.")
    parser.add_argument("--version", action="version", version=f"kedit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("apply", help="edit a model with a JSONL spec file and write a diff")
    p.add_argument("spec", help="edit spec file (JSONL)")
    p.add_argument("--plugin", help="editor name (see `kedit editors`); required unless --continue")
    p.add_argument("--reg", action="append", default=[], metavar="NAME[:VALUE|:K=V,...]",
                   help="regularizer applied to the deltas; repeat for a chain")
    p.add_argument("--reg-in-loop", action="store_true",
                   help="editors that solve layer by layer (memit, alphaedit, emmet, nse) apply the regularizers "
                   "to each layer's delta before solving the next, so later layers make up for what they remove "
                   "(default: regularize the finished deltas, as the RECT paper does)")
    p.add_argument("-o", "--option", nargs=2, action="append", metavar=("KEY", "VALUE"),
                   help="editor option (see `kedit editors --options`); VALUE is JSON or a plain string")
    p.add_argument("--model", help="Hub id, model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", help="diff path (default: checkpoints/SPEC-EDITOR-ID.kedit.safetensors); "
                   "sequential: the chain folder (default: checkpoints/SPEC-EDITOR-seq)")
    p.add_argument("--corpus", help="text for the key statistics of the locate-then-edit editors: a .txt file, "
                   ".json/.jsonl with a text field, hf:NAME (online), builtin (the default: CIA World Factbook "
                   "prose shipped with kedit) or sampled (text sampled from the model; minutes on a CPU)")
    p.add_argument("--stats-tokens", type=positive_int, help="token budget of the key statistics "
                   "(default: 20,000 of the built-in corpus or of sampled text, 100,000 of a --corpus file; "
                   "--mode sequential: all of the built-in corpus, up to 600,000)")
    p.add_argument("--after", action="append", default=[], metavar="DIFF",
                   help="apply these diffs (a chain, in order) first; the new diff continues the chain")
    p.add_argument("--seed", type=seed_int, default=0, help="seed for every random choice (recorded in the diff)")
    p.add_argument("--mode", choices=["batch", "sequential"], default="batch",
                   help="batch: all specs in one edit (one diff); sequential: consecutive batches, each computed "
                   "on the model the previous ones left, written as a chain folder (default: batch)")
    p.add_argument("--batch-size", type=positive_int, help="sequential: specs per batch (default 1: instance-sequential)")
    p.add_argument("--squash", action="store_true", help="sequential: write one diff instead of a chain folder")
    p.add_argument("--continue", dest="continue_chain", metavar="CHAIN",
                   help="continue a chain folder with the specs it does not hold yet (same editor, options, "
                   "regularizers and batch size; an interrupted run resumes)")
    p.add_argument("--eval-at", action="append", default=[], metavar="WHEN",
                   help="sequential: when --eval runs: immediate (each batch's specs after it), final (all "
                   "specs after the last batch), every:N (all specs so far every N edits); comma-separated; "
                   "default final")
    p.add_argument("--eval", action="append", default=[], metavar="NAME[,NAME...]",
                   help="evaluators run before and after the edit (see `kedit evaluators`); "
                   "NAME:VALUE sets the primary option, NAME:K=V,K2=V2 several")
    p.add_argument("--data", action="append", default=[], metavar="PATH",
                   help="data file or folder for evaluators that read one (see `kedit evaluators --options`)")
    p.add_argument("--no-cache", action="store_true", help="recompute the unedited model's evaluation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out diff (never an input)")
    p.add_argument("--json", action="store_true", help="print machine-readable results (progress stays on stderr)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    _placement_args(p)
    _nproc_arg(p, "key statistics, the target values of a batch edit (by chunks of v_chunk requests) and the "
               "evaluation's scoring split over them, with the one-process diff as the result")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("eval", help="run evaluators on a model, with diffs applied and without")
    p.add_argument("--model", help="Hub id, model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--diff", action="append", default=[], metavar="DIFF",
                   help="diff to apply (repeat for a chain, in order); the unedited model is evaluated too")
    p.add_argument("--evaluator", action="append", default=[], metavar="NAME[:OPTIONS]",
                   help="evaluator to run (repeatable; default with specs: the evaluators marked default in "
                   "`kedit evaluators`)")
    p.add_argument("--data", action="append", default=[], metavar="PATH",
                   help="data for evaluators that read a file or folder; with several, each evaluator takes the "
                   "one of the kind it declares (a file or a folder)")
    p.add_argument("--specs", help="edit specs to evaluate on (default: the specs the diffs record)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of every sample drawn (recorded)")
    p.add_argument("--label", help="name of this run in reports (default: the diffs' editors)")
    p.add_argument("--out", help="also write the JSON result to this file (input of `kedit report`)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--no-cache", action="store_true", help="recompute the unedited model's evaluation")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    _placement_args(p)
    _nproc_arg(p, "the scorer's batches and perplexity's windows split over them, the numbers one process's")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="Markdown/HTML report with tables and PNG plots from result JSON files")
    p.add_argument("results", nargs="+", help="JSON files from `kedit eval --out/--json`, `kedit apply --json` or the benches")
    p.add_argument("-o", "--output", required=True, help="folder to write (index.md, index.html, *.png)")
    p.add_argument("--title", default="kedit evaluation report")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("check", help="validate a spec file, reporting problems by line and field")
    p.add_argument("spec")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("import", help="convert a public data set (e.g. counterfact, zsre) to a spec file")
    p.add_argument("format", help="importer name (see `kedit importers`)")
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True, help="spec file to write (JSONL)")
    p.add_argument("--limit", type=positive_int, help="import at most this many records")
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid records (each is reported) instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing -o file (never the input)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("diff", help="show, verify, apply, revert, squash, export or sign diffs",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=DIFF_HELP)
    p.add_argument("action", choices=["show", "verify", "apply", "revert", "squash", "export", "sign", "keygen"])
    p.add_argument("diffs", nargs="+", metavar="DIFF", help="diff file(s); a chain is listed in application order "
                   "(keygen: the key file to make)")
    p.add_argument("--model", help="model to check or change (default: the embedded model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="apply, export: the dtype of the folder written (the chain itself applies in the dtype it "
                   "was computed against); verify, revert, squash: load the model in this dtype (default: the dtype "
                   "the first diff was computed against)")
    p.add_argument("--max-shard-size", metavar="SIZE", help="apply, export: shard the weights as save_pretrained "
                   "does, e.g. 2GB (default: transformers' own)")
    p.add_argument("--out", help="apply/revert/export: folder to write (loadable with from_pretrained)")
    p.add_argument("--format", choices=["folder", "peft"], default="folder",
                   help="export: a from_pretrained folder of the edited model (default), or a PEFT LoRA adapter "
                   "of low-rank diffs (needs the peft extra to load; `PeftModel.from_pretrained(base, OUT)`)")
    p.add_argument("--svd-rank", type=positive_int, metavar="R",
                   help="export --format peft: approximate deltas that are not low-rank (ft, kn, RECT) by their "
                   "top R singular directions; the relative error is recorded per module")
    p.add_argument("-o", "--output", help="squash: the diff file to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder (apply, revert, export) or an existing -o diff (squash)")
    p.add_argument("--edit", action="append", default=[], metavar="ID",
                   help="revert: take this edit (spec id) out of a chain folder as if it had never been made, "
                   "by appending a step (editors that keep per-edit sums: d4s with -o keys base -o residual once); repeatable")
    p.add_argument("--key", metavar="KEY.pem", help="sign: the private key file (PEM, ed25519; from keygen)")
    p.add_argument("--name", help="keygen, sign: the signer's name, recorded in KEY.pem.pub and in signatures "
                   "(sign defaults to the name in KEY.pem.pub)")
    p.add_argument("--trusted-keys", metavar="FILE_OR_DIR",
                   help="public keys (PEM, or 'ed25519:ID [NAME]' lines, as in the .pub files keygen writes) "
                   "whose signatures are trusted")
    p.add_argument("--require-signature", action="store_true",
                   help="refuse diffs that no key of --trusted-keys signed")
    p.add_argument("--json", action="store_true", help="machine-readable output; show: the manifest, plus the "
                   "verified \"signatures\" of a signed diff")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("train", help="train what an editor needs first (MEND's hypernetwork) and write the artifact")
    p.add_argument("editor", help="a trainable editor (e.g. mend)")
    p.add_argument("--data", required=True, help="training records: a spec file (JSONL) or, with --importer, "
                   "a public data set's file")
    p.add_argument("--importer", help="read --data with this spec importer (e.g. zsre; see `kedit importers`)")
    p.add_argument("--out", required=True, help="the artifact (.safetensors); an interrupted run keeps its "
                   "checkpoint in OUT.partial/ and the same command continues it")
    p.add_argument("-o", "--option", nargs=2, action="append", metavar=("KEY", "VALUE"),
                   help="training option (see `kedit editors --options`)")
    p.add_argument("--model", help="Hub id, model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the initialisation and the data order")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out artifact")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    _placement_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("stats", help="compute and cache key statistics (C0 = E[k kᵀ]) for locate-then-edit editors")
    p.add_argument("action", choices=["compute"])
    p.add_argument("--model", help="Hub id, model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--corpus", help=".txt, .json or .jsonl file (records with \"text\"), hf:NAME[:CONFIG], "
                   "builtin (the default) or sampled (text sampled from the model)")
    p.add_argument("--layers", help="comma-separated layer indices, e.g. 3,4,5,6,7 (required)")
    p.add_argument("--tokens", type=positive_int, help="token budget (default: 20,000 of the built-in corpus or of "
                   "sampled text, 100,000 of a file)")
    p.add_argument("--max-len", type=positive_int, help="tokens per packed row (default: 256, or the model's context)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="rows per forward batch (default: 16)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the model-sampled corpus")
    _nproc_arg(p, "each takes a disjoint share of the corpus and the float64 sums are all-reduced, so the "
               "result and its cache entry are one process's")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    _placement_args(p)
    p.set_defaults(func=cmd_stats)

    for name in ["plugins", *KIND_COMMANDS]:
        p = sub.add_parser(name, help=f"list installed {name}" + (" as JSON" if name == "plugins" else ""))
        p.add_argument("--options", action="store_true", help="include each one's option schema")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_list)

    extend_cli(sub)
    return parser


def tune_runtime() -> None:
    """Settings read when torch loads, so they only take effect before it is imported (the
    command line, the benches). Large CPU tensors on transparent huge pages: first touches of
    fresh memory cost about 5x less, which is several seconds per batched edit. OpenMP threads
    that wait spin only briefly before they sleep (libgomp's default is 300,000 spins): when
    another process shares the cores, spinning threads steal each other's time slices, and the
    small-op loops of an edit ran 6-20x slower than alone; with a short spin about 2x. On a
    quiet machine the cost is within run-to-run noise, at most about a quarter of the v* loop's
    time (bench/first_run.py)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # libgomp, which torch's CPU wheels use
        os.environ.setdefault("KMP_BLOCKTIME", "1")  # Intel's OpenMP runtime, in other builds (ms)


def main(argv: Sequence[str] | None = None) -> int:
    tune_runtime()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]  # for a command that relaunches itself
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"kedit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeditError as exc:
        print(f"kedit: failed: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kedit: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
