"""`flux2-server weights import SNAPSHOT DEST` (then `weights verify DEST`, whose report is server.cli's)."""

from __future__ import annotations

import argparse
from pathlib import Path

from weights.layout import SAFETY_CHECKER_DIR


def print_report(directory: Path) -> bool:
    """`weights verify`'s report (components, adapters, which profiles can run, the safety checker)."""
    return cmd_weights_verify(argparse.Namespace(directory=directory)) == 0


def cmd_weights_verify(args: argparse.Namespace) -> int:
    from pipelines.profiles import PROFILES
    from weights.verify import verify

    report = verify(args.directory)
    if not Path(args.directory).is_dir():  # nothing to list: say what is wrong and stop
        print(f"error: {report.problems[0]}")
        print("NOT USABLE: give the folder that holds model_index.json (see `flux2-server weights import`)")
        return 1
    for component, state in report.components.items():
        print(f"{component:14} {state}")
    for adapter, state in report.adapters.items():
        print(f"{'loras/' + adapter:14} {state}")
    for name, profile in PROFILES.items():
        if not report.ok:  # a broken base model runs no profile, with or without its adapter
            can = "can't run: the weights have problems (below)"
        elif profile.adapter is None or report.adapters.get(profile.adapter) == "ok":
            can = "can run" + (f" (distilled adapter {profile.adapter!r})" if profile.adapter else "")
        else:
            can = f"can't run: {report.adapters[profile.adapter]} (or serve with --allow-undistilled)"
        print(f"profile {name:6} {can}")
    checker = Path(args.directory) / SAFETY_CHECKER_DIR
    if (checker / "config.json").is_file():
        print(f"safety checker {checker}")
    else:
        print(
            f"safety checker none at {checker}: enable_safety_checker requests answer 503 unless FLUX2_SAFETY_CHECKER"
        )
        print("               points at one or the checker is turned off (--disable-safety-checker)")
    for problem in report.problems:
        print(f"problem: {problem}")
    print("OK" if report.ok else f"NOT USABLE: {len(report.problems)} problem(s)")
    return 0 if report.ok else 1


def cmd_weights_tiny(args: argparse.Namespace) -> int:
    from weights.tiny import build_tiny

    print(build_tiny(args.directory))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    return 0 if print_report(args.directory) else 1


def cmd_import(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from weights.importer import ChecksumError, import_snapshot, plan_import

    try:
        plan = plan_import(args.snapshot)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}")
        return 2
    files, skipped = plan
    total = sum(f.size for f in files)
    unchecked = [str(f.relative) for f in files if f.expected is None]
    print(f"importing {len(files)} files ({total / 1e9:.2f} GB) from {args.snapshot} into {args.dest}")
    if skipped:
        print(f"left out (not part of the diffusers layout): {', '.join(map(str, skipped))}")
    try:
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="copying") as bar:
            result = import_snapshot(args.snapshot, args.dest, on_bytes=bar.update, plan=plan)
    except ChecksumError as exc:
        print(f"error: checksum mismatch: {exc}")
        print(f"nothing was written at {args.dest}")
        return 1
    except OSError as exc:  # an unreadable file, a full disk, an existing destination
        print(f"error: {exc}")
        print(f"nothing was written at {args.dest}")
        return 1
    checked = len(result.copied) - len(unchecked)
    print(f"copied {len(result.copied)} files; {checked} matched the snapshot's checksums", end="")
    print(f", {len(unchecked)} had none to check against: {', '.join(unchecked)}" if unchecked else "")
    print(f"sha256 of every file: {args.dest / 'SHA256SUMS'}")
    print()
    return 0 if print_report(args.dest) else 1


def add_parsers(weights: argparse._SubParsersAction) -> None:
    verify_parser = weights.add_parser(
        "verify", help="check a weights directory: its components, adapters, and which profiles can run"
    )
    verify_parser.add_argument("directory", type=Path)
    verify_parser.set_defaults(func=cmd_verify)
    importer = weights.add_parser(
        "import",
        help="copy a Hugging Face snapshot into DEST in the diffusers layout, checking checksums, then verify",
    )
    importer.add_argument("snapshot", type=Path, help="snapshots/<revision>/ of the HF cache, or its models--… folder")
    importer.add_argument("dest", type=Path)
    importer.set_defaults(func=cmd_import)
