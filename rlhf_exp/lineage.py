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

from rlhf_exp.tracking.lineage import find_runs, load_manifest, read_manifest, scan_runs


def lookup(ref: str, root: str) -> dict | None:
    path = Path(ref)
    if path.is_dir():
        return read_manifest(path)
    return next((m for m in find_runs(root) if m.get("run_id") == ref), None)


def find(ref: str, root: str) -> tuple[dict | None, str | None]:
    """(the run's manifest, None), or (None, why it was not found: one line, naming --root where that helps)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        manifest, problem = load_manifest(path)
        if manifest is not None:
            return manifest, None
        return None, (f"{ref}: its manifest.json {problem}" if problem
                      else f"{ref} is a folder without manifest.json (not a run folder)")
    runs, unreadable = scan_runs(root)
    matches = [m for m in runs if m.get("run_id") == ref]
    if len(matches) > 1:
        return None, f"{ref} names {len(matches)} runs under {root}/: {', '.join(m['path'] for m in matches)}; give the folder"
    if matches:
        return matches[0], None
    problem = next((f"{ref} is unreadable: {file} {why}" for file, why in unreadable if file.parent.name == ref), None)
    if problem:
        return None, problem
    return None, (f"{ref} is neither a run folder nor a run id under {root}/; for a run under another output_root, "
                  f"give its folder or add --root <that output_root>")


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
    manifest, problem = find(args.run, args.root)
    if manifest is None:
        print(f"rlhf_exp.lineage: error: {problem}", file=sys.stderr)
        return 2
    print("\n".join(lines(manifest, args.root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
