#!/usr/bin/env python3
"""Changed-block tracking benchmark of Ferry's data mover on a disk image.

A sparse disk image (--size GiB) holds --data GiB in 16 MiB extents at
random places, half random bytes and half text. `ferry volume backup`
backs it up twice into each of two copies of a new local repository, each
tracked step
measured against its baseline in the same run:

  first, whole            every byte read (the baseline of a first backup)
  first, allocated        --allocated-blocks: only the extents are read
  re-backup, whole        after --changes writes of --change-kib KiB (some
                          into the holes), every byte read again (the
                          baseline of a re-backup)
  re-backup, changed      --changed-blocks with the written ranges, the
                          first tracked backup as the parent: only around
                          them

Each tracked backup must store as many new chunks as its baseline (it cut
the same chunks), and the last one is restored and compared with the image
byte for byte. Results (results.json, results.md) go to --out.

Standard library only. Needs a release build of ferry (--ferry).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

MIB = 1 << 20
EXTENT = 16 * MIB


def log(msg: str) -> None:
    print(f"[bench-cbt] {msg}", file=sys.stderr, flush=True)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def make_image(path: Path, size: int, data: int, rng: random.Random) -> list[tuple[int, int]]:
    """A sparse image with `data` bytes in extents; returns the extents."""
    slots = size // EXTENT
    count = min(data // EXTENT, slots)
    chosen = sorted(rng.sample(range(slots), count))
    pool = b"".join(b"row %08d: the quick brown fox jumps over the lazy dog\n" % i for i in range(300_000))
    with open(path, "wb") as f:
        f.truncate(size)
        for n, slot in enumerate(chosen):
            f.seek(slot * EXTENT)
            if n % 2 == 0:
                f.write(os.urandom(EXTENT))
            else:
                start = rng.randrange(0, len(pool) - EXTENT) if len(pool) > EXTENT else 0
                chunk = (pool * (EXTENT // len(pool) + 2))[start:start + EXTENT]
                f.write(chunk)
    return [(slot * EXTENT, EXTENT) for slot in chosen]


def write_changes(path: Path, size: int, extents: list[tuple[int, int]], changes: int,
                  change: int, rng: random.Random) -> list[tuple[int, int]]:
    """Writes `changes` random blocks: three in four into the extents, the
    rest into the holes (a volume filling up). Returns the ranges."""
    ranges = []
    with open(path, "r+b") as f:
        for n in range(changes):
            if n % 4 == 3:
                offset = rng.randrange(0, size - change) // 4096 * 4096
            else:
                start, length = rng.choice(extents)
                offset = start + rng.randrange(0, length - change) // 4096 * 4096
            f.seek(offset)
            f.write(os.urandom(change))
            ranges.append((offset, change))
    return ranges


def ranges_file(path: Path, ranges: list[tuple[int, int]]) -> Path:
    path.write_text("".join(f"{o} {n}\n" for o, n in ranges))
    return path


class Ferry:
    def __init__(self, binary: Path, repo: Path):
        self.binary = binary
        self.repo = repo
        self.env = dict(os.environ, FERRY_PASSWORD="bench-cbt")

    def run(self, *args: str) -> dict:
        cmd = [str(self.binary), *args, "--repo", str(self.repo)]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}")
        return json.loads(out.stdout) if out.stdout.strip().startswith("{") else {}

    def backup(self, image: Path, name: str, *extra: str) -> dict:
        cpu = children_cpu()
        started = time.monotonic()
        result = self.run("volume", "backup", str(image), "--name", name,
                          "--source", "bench-cbt", "-o", "json", *extra)
        result["wallSeconds"] = time.monotonic() - started
        result["cpuSeconds"] = children_cpu() - cpu
        return result


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * MIB):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ferry", type=Path, default=Path("target/release/ferry"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/ferry-cbtbench"))
    parser.add_argument("--out", type=Path, default=Path("target/bench/cbt"))
    parser.add_argument("--size", type=float, default=4.0, help="image size in GiB (default 4)")
    parser.add_argument("--data", type=float, default=1.0, help="GiB of data in it (default 1)")
    parser.add_argument("--changes", type=int, default=64, help="blocks written between backups")
    parser.add_argument("--change-kib", type=int, default=64, help="size of each write in KiB")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    ferry_bin = args.ferry.resolve()
    if not ferry_bin.exists():
        raise SystemExit(f"{ferry_bin} is missing: cargo build --release")
    rng = random.Random(args.seed)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    image = args.work / "disk.img"
    size = int(args.size * 1024) * MIB
    log(f"writing a {args.size} GiB image with {args.data} GiB of data")
    extents = make_image(image, size, int(args.data * 1024) * MIB, rng)
    # Two copies of one new repository (one key, so one chunker seed):
    # each tracked backup stores what its baseline stores and differs only
    # in what it reads.
    whole = Ferry(ferry_bin, args.work / "repo-whole")
    tracked = Ferry(ferry_bin, args.work / "repo-tracked")
    whole.run("repo", "init")
    shutil.copytree(whole.repo, tracked.repo)

    steps: dict[str, dict] = {}

    def step(name: str, result: dict) -> None:
        stats = result["stats"]
        steps[name] = {
            "wallSeconds": round(result["wallSeconds"], 3),
            "cpuSeconds": round(result["cpuSeconds"], 3),
            "bytesRead": stats["bytesRead"],
            "bytesChanged": stats.get("bytesChanged"),
            "bytesStored": stats["bytesStored"],
            "chunksNew": stats["chunksNew"],
            "root": result["root"],
            "snapshot": result.get("snapshot"),
            "warnings": result.get("warnings", []),
        }
        log(f"{name}: {result['wallSeconds']:.2f}s, read {stats['bytesRead'] / MIB:.1f} MiB")

    allocated = ranges_file(args.work / "allocated.txt", extents)
    step("first, whole", whole.backup(image, "disk", "--no-parent"))
    step("first, allocated", tracked.backup(image, "disk", "--allocated-blocks", str(allocated)))

    changed = write_changes(image, size, extents, args.changes, args.change_kib * 1024, rng)
    changes = ranges_file(args.work / "changed.txt", changed)
    step("re-backup, whole", whole.backup(image, "disk"))
    step("re-backup, changed", tracked.backup(image, "disk", "--changed-blocks", str(changes)))

    # The same chunks cut: the same new chunks stored.
    for name, baseline in (("first, allocated", "first, whole"), ("re-backup, changed", "re-backup, whole")):
        if steps[name]["warnings"]:
            raise SystemExit(f"{name}: {steps[name]['warnings']}")
        if steps[name]["chunksNew"] != steps[baseline]["chunksNew"]:
            raise SystemExit(f"{name} stored other chunks than {baseline}: {steps[name]} {steps[baseline]}")

    restored = args.work / "restored.img"
    tracked.run("volume", "restore", steps["re-backup, changed"]["snapshot"], str(restored))
    same = digest(restored) == digest(image)
    if not same:
        raise SystemExit("the restored image differs from the disk image")

    def ratio(tracked: str, whole: str, key: str) -> float:
        return round(steps[whole][key] / max(steps[tracked][key], 1e-9), 2)

    results = {
        "image": {"sizeBytes": size, "dataBytes": sum(n for _, n in extents),
                  "changes": args.changes, "changeBytes": args.change_kib * 1024},
        "ferry": subprocess.run([str(ferry_bin), "--version"], capture_output=True, text=True).stdout.strip(),
        "cpus": os.cpu_count(),
        "steps": steps,
        "speedup": {
            "first": ratio("first, allocated", "first, whole", "wallSeconds"),
            "rebackup": ratio("re-backup, changed", "re-backup, whole", "wallSeconds"),
        },
        "readReduction": {
            "first": ratio("first, allocated", "first, whole", "bytesRead"),
            "rebackup": ratio("re-backup, changed", "re-backup, whole", "bytesRead"),
        },
        "restoredIdentical": same,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Changed-block tracking: a disk image read whole and by ranges",
        "",
        f"Image: {size / (1 << 30):.1f} GiB, {results['image']['dataBytes'] / (1 << 30):.2f} GiB of data in "
        f"16 MiB extents; {args.changes} writes of {args.change_kib} KiB between the backups. "
        f"{results['cpus']} CPUs. `python3 scripts/bench-cbt.py`.",
        "",
        "| step | wall s | CPU s | read MiB | changed MiB | stored MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in steps.items():
        changed_mib = "" if s["bytesChanged"] is None else f"{s['bytesChanged'] / MIB:.1f}"
        lines.append(f"| {name} | {s['wallSeconds']:.2f} | {s['cpuSeconds']:.2f} | "
                     f"{s['bytesRead'] / MIB:.1f} | {changed_mib} | {s['bytesStored'] / MIB:.1f} |")
    lines += [
        "",
        f"First backup by allocated ranges: {results['speedup']['first']}x faster, "
        f"{results['readReduction']['first']}x less read than reading every byte.",
        f"Re-backup by changed ranges: {results['speedup']['rebackup']}x faster, "
        f"{results['readReduction']['rebackup']}x less read than reading every byte.",
        "The restored image is identical to the disk image (SHA-256).",
        "",
    ]
    (args.out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
