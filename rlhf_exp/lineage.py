"""``python -m rlhf_exp.lineage <run folder or run id> [--root outputs]``: print a run's chain of parents.

    ppo  2026-..._rlhf_ppo  succeeded  outputs/pipelines/..._rlhf/ppo
    ├─ sft  2026-..._rlhf_sft  succeeded  outputs/pipelines/..._rlhf/sft
    └─ rm   2026-..._rlhf_rm   succeeded  outputs/pipelines/..._rlhf/rm
       └─ sft  ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlhf_exp.tracking.lineage import find_runs, read_manifest


def lookup(ref: str, root: str) -> dict | None:
    path = Path(ref)
    if path.is_dir():
        return read_manifest(path)
    return next((m for m in find_runs(root) if m.get("run_id") == ref), None)


def lines(manifest: dict, root: str, prefix: str = "", last: bool = True, top: bool = True) -> list[str]:
    branch = "" if top else ("└─ " if last else "├─ ")
    out = [f"{prefix}{branch}{manifest.get('phase', '?'):<4} {manifest.get('run_id')}  "
           f"{manifest.get('status')}  {manifest.get('path')}"]
    parents = manifest.get("parents") or []
    child_prefix = prefix if top else prefix + ("   " if last else "│  ")
    for i, parent in enumerate(parents):
        found = lookup(parent.get("path") or parent["run_id"], root)
        if found is None:
            found = {**parent, "status": "missing", "path": parent.get("path")}
        out += lines(found, root, child_prefix, i == len(parents) - 1, top=False)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_exp.lineage", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder or run id")
    parser.add_argument("--root", default="outputs", help="where to look up run ids (default: outputs)")
    args = parser.parse_args(argv)
    manifest = lookup(args.run, args.root)
    if manifest is None:
        print(f"rlhf_exp.lineage: error: {args.run} is neither a run folder nor a run id under {args.root}/",
              file=sys.stderr)
        return 2
    print("\n".join(lines(manifest, args.root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
