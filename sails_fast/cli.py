"""`sails-fast`: the SAILS pipeline from the command line.

    sails-fast demo                                   the whole pipeline offline on the embedded model
    sails-fast config > my.json                       the default run config, to edit
    sails-fast run --config my.json --out runs/x      every step (artifacts reused when their config matches)
    sails-fast stats|select|subspace|init|train ...   the pipeline up to that step
    sails-fast eval runs/x [--judge PATH]             evaluate a run directory
    sails-fast report runs/x                          write its HTML report
    sails-fast compare --config cmp.json --out runs/c SAILS vs baselines over seeds (CSV + plots)
    sails-fast compare --print-config                 the default comparison config, to edit
    sails-fast plan --config my.json [--model PATH]   predicted peak memory of each step (16 / 24 GiB fits)

`--model` takes a local folder or a hub id; `--sae` takes `[LAYER=]SPEC` where SPEC is a local SAELens
directory or a SAELens "release/sae_id" (repeat it for several layers). Each command writes its resolved
config to `<out>/config.json`.

Under torchrun / `accelerate launch` (WORLD_SIZE > 1) `run`, the step commands, `eval` and `compare` start
a torch.distributed process group and split their work over the ranks (docs/distributed.md); errors are
one line on every rank, prefixed with the rank.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sails_fast.pipeline.summary import print_summary

STEP_COMMANDS = ("stats", "select", "subspace", "init", "train")


def _parse_sae(specs: list[str], layers: tuple[int, ...]) -> dict:
    """['12=path', ...] or one bare 'path' (with exactly one configured layer) -> SAEConfig overrides."""
    mapping = {}
    for spec in specs:
        layer, sep, rest = spec.partition("=")
        if sep and layer.strip().isdigit():
            mapping[str(int(layer))] = rest
        elif len(specs) == 1 and len(layers) == 1:
            mapping[str(layers[0])] = spec
        else:
            raise ValueError(
                "--sae: expected LAYER=SPEC (e.g. 12=./my_sae), or one bare SPEC with exactly one "
                f"configured layer; got {spec!r} with layers {list(layers)}"
            )
    return {"source": "specs", "layers": sorted(int(k) for k in mapping), "specs": mapping}


def build_config(args: argparse.Namespace):
    from sails_fast.core.config import read_config_file
    from sails_fast.pipeline.config import RunConfig

    data = (
        read_config_file(args.config, "--config: cannot read a run config")
        if getattr(args, "config", None)
        else {}
    )
    if not isinstance(data, dict):
        raise ValueError(f"--config: {args.config} must hold a JSON (or YAML) object of config sections")
    if getattr(args, "model", None):
        data.setdefault("model", {})["path"] = args.model
    config = RunConfig.from_dict(data)
    if getattr(args, "sae", None):
        sae = {**config.sae.to_dict(), **_parse_sae(args.sae, config.sae.layers)}
        config = RunConfig.from_dict({**config.to_dict(), "sae": sae})
    return config


def cmd_config(args: argparse.Namespace) -> int:
    from sails_fast.pipeline.run import config_schema

    print(json.dumps(config_schema(), indent=2, sort_keys=True))
    return 0


def cmd_run(args: argparse.Namespace, until: str = "report") -> int:
    from sails_fast.pipeline.run import run_pipeline

    config = build_config(args)
    result = run_pipeline(
        config, args.out, until=until, force=args.force, judge=getattr(args, "judge", None),
        from_step=getattr(args, "from_step", None),
    )  # fmt: skip
    print_summary(result)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from sails_fast.pipeline.config import RunConfig
    from sails_fast.pipeline.run import CONFIG_FILE, run_pipeline

    run_dir = Path(args.run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ValueError(
            f"run_dir: {run_dir} holds no {CONFIG_FILE}; expected a run directory made by `sails-fast run`"
        )
    config = RunConfig.load(run_dir / CONFIG_FILE)
    # --force re-evaluates (everything before it is reused when unchanged)
    result = run_pipeline(
        config, run_dir, until="eval", judge=args.judge, from_step="eval" if args.force else None
    )
    print_summary(result)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from sails_fast.core import distributed
    from sails_fast.report.html import report

    path = distributed.on_main(lambda: report(Path(args.run_dir)))  # one writer
    if distributed.is_main():
        print(f"report: {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sails_fast.pipeline.demo import run_demo

    run_demo(out_dir=args.out, force=args.force, quick=args.quick)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from sails_fast.study.compare import run_compare
    from sails_fast.study.compare_config import CompareConfig
    from sails_fast.study.compare_outputs import format_summary, summarize

    if args.print_config:
        print(json.dumps(CompareConfig().to_dict(), indent=2, sort_keys=True))
        return 0
    if not args.config or not args.out:
        raise ValueError("compare: expected --config FILE and --out DIR (or --print-config)")
    config = CompareConfig.load(args.config)
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError as err:
            raise ValueError(f"--seeds: expected comma-separated ints, got {args.seeds!r}") from err
        config = CompareConfig.from_dict({**config.to_dict(), "seeds": seeds})
    if args.judge:
        config = CompareConfig.from_dict({**config.to_dict(), "judge": args.judge})
    only = args.methods.split(",") if args.methods else None
    result = run_compare(config, args.out, results_dir=args.results, only=only)
    from sails_fast.core import distributed

    if not distributed.is_main():  # one summary, rank 0's
        return 0
    print(format_summary(summarize(result.records)))
    for path in result.files:
        print(f"wrote {path}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sails-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add_run_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="JSON run config (see `sails-fast config`); defaults when omitted")
        p.add_argument("--out", required=True, help="run directory (artifacts, config.json, report)")
        p.add_argument("--model", help="local model folder or hub id (overrides model.path)")
        p.add_argument("--sae", action="append", help="[LAYER=]SPEC: SAELens directory or release/sae_id")
        p.add_argument("--force", action="store_true", help="recompute steps computed with another config")
        p.add_argument(
            "--from",
            dest="from_step",
            metavar="STEP",
            help="recompute this step and every later one (e.g. stats)",
        )

    sub.add_parser("config", help="print the default run config as JSON").set_defaults(func=cmd_config)
    p = sub.add_parser("run", help="run every step")
    add_run_args(p)
    p.add_argument("--judge", help="local judge model folder for the evaluation (1-5 harm rubric)")
    p.set_defaults(func=cmd_run)
    for step in STEP_COMMANDS:
        p = sub.add_parser(step, help=f"run the pipeline up to '{step}'")
        add_run_args(p)
        p.set_defaults(func=lambda a, s=step: cmd_run(a, until=s))
    p = sub.add_parser("eval", help="evaluate a run directory before/after training")
    p.add_argument("run_dir")
    p.add_argument("--judge", help="local judge model folder (1-5 harmfulness rubric)")
    p.add_argument(
        "--force", action="store_true", help="evaluate again (earlier steps reused when unchanged)"
    )
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("report", help="write the HTML report of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("compare", help="SAILS against its baselines at equal budgets, over seeds")
    p.add_argument("--config", help="JSON comparison config (see --print-config)")
    p.add_argument("--out", help="working folder (pipeline artifacts, one folder per method and seed)")
    p.add_argument("--results", help="where the CSVs and plots go (default: --out)")
    p.add_argument("--methods", help="comma-separated method names to run (default: all in the config)")
    p.add_argument("--seeds", help="comma-separated seeds (overrides the config's)")
    p.add_argument("--judge", help="local judge model folder scoring each final evaluation (overrides judge)")
    p.add_argument("--print-config", action="store_true", help="print the default comparison config")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser(
        "plan", help="predicted peak device memory of each step, and whether it fits 16 / 24 GiB"
    )
    p.add_argument("--config", help="JSON or YAML run config; defaults when omitted")
    p.add_argument(
        "--model", help="a folder holding the model's config.json (weights not needed), or a hub id"
    )
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="cuda adds context and allocator slack"
    )
    p.add_argument(
        "--sae-latents", type=int, help="latents per SAE (default: from local SAE specs, else 8 x d)"
    )
    p.add_argument(
        "--ranks", type=int, default=1,
        help="processes under torchrun: with sails.train.parallel 'fsdp', training holds 1/N of the base",
    )  # fmt: skip
    p.add_argument(
        "--json", action="store_true", help="the plan as JSON (stats_peak_bytes, train_peak_bytes, ...)"
    )
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("demo", help="the whole pipeline offline on SmolLM2-135M-Instruct (CPU: ~15 min)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="fewer prompts and steps (a smoke run)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def cmd_plan(args: argparse.Namespace) -> int:
    from sails_fast.pipeline.memory import ModelShape, plan_memory

    config = build_config(args)
    shape = ModelShape.from_pretrained(_model_config_path(config.model.path))
    plan = plan_memory(config, shape, device=args.device, sae_latents=args.sae_latents, ranks=args.ranks)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.format())
    return 0


def _model_config_path(path: str) -> Path:
    """Where the model's config.json is: the embedded model's, a local folder's, or the hub cache's."""
    if path == "embedded":
        from sails_fast.models.embedded import embedded_model_path

        return embedded_model_path(verbose=False)
    if Path(path).exists():
        return Path(path)
    if path.startswith(("/", ".", "~")) or path.count("/") != 1:
        raise ValueError(
            f"--model: {path} does not exist (expected a folder holding the model's config.json)"
        )
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json")
    if isinstance(cached, str):
        return Path(cached)
    raise ValueError(
        f"--model: {path} is neither a local folder nor a hub id whose config.json is in the hub cache; "
        "give --model PATH, a folder holding the model's config.json (weights are not needed)"
    )


def _error_line(text: str) -> None:
    # one write per line: ranks share the terminal, and a short write is not interleaved with another's
    sys.stderr.write(text.replace("\n", " ") + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    from sails_fast.core import distributed

    args = make_parser().parse_args(argv)
    try:
        distributed.init_from_env()
        return args.func(args)
    except (ValueError, OSError, distributed.DistributedError) as err:
        # a user's mistake (or a full disk) is one line, never a traceback; on every rank
        where = f"[{distributed.describe()}] " if distributed.active() else ""
        _error_line(f"sails-fast: error: {where}{err}")
        return 2
    except RuntimeError as err:
        if not distributed.active():
            raise
        # a collective that failed: another rank died, or waited past the timeout
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        _error_line(
            f"sails-fast: error: [{distributed.describe()}] a collective with the other ranks failed "
            f"({first}); another rank stopped or hung (see its output; ${distributed.TIMEOUT_ENV} sets "
            "the timeout)"
        )
        return 3
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
