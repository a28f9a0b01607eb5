"""`flux2-server weights import SNAPSHOT DEST` and `weights verify DIR`: what is on disk, and what it can run."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.profiles import PROFILES
from weights.verify import Report, verify

ADAPTERS_DIR = "loras"  # <weights>/loras/<adapter>/, where pipelines' profiles look for their distilled LoRA


def profile_rows(directory: Path, report: Report) -> list[tuple[str, str, str]]:
    """(profile, whether it can run, its distilled adapter's state) for each profile, from the files alone.

    Every profile runs on the base weights; a profile made for a distilled LoRA says whether that LoRA is on
    disk (the server loads what it finds; its /health says what it loaded)."""
    rows = []
    for name, profile in PROFILES.items():
        runs = "yes" if report.ok else "no (base weights unusable)"
        if profile.adapter is None:
            adapter = "none needed"
        elif (directory / ADAPTERS_DIR / profile.adapter).is_dir():
            adapter = f"{profile.adapter!r} on disk"
        else:
            adapter = (
                f"{profile.adapter!r} not on disk ({ADAPTERS_DIR}/{profile.adapter}/): runs the base weights "
                f"on its {len(profile.sigmas)}-step schedule"
            )
        rows.append((name, runs, adapter))
    return rows


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def print_report(directory: Path) -> bool:
    report = verify(directory)
    print(table(("component", "state"), list(report.components.items())))
    print()
    print(table(("profile", "runs", "distilled adapter"), profile_rows(directory, report)))
    for problem in report.problems:
        print(f"problem: {problem}")
    print("OK" if report.ok else f"NOT USABLE: {len(report.problems)} problem(s)")
    return report.ok


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
        return 1
    checked = len(result.copied) - len(unchecked)
    print(f"copied {len(result.copied)} files; {checked} matched the snapshot's checksums", end="")
    print(f", {len(unchecked)} had none to check against: {', '.join(unchecked)}" if unchecked else "")
    print(f"sha256 of every file: {args.dest / 'SHA256SUMS'}")
    print()
    return 0 if print_report(args.dest) else 1


def add_parsers(weights: argparse._SubParsersAction) -> None:
    verify_parser = weights.add_parser(
        "verify", help="check a weights directory: a table of components and of the profiles it can run"
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
