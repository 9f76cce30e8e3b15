"""``python -m rlhf_exp.data check [overrides...]``: preference-data quality (docs/data-check.md).

Exit status: 0 the data passed (warnings allowed), 1 a check failed (schema errors, empty fields, identical
pairs; with ``--strict`` warnings too), 2 bad arguments or config (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys

PROG = "python -m rlhf_exp.data"
EXIT_FAILED, EXIT_USAGE = 1, 2

DESCRIPTION = """Check the preference pairs a config names: schema, empty fields, identical pairs, duplicates,
length distributions and truncation at phase.max_length, and annotator agreement (percent agreement, Cohen's
and Fleiss' kappa) when rows carry several annotators' labels. Overrides are the main CLI's (data=..., model=...
for the tokenizer, phase=rm|dpo for the length rule; default phase=rm)."""

EPILOG = """examples:
  python -m rlhf_exp.data check data=synthetic data.synthetic.num_annotators=3
  python -m rlhf_exp.data check data=jsonl data.train_file=pairs.jsonl --no-tokenizer
  python -m rlhf_exp.data check data=hh_rlhf data.path=/data/hh/train.jsonl.gz model=local model.path=/m phase=dpo

exit status: 0 passed (warnings allowed), 1 a check failed (schema, empty, identical; warnings too with
--strict), 2 bad arguments or config. See docs/data-check.md."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2
        print(f"{PROG}: error: {message} (see {PROG} check --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog=PROG, description="Data tools of rlhf_exp.")
    sub = top.add_subparsers(dest="command", metavar="check", parser_class=_Parser)
    check = sub.add_parser("check", help="check the quality of a config's preference data", description=DESCRIPTION,
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("overrides", nargs="*", help="config overrides, as for python -m rlhf_exp")
    check.add_argument("--json", metavar="PATH", help="also write the whole report as JSON to PATH ('-': stdout, "
                                                      "instead of the text)")
    check.add_argument("--strict", action="store_true", help="warnings fail the check too (exit 1)")
    check.add_argument("--no-tokenizer", action="store_true",
                       help="measure lengths in characters without loading the model's tokenizer (no truncation count)")
    check.add_argument("--limit", type=int, metavar="N", help="read only the first N rows of each split")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command != "check":
        parser().error("give a command: check")
    if args.limit is not None and args.limit < 1:
        _fail(f"--limit {args.limit}: must be a positive number of rows")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        _fail(f"{bad[0]!r} is not an override (key=value), e.g. data=synthetic")

    from omegaconf import OmegaConf

    from rlhf_exp.cli import _phase_choice, compose
    from rlhf_exp.config.errors import ConfigError
    from rlhf_exp.data.check import PHASES, load_tokenizer_for, render, run_checks

    overrides = list(args.overrides)
    phase = _phase_choice(overrides)
    if phase is None:
        overrides.append("phase=rm")
    elif phase not in PHASES:
        _fail(f"phase={phase}: data check reads preference pairs as RM or DPO uses them: phase=rm or phase=dpo")
    try:
        cfg = compose(overrides)
        from rlhf_exp.config.validate import _synthetic_errors
        from rlhf_exp.data.sources import check_data_files

        check_data_files(cfg.data)
        if cfg.data.source == "synthetic":
            errors = _synthetic_errors(cfg)
            if errors:
                raise ConfigError(errors[0])
        try:
            typed = OmegaConf.to_object(cfg)
        except Exception as exc:  # a mandatory value left unset, a wrong type
            raise ConfigError(str(exc).splitlines()[0]) from exc
        tokenizer = None if args.no_tokenizer else load_tokenizer_for(typed)
        report = run_checks(typed, tokenizer, args.limit)
    except ConfigError as exc:
        _fail(str(exc).replace("\n", " "))
    if tokenizer is None and not args.no_tokenizer:
        report["note"] = (f"model={typed.model.name}'s tokenizer only reads the embedded task: lengths in characters, "
                          f"no truncation count (give model=... for tokens)")
    text = json.dumps(report, indent=2, ensure_ascii=False, default=str)
    if args.json == "-":
        print(text)
    else:
        print(render(report) + (f"\nnote: {report['note']}" if report.get("note") else ""))
        if args.json:
            from pathlib import Path

            Path(args.json).write_text(text + "\n")
    if report["failed"] or (args.strict and report["warned"]):
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
