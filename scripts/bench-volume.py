#!/usr/bin/env python3
"""scripts/bench-volume.py: Ferry's file-level data mover against restic and kopia.

Generates two deterministic datasets under --work (default /tmp/ferry-volbench):

  small-files  about 1 GiB in about 60,000 files (most of 1-64 KiB, about one
               in 600 of 256 KiB to a few MiB) in a nested tree, half of
               them text-like (compressible), half random bytes;
  large-files  four files of 1 GiB each: random bytes, text, a mix of 8 MiB
               text and random segments, and a sparse file (64 MiB of data at
               each end of a 896 MiB hole).

For each dataset and each tool (ferry, restic, kopia), one tool at a time,
with a fresh local repository: first backup, unchanged re-backup (five runs,
the median one reported), re-backup after changing 10% of the data (one
file in ten partly rewritten; in large-files 10% of each file's data bytes,
in stripes), then a full restore
of the newest snapshot into an empty directory, checked against the source
(every file's size and SHA-256; a difference fails the run). Every tool
command runs under GNU time (/usr/bin/time), whose wait4(2) of the tool
gives its user+system CPU and peak RSS; wall time is taken around it, and
the repository's size (du -sb) after each step.
The page cache is not dropped: every tool starts on the same warm cache
(the source is read once, for its checksum, just before each tool's first
backup), and `sync` runs, untimed, after every step so that no step pays for
the previous one's write-back. Before the restore, the repository's files
(not the tools' own caches) are evicted from the page cache
(posix_fadvise DONTNEED): a restore reads a repository written long before,
and a tool that writes its packs past the cache would otherwise restore from
disk while the others restore from memory.

Also, when the ferry binary offers it (`ferry volume bench` or `ferry volume
limit`), the pipeline limit: chunk+hash+compress+encrypt of the dataset read
into memory, on all cores. Results go to --out (default target/bench/volume):
results.json (every measurement), results.md (tables and targets) and
plot.svg (MiB/s per tool and step).

  scripts/bench --volumes                                   full size (about 5 GiB of data)
  scripts/bench --volumes --small --out /tmp/volsmoke       a tenth of it, a check that it all runs
  scripts/bench --volumes --tools restic,kopia              without ferry
  scripts/bench --volumes --ferry /path/to/ferry            a given ferry binary (no build)
  scripts/bench --volumes --render docs/benchmarks/volume/results.json   tables and plot again

restic and kopia come from scripts/bench-tools.sh (built from their Go
modules and cached). Without --ferry, ferry is target/release/ferry, built
first with `cargo build --release` (skip with --no-build).

Time on 2 cores: about 1.5 minutes with --small, 10-15 with the full datasets.
Disk: the dataset (up to about 3.2 GiB on disk) plus one tool's repository
and restore at a time (up to about 8 GiB with the full large-files dataset).
Needs GNU time (/usr/bin/time, Debian's package `time`).
Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import mmap
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
GIB = 1 << 30
PASSWORD = "ferry-volume-bench"
ALL_TOOLS = ("ferry", "restic", "kopia")
STEPS = ("first", "unchanged", "changed", "restore")
# Runs of the unchanged re-backup per tool; the median one is reported.
UNCHANGED_RUNS = 5
STEP_TITLES = {
    "first": "first backup",
    "unchanged": "unchanged re-backup",
    "changed": "re-backup, 10% changed",
    "restore": "full restore",
}
PLOT_TITLES = {"first": "first backup", "unchanged": "unchanged", "changed": "10% changed", "restore": "restore"}
SEED = "ferry-volume-bench-1"


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[bench-volume {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- datasets


@dataclass
class FileSpec:
    rel: str
    size: int
    kind: str  # text | random | mixed | sparse
    # (offset, length) of the parts that hold data; a sparse file's hole is
    # outside every extent. None: the whole file.
    extents: list[tuple[int, int]] | None = None


@dataclass
class Dataset:
    name: str
    root: Path
    files: list[FileSpec]
    dirs: list[str]
    description: str
    pool: bytes = b""
    change_stripe: int = 10 * MIB  # large-files: one changed region per stripe

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def data_bytes(self) -> int:
        return sum(sum(n for _, n in f.extents) if f.extents else f.size for f in self.files)


def make_vocabulary(rng: random.Random, n: int) -> list[str]:
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "an", "el", "is", "or", "um",
                 "pra", "stu", "gre", "bli", "dro", "fen", "hal", "jor", "kem", "lun", "mar", "nox"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def make_text_pool(seed: str, size: int) -> bytes:
    """Text-like bytes: log lines, JSON documents and prose from a seeded RNG."""
    rng = random.Random(seed + ":text-pool")
    words = make_vocabulary(rng, 2000)
    components = ["api", "db", "scheduler", "cache", "auth", "storage", "worker", "ingress"]
    levels = ["INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"]
    parts: list[str] = []
    n = 0
    while n < size:
        kind = rng.random()
        if kind < 0.5:
            line = (f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:"
                    f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}.{rng.randint(0, 999):03d}Z "
                    f"{rng.choice(levels)} [{rng.choice(components)}] "
                    f"{' '.join(rng.choices(words, k=rng.randint(3, 12)))} "
                    f"request_id={rng.getrandbits(64):016x} latency_ms={rng.randint(0, 5000)}\n")
        elif kind < 0.8:
            doc = {
                "id": rng.randint(0, 10**9),
                "name": rng.choice(words),
                "labels": {rng.choice(words): rng.choice(words) for _ in range(rng.randint(1, 4))},
                "tags": rng.choices(words, k=rng.randint(0, 5)),
                "value": round(rng.random() * 1000, 3),
                "enabled": rng.random() < 0.5,
            }
            line = json.dumps(doc) + "\n"
        else:
            sentences = []
            for _ in range(rng.randint(1, 5)):
                s = " ".join(rng.choices(words, k=rng.randint(5, 18)))
                sentences.append(s[:1].upper() + s[1:] + ".")
            line = " ".join(sentences) + "\n"
        parts.append(line)
        n += len(line)
    return "".join(parts).encode()[:size]


def text_bytes(rng: random.Random, pool: bytes, n: int) -> bytes:
    """n bytes of text: random slices of the pool, so that no two files share chunks."""
    out = []
    have = 0
    limit = len(pool) - 8192
    while have < n:
        o = rng.randrange(limit)
        piece = pool[o:o + rng.randrange(256, 8192)]
        out.append(piece)
        have += len(piece)
    return b"".join(out)[:n]


def random_bytes(rng: random.Random, n: int) -> bytes:
    out = []
    while n > 0:
        k = min(n, 16 * MIB)
        out.append(rng.randbytes(k))
        n -= k
    return b"".join(out)


def small_files_dataset(root: Path, scale: float) -> Dataset:
    rng = random.Random(SEED + ":small-files")
    n_files = int(60000 * scale)
    target = int(GIB * scale)
    # A nested tree: 8 x 8 x up to 24 directories (fewer when scaled down).
    dirs: list[str] = []
    leaf_per = max(2, int(24 * scale))
    for a in range(8):
        da = f"ns-{a:02d}"
        dirs.append(da)
        for b in range(8):
            db = f"{da}/app-{b:02d}"
            dirs.append(db)
            for c in range(rng.randint(leaf_per // 2, leaf_per)):
                dirs.append(f"{db}/vol-{c:02d}")
    n_big = max(1, n_files // 600)
    sizes = [int(math.exp(rng.uniform(math.log(1024), math.log(64 * 1024)))) for _ in range(n_files - n_big)]
    rest = max(target - sum(sizes), n_big * 256 * 1024)
    weights = [math.exp(rng.uniform(0, math.log(24))) for _ in range(n_big)]
    total_w = sum(weights)
    sizes += [max(256 * 1024, int(rest * w / total_w)) for w in weights]
    rng.shuffle(sizes)
    files = []
    for i, size in enumerate(sizes):
        kind = "text" if rng.random() < 0.5 else "random"
        ext = rng.choice([".log", ".json", ".txt"]) if kind == "text" else rng.choice([".bin", ".dat", ".db"])
        files.append(FileSpec(f"{rng.choice(dirs)}/f{i:05d}{ext}", size, kind))
    ds = Dataset("small-files", root, files, dirs, "")
    ds.pool = make_text_pool(SEED + ":small-files", max(2 * MIB, int(8 * MIB * scale)))
    text_share = sum(f.size for f in files if f.kind == "text") / ds.total_bytes
    ds.description = (f"{len(files)} files in {len(dirs)} directories, {ds.total_bytes / MIB:.0f} MiB; "
                      f"{text_share:.0%} of the bytes text-like (compressible), the rest random; "
                      f"sizes 1-64 KiB, {n_big} files of 256 KiB to a few MiB")
    return ds


def large_files_dataset(root: Path, scale: float) -> Dataset:
    size = max(16, int(1024 * scale)) * MIB
    edge = max(1, int(64 * scale)) * MIB
    files = [
        FileSpec("random.bin", size, "random"),
        FileSpec("text.log", size, "text"),
        FileSpec("mixed.img", size, "mixed"),
        FileSpec("sparse.img", size, "sparse", [(0, edge), (size - edge, edge)]),
    ]
    ds = Dataset("large-files", root, files, [], "")
    ds.pool = make_text_pool(SEED + ":large-files", max(4 * MIB, int(16 * MIB * scale)))
    ds.description = (f"4 files, {ds.total_bytes / MIB:.0f} MiB ({ds.data_bytes / MIB:.0f} MiB of data): "
                      f"random.bin (random), text.log (text), mixed.img (8 MiB segments, text or random), "
                      f"sparse.img ({edge // MIB} MiB of data at each end of a {(size - 2 * edge) // MIB} MiB hole)")
    return ds


def file_content(ds: Dataset, spec: FileSpec):
    """Yields (offset, bytes) pieces of the file's data, deterministically."""
    rng = random.Random(f"{SEED}:{ds.name}:{spec.rel}")
    if spec.kind == "text":
        step = 16 * MIB
        for off in range(0, spec.size, step):
            yield off, text_bytes(rng, ds.pool, min(step, spec.size - off))
    elif spec.kind == "random":
        step = 16 * MIB
        for off in range(0, spec.size, step):
            yield off, random_bytes(rng, min(step, spec.size - off))
    elif spec.kind == "mixed":
        seg = 8 * MIB
        for off in range(0, spec.size, seg):
            n = min(seg, spec.size - off)
            yield off, text_bytes(rng, ds.pool, n) if rng.random() < 0.5 else random_bytes(rng, n)
    elif spec.kind == "sparse":
        for off, n in spec.extents or []:
            half = n // 2
            yield off, text_bytes(rng, ds.pool, half)
            yield off + half, random_bytes(rng, n - half)
    else:
        raise ValueError(spec.kind)


def generate(ds: Dataset) -> float:
    t0 = time.perf_counter()
    if ds.root.exists():
        shutil.rmtree(ds.root)
    ds.root.mkdir(parents=True)
    for d in ds.dirs:
        (ds.root / d).mkdir(parents=True, exist_ok=True)
    for spec in ds.files:
        path = ds.root / spec.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for off, data in file_content(ds, spec):
                f.seek(off)
                f.write(data)
            f.truncate(spec.size)
    for spec in ds.files:
        if spec.kind == "sparse":
            st = os.stat(ds.root / spec.rel)
            if st.st_blocks * 512 >= st.st_size:
                log(f"warning: {spec.rel} is not sparse on this file system")
    return time.perf_counter() - t0


# Changing 10% of the data, deterministically, and undoing it.

Undo = list[tuple[Path, int, bytes]]


def change_regions(ds: Dataset) -> list[tuple[FileSpec, int, int]]:
    """The (file, offset, length) regions that the 10% change rewrites."""
    rng = random.Random(f"{SEED}:{ds.name}:change")
    regions = []
    if ds.name == "small-files":
        for i in sorted(rng.sample(range(len(ds.files)), len(ds.files) // 10)):
            spec = ds.files[i]
            n = min(spec.size, max(4096, spec.size // 4))
            regions.append((spec, rng.randrange(spec.size - n + 1), n))
    else:
        # 10% of every extent's bytes, one region per stripe.
        for spec in ds.files:
            for off, length in spec.extents or [(0, spec.size)]:
                stripes = max(1, length // ds.change_stripe)
                stripe = length // stripes
                n = stripe // 10
                for s in range(stripes):
                    regions.append((spec, off + s * stripe + rng.randrange(stripe - n + 1), n))
    return regions


def apply_change(ds: Dataset) -> tuple[Undo, int, int]:
    undo: Undo = []
    changed_files = set()
    changed_bytes = 0
    for spec, off, n in change_regions(ds):
        rng = random.Random(f"{SEED}:{ds.name}:change:{spec.rel}:{off}")
        data = text_bytes(rng, ds.pool, n) if spec.kind == "text" else rng.randbytes(n)
        path = ds.root / spec.rel
        fd = os.open(path, os.O_RDWR)
        try:
            undo.append((path, off, os.pread(fd, n, off)))
            os.pwrite(fd, data, off)
        finally:
            os.close(fd)
        changed_files.add(spec.rel)
        changed_bytes += n
    return undo, len(changed_files), changed_bytes


def revert_change(undo: Undo) -> None:
    for path, off, old in reversed(undo):
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, old, off)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- checksums


def tree_digest(root: Path) -> dict[str, tuple[int, str] | None]:
    """Every file's (size, SHA-256) and every directory (None), by relative path."""
    out: dict[str, tuple[int, str] | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for d in dirnames:
            out[os.path.normpath(os.path.join(rel_dir, d))] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if os.path.islink(path):
                out[rel] = (-1, os.readlink(path))
                continue
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            out[rel] = (os.path.getsize(path), digest)
    return out


def combined(digest: dict[str, tuple[int, str] | None]) -> str:
    h = hashlib.sha256()
    for rel in sorted(digest):
        h.update(f"{rel}\0{digest[rel]}\n".encode())
    return h.hexdigest()


def compare_trees(want: dict, got: dict) -> list[str]:
    problems = []
    for rel in sorted(set(want) | set(got)):
        if rel not in got:
            problems.append(f"missing: {rel}")
        elif rel not in want:
            problems.append(f"unexpected: {rel}")
        elif want[rel] != got[rel]:
            w, g = want[rel], got[rel]
            if w is None or g is None:
                problems.append(f"type differs: {rel}")
            elif w[0] != g[0]:
                problems.append(f"size differs: {rel} ({g[0]} bytes, want {w[0]})")
            else:
                problems.append(f"content differs: {rel}")
    return problems


def find_restored_root(dest: Path, src: Path, want: dict) -> Path:
    """Where the restore put the source's contents: dest itself, or dest/<source path>."""
    tops = {rel for rel in want if os.sep not in rel}
    candidates = [dest, dest / str(src).lstrip("/"), dest / src.name]
    for c in candidates:
        if c.is_dir() and tops <= set(os.listdir(c)):
            return c
    return dest


# ---------------------------------------------------------------- measuring


def du_bytes(path: Path, apparent: bool = True) -> int:
    if not path.exists():
        return 0
    flag = "-sb" if apparent else "-sB1"
    out = subprocess.run(["du", flag, str(path)], check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


@dataclass
class Run:
    wall_s: float
    user_s: float
    sys_s: float
    peak_rss_mib: float
    stdout: str
    stderr: str


TIME = "/usr/bin/time"


def run_measured(cmd: list[str], env: dict[str, str], log_dir: Path, label: str, check: bool = True) -> Run:
    """Runs cmd under GNU time: CPU and peak RSS from its wait4(2) of the tool, wall time here.

    Not wait4 of a child of this process: a child exec'd from this process
    starts its peak RSS at this process's RSS (Linux carries the exec'ing
    process's high-water mark over the exec), which would hide the tool's own
    peak under the harness's memory. GNU time is a small process, so the
    tool it starts is measured from (almost) zero.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path = log_dir / f"{label}.out"
    err_path = log_dir / f"{label}.err"
    time_path = log_dir / f"{label}.time"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        p = subprocess.run([TIME, "-f", "%e %U %S %M", "-o", str(time_path), *cmd],
                           stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        wall = time.perf_counter() - t0
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    if check and p.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise BenchError(f"{' '.join(cmd)} exited with {p.returncode}:\n{tail}")
    fields = time_path.read_text().strip().splitlines()[-1].split()
    _, user, system, max_kib = (float(x) for x in fields)
    return Run(wall, user, system, max_kib / 1024, stdout, stderr)


def run_plain(cmd: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited with {p.returncode}:\n{p.stderr.strip()[-2000:]}")
    return p


def json_values(text: str) -> list:
    """Every JSON value in text: one document, or one per line."""
    text = text.strip()
    if not text:
        return []
    try:
        return [json.loads(text)]
    except json.JSONDecodeError:
        pass
    values = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("{", "[")):
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return values


# ---------------------------------------------------------------- tools


class Tool:
    name = ""

    def __init__(self, binary: Path, work: Path):
        self.binary = binary
        self.work = work  # this tool's directory for one dataset
        self.repo = work / "repo"
        self.logs = work / "logs"
        self.env = dict(os.environ)

    def version(self) -> str:
        raise NotImplementedError

    def init(self) -> None:
        raise NotImplementedError

    def backup(self, src: Path, label: str) -> tuple[Run, str, dict]:
        """Runs one backup; returns the run, the snapshot's id and details from its report."""
        raise NotImplementedError

    def restore(self, snapshot: str, src: Path, dest: Path, label: str) -> Run:
        raise NotImplementedError

    def settings(self) -> dict:
        return {}


class Restic(Tool):
    name = "restic"

    def __init__(self, binary: Path, work: Path):
        super().__init__(binary, work)
        self.env.update(RESTIC_PASSWORD=PASSWORD, RESTIC_CACHE_DIR=str(work / "cache"))
        self.env.pop("RESTIC_REPOSITORY", None)

    def version(self) -> str:
        return run_plain([str(self.binary), "version"], self.env).stdout.strip()

    def init(self) -> None:
        run_plain([str(self.binary), "-r", str(self.repo), "init"], self.env)

    def backup(self, src: Path, label: str) -> tuple[Run, str, dict]:
        run = run_measured([str(self.binary), "-r", str(self.repo), "backup", "--json", str(src)],
                           self.env, self.logs, label)
        summary = next((v for v in reversed(json_values(run.stdout))
                        if isinstance(v, dict) and v.get("message_type") == "summary"), None)
        if not summary:
            raise BenchError("restic backup printed no summary")
        keep = ("files_new", "files_changed", "files_unmodified", "data_added", "data_added_packed",
                "total_files_processed", "total_bytes_processed")
        return run, summary["snapshot_id"], {k: summary.get(k) for k in keep}

    def restore(self, snapshot: str, src: Path, dest: Path, label: str) -> Run:
        return run_measured([str(self.binary), "-r", str(self.repo), "restore", f"{snapshot}:{src}",
                             "--target", str(dest)], self.env, self.logs, label)

    def settings(self) -> dict:
        return {"compression": "auto (default)", "read_concurrency": "2 (default)"}


class Kopia(Tool):
    name = "kopia"

    def __init__(self, binary: Path, work: Path, compression: str):
        super().__init__(binary, work)
        self.compression = compression
        self.config = work / "kopia.config"
        self.env.update(KOPIA_PASSWORD=PASSWORD, KOPIA_CHECK_FOR_UPDATES="false",
                        KOPIA_CACHE_DIRECTORY=str(work / "cache"), KOPIA_PERSIST_CREDENTIALS_ON_CONNECT="false")

    def cmd(self, *args: str) -> list[str]:
        return [str(self.binary), *args, "--config-file", str(self.config), "--log-dir", str(self.work / "kopia-logs")]

    def version(self) -> str:
        out = run_plain([str(self.binary), "--version"], self.env).stdout.split()
        return out[0] if out else "?"

    def init(self) -> None:
        run_plain(self.cmd("repository", "create", "filesystem", "--path", str(self.repo),
                           "--cache-directory", str(self.work / "cache")), self.env)
        if self.compression != "none":
            run_plain(self.cmd("policy", "set", "--global", "--compression", self.compression), self.env)
        # No automatic maintenance inside the measured commands.
        run_plain(self.cmd("maintenance", "set", "--enable-quick=false", "--enable-full=false"), self.env)

    def backup(self, src: Path, label: str) -> tuple[Run, str, dict]:
        run = run_measured(self.cmd("snapshot", "create", "--no-progress", str(src)), self.env, self.logs, label)
        listed = json_values(run_plain(self.cmd("snapshot", "list", "--json", str(src)), self.env).stdout)
        snaps = listed[0] if listed and isinstance(listed[0], list) else []
        if not snaps:
            raise BenchError("kopia snapshot list found no snapshot")
        newest = max(snaps, key=lambda s: s.get("startTime", ""))
        stats = newest.get("stats", {})
        keep = ("totalSize", "fileCount", "cachedFiles", "nonCachedFiles", "dirCount", "errorCount")
        return run, newest["id"], {k: stats.get(k) for k in keep}

    def restore(self, snapshot: str, src: Path, dest: Path, label: str) -> Run:
        return run_measured(self.cmd("snapshot", "restore", "--no-progress", snapshot, str(dest)),
                            self.env, self.logs, label)

    def settings(self) -> dict:
        return {"compression": self.compression + ("" if self.compression != "none" else " (kopia's default)"),
                "maintenance": "automatic maintenance disabled"}


class Ferry(Tool):
    """`ferry volume ...`; flags are read from its --help, so renamed ones are noticed."""

    name = "ferry"

    def __init__(self, binary: Path, work: Path):
        super().__init__(binary, work)
        self.env.update(FERRY_PASSWORD=PASSWORD)
        for k in ("FERRY_REPO", "FERRY_PASSWORD_FILE", "FERRY_KEY_FILE"):
            self.env.pop(k, None)
        self.help: dict[str, str] = {}

    def help_of(self, *sub: str) -> str:
        key = " ".join(sub)
        if key not in self.help:
            p = run_plain([str(self.binary), *sub, "--help"], self.env, check=False)
            self.help[key] = p.stdout + p.stderr if p.returncode == 0 else ""
        return self.help[key]

    def has_flag(self, sub: tuple[str, ...], flag: str) -> bool:
        return re.search(rf"(^|[\s,]){re.escape(flag)}([\s=,<\[]|$)", self.help_of(*sub), re.M) is not None

    def subcommands(self) -> list[str]:
        text = self.help_of("volume")
        m = re.search(r"^Commands:\n((?:  .*\n?)+)", text, re.M)
        return re.findall(r"^  (\S+)", m.group(1), re.M) if m else []

    def check(self) -> None:
        subs = self.subcommands()
        missing = [s for s in ("backup", "restore") if s not in subs]
        if missing:
            raise BenchError(f"{self.binary} has no `ferry volume {'/'.join(missing)}` (its volume subcommands: {subs})")

    def common(self, sub: tuple[str, ...], json_out: bool = True) -> list[str]:
        args = ["--repo", str(self.repo)] if self.has_flag(sub, "--repo") else []
        if json_out and self.has_flag(sub, "--output"):
            args += ["-o", "json"]
        return args

    def version(self) -> str:
        return run_plain([str(self.binary), "--version"], self.env).stdout.strip()

    def init(self) -> None:
        env = dict(self.env, FERRY_REPO=str(self.repo))
        run_plain([str(self.binary), "repo", "init", *self.common(("repo", "init"), False)], env)

    def backup(self, src: Path, label: str) -> tuple[Run, str, dict]:
        sub = ("volume", "backup")
        env = dict(self.env, FERRY_REPO=str(self.repo))
        run = run_measured([str(self.binary), *sub, str(src), *self.common(sub)], env, self.logs, label)
        report = next((v for v in reversed(json_values(run.stdout)) if isinstance(v, dict)), {})
        snapshot = self.snapshot_of(report) or self.newest_snapshot()
        if not snapshot:
            raise BenchError("ferry volume backup: no snapshot in its report or in `ferry volume list`")
        return run, snapshot, report

    @staticmethod
    def snapshot_of(report: dict) -> str | None:
        snap = report.get("snapshot")
        if isinstance(snap, str):
            return snap
        if isinstance(snap, dict):
            for k in ("id", "name", "snapshot"):
                if isinstance(snap.get(k), str):
                    return snap[k]
        for k in ("snapshotId", "snapshot_id", "id"):
            if isinstance(report.get(k), str):
                return report[k]
        return None

    def newest_snapshot(self) -> str | None:
        sub = ("volume", "list")
        env = dict(self.env, FERRY_REPO=str(self.repo))
        values = json_values(run_plain([str(self.binary), *sub, *self.common(sub)], env).stdout)
        items = values[0] if values else []
        if isinstance(items, dict):
            items = next((v for v in items.values() if isinstance(v, list)), [])
        if not items:
            return None

        def when(s):
            return str(s.get("time") or s.get("created") or s.get("createdAt") or s.get("startTime") or "")

        newest = max(items, key=when) if any(when(s) for s in items) else items[-1]
        return self.snapshot_of({"snapshot": newest}) if isinstance(newest, dict) else str(newest)

    def restore(self, snapshot: str, src: Path, dest: Path, label: str) -> Run:
        sub = ("volume", "restore")
        env = dict(self.env, FERRY_REPO=str(self.repo))
        return run_measured([str(self.binary), *sub, snapshot, str(dest), *self.common(sub)], env, self.logs, label)

    def limit_subcommand(self) -> str | None:
        subs = self.subcommands()
        return next((s for s in ("bench", "limit", "pipeline-limit") if s in subs), None)

    def pipeline_limit(self, src: Path, data_bytes: int, label: str) -> dict:
        """Runs `ferry volume limit SRC` (or `bench`) on all of SRC and reads its MiB/s."""
        sub_name = self.limit_subcommand()
        if not sub_name:
            return {"measured": False, "why": "ferry volume has no bench/limit subcommand"}
        sub = ("volume", sub_name)
        args = [str(src), *self.common(sub)]
        if self.has_flag(sub, "--max-mib"):
            args += ["--max-mib", str(math.ceil(data_bytes / MIB))]
        if self.has_flag(sub, "--repo"):
            self.init()  # the repository's keys and chunker parameters; nothing is written to it
        env = dict(self.env, FERRY_REPO=str(self.repo))
        run = run_measured([str(self.binary), *sub, *args], env, self.logs, label)
        mib_s = None
        for v in reversed(json_values(run.stdout)):
            if isinstance(v, dict):
                mib_s = find_mib_per_s(v)
                if mib_s is not None:
                    break
        if mib_s is None:
            m = re.findall(r"([\d.]+)\s*MiB/s", run.stdout + run.stderr)
            mib_s = float(m[-1]) if m else None
        if mib_s is None:
            return {"measured": False, "why": f"`ferry volume {sub_name}` printed no MiB/s",
                    "stdout": run.stdout[-2000:]}
        report = next((v for v in reversed(json_values(run.stdout)) if isinstance(v, dict)), None)
        return {"measured": True, "command": f"ferry volume {sub_name} {' '.join(args)}", "mib_per_s": mib_s,
                "wall_s": run.wall_s, "cpu_s": run.user_s + run.sys_s, "peak_rss_mib": run.peak_rss_mib,
                "report": report}


def find_mib_per_s(v) -> float | None:
    if isinstance(v, dict):
        for k, x in v.items():
            if isinstance(x, (int, float)) and re.search(r"mib.?per.?s|mib_?s$|mibps", k, re.I):
                return float(x)
        for x in v.values():
            r = find_mib_per_s(x)
            if r is not None:
                return r
    return None


# ---------------------------------------------------------------- the run


@dataclass
class Measurement:
    tool: str
    dataset: str
    step: str
    wall_s: float
    cpu_s: float
    user_s: float
    sys_s: float
    peak_rss_mib: float
    repo_bytes: int
    mib_per_s: float
    files_per_s: float
    sync_s: float
    details: dict = field(default_factory=dict)


def evict_from_page_cache(root: Path) -> int:
    """Drops the cached pages of every file under root (clean pages only: call after a sync).
    Returns the number of files."""
    evicted = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                evicted += 1
            finally:
                os.close(fd)
    return evicted


def restore_io_floor(repo: Path, write_bytes: int, scratch: Path) -> dict:
    """What the disk allows a restore from `repo`: every file of the repository read and `write_bytes` written at
    once, both with O_DIRECT (no page cache, no CPU work), the repository evicted from the cache first. The
    write goes to `scratch`, removed afterwards."""
    block = 8 * MIB
    files = [Path(d) / f for d, _, fs in os.walk(repo) for f in fs]
    os.sync()
    evict_from_page_cache(repo)
    pattern = mmap.mmap(-1, block)
    pattern.write(os.urandom(block))
    read_total = 0

    def read_all() -> None:
        nonlocal read_total
        buf = mmap.mmap(-1, block)
        for f in files:
            fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
            try:
                while True:
                    n = os.readv(fd, [buf])
                    read_total += n
                    if n < block:
                        break
            finally:
                os.close(fd)

    start = time.perf_counter()
    reader = threading.Thread(target=read_all)
    reader.start()
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    try:
        written = 0
        while written < write_bytes:
            written += os.write(fd, pattern)
    finally:
        os.close(fd)
    reader.join()
    wall = time.perf_counter() - start
    scratch.unlink()
    os.sync()
    evict_from_page_cache(repo)
    return {"wall_s": round(wall, 3), "read_bytes": read_total, "write_bytes": written}


def measure_tool(tool: Tool, ds: Dataset, original: dict, expect_changed: dict | None, results: dict) -> dict:
    """All four steps of one tool on one dataset. Returns the changed tree's digest."""
    ds_bytes = ds.total_bytes
    n_files = len(ds.files)
    entry = results["datasets"][ds.name]["tools"].setdefault(tool.name, {"steps": {}, "errors": []})

    def record(step: str, run: Run, details: dict) -> None:
        details["loadavg_after"] = loadavg()
        t = time.perf_counter()
        os.sync()
        sync_s = time.perf_counter() - t
        m = Measurement(tool.name, ds.name, step, run.wall_s, run.user_s + run.sys_s, run.user_s, run.sys_s,
                        run.peak_rss_mib, du_bytes(tool.repo), ds_bytes / MIB / run.wall_s,
                        n_files / run.wall_s, sync_s, details)
        entry["steps"][step] = m.__dict__
        log(f"  {tool.name} {ds.name} {STEP_TITLES[step]}: {run.wall_s:.2f} s, {m.mib_per_s:.1f} MiB/s, "
            f"CPU {m.cpu_s:.2f} s, RSS {run.peak_rss_mib:.0f} MiB, repo {m.repo_bytes / MIB:.1f} MiB")

    if tool.work.exists():
        shutil.rmtree(tool.work)
    tool.work.mkdir(parents=True)
    log(f"{tool.name} on {ds.name}: reading the source (checksum; warms the page cache)")
    if combined(tree_digest(ds.root)) != combined(original):
        raise BenchError(f"{ds.root} is not the generated dataset any more")
    tool.init()
    os.sync()
    run, snap, det = tool.backup(ds.root, "1-first")
    record("first", run, {"snapshot": snap, "report": det})
    # Sub-second on a shared machine: each tool's unchanged re-backup runs
    # UNCHANGED_RUNS times (each the parent of the next) and its median run
    # is the one recorded.
    repeats = []
    for i in range(UNCHANGED_RUNS):
        repeats.append(tool.backup(ds.root, "2-unchanged" + (f"-{i + 1}" if i else "")))
        os.sync()
    walls = [r[0].wall_s for r in repeats]
    run, snap, det = sorted(repeats, key=lambda r: r[0].wall_s)[len(repeats) // 2]
    record("unchanged", run, {"snapshot": snap, "report": det, "runs_wall_s": [round(w, 3) for w in walls]})
    undo, n_changed, changed_bytes = apply_change(ds)
    try:
        changed = tree_digest(ds.root)
        if expect_changed is not None and combined(changed) != combined(expect_changed):
            raise BenchError("the 10% change is not deterministic: the changed tree differs from the previous tool's")
        os.sync()
        run, snap, det = tool.backup(ds.root, "3-changed")
        record("changed", run, {"snapshot": snap, "report": det, "changed_files": n_changed,
                                "changed_bytes": changed_bytes})
        dest = tool.work / "restore"
        dest.mkdir()
        floor = None
        if tool.name == "ferry":
            floor = restore_io_floor(tool.repo, du_bytes(ds.root, apparent=False), tool.work / "io-floor")
            floor["mib_per_s"] = ds_bytes / MIB / floor["wall_s"]
            log(f"  {ds.name}: restore I/O floor: {floor['read_bytes'] / MIB:.0f} MiB read and "
                f"{floor['write_bytes'] / MIB:.0f} MiB written at once in {floor['wall_s']:.2f} s")
        os.sync()
        evict_from_page_cache(tool.repo)
        run = tool.restore(snap, ds.root, dest, "4-restore")
        root = find_restored_root(dest, ds.root, changed)
        restored = tree_digest(root)
        problems = compare_trees(changed, restored)
        record("restore", run, {"snapshot": snap, "restored_apparent_bytes": du_bytes(root),
                                "restored_disk_bytes": du_bytes(root, apparent=False),
                                "verified": not problems, "differences": len(problems),
                                "first_differences": problems[:20], "io_floor": floor})
        if problems:
            raise BenchError(f"{tool.name}: the restore of {ds.name} differs from the source in {len(problems)} "
                             f"entries:\n  " + "\n  ".join(problems[:20]))
        log(f"  {tool.name} {ds.name}: restore verified ({len(restored)} entries match)")
    finally:
        revert_change(undo)
    return changed


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages: how busy the machine was with other work too."""
    return [round(x, 2) for x in os.getloadavg()]


def machine_info() -> dict:
    cpu_model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model, "memory_gib": round(mem, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "bench_commit": commit, "loadavg_at_start": loadavg()}


def tool_binaries(tools: list[str], args) -> dict[str, Path]:
    bins: dict[str, Path] = {}
    wanted = [t for t in ("restic", "kopia") if t in tools and not getattr(args, t)]
    if wanted:
        out = subprocess.run([str(REPO_ROOT / "scripts" / "bench-tools.sh"), *wanted],
                             check=True, stdout=subprocess.PIPE, text=True)
        for line in out.stdout.splitlines():
            k, _, v = line.partition("=")
            bins[k] = Path(v)
    for t in ("restic", "kopia"):
        if t in tools and getattr(args, t):
            bins[t] = Path(getattr(args, t))
    if "ferry" in tools:
        if args.ferry:
            bins["ferry"] = Path(args.ferry)
        else:
            if not args.no_build:
                log("building target/release/ferry")
                subprocess.run(["cargo", "build", "--release", "--bin", "ferry"], cwd=REPO_ROOT, check=True)
            bins["ferry"] = REPO_ROOT / "target" / "release" / "ferry"
    for t, b in bins.items():
        if not (b.is_file() and os.access(b, os.X_OK)):
            raise BenchError(f"{t}: {b} is not an executable file")
    return bins


def go_build_info(binary: Path) -> dict | None:
    """The Go toolchain, main package and module version a Go binary was built from."""
    if not shutil.which("go"):
        return None
    p = subprocess.run(["go", "version", "-m", str(binary)], capture_output=True, text=True)
    if p.returncode != 0:
        return None
    info = {"go": p.stdout.split(":", 1)[1].split()[0] if ":" in p.stdout else ""}
    for line in p.stdout.splitlines():
        f = line.split()
        if len(f) >= 2 and f[0] == "path":
            info["package"] = f[1]
        elif len(f) >= 3 and f[0] == "mod":
            info["module"] = f"{f[1]}@{f[2]}"
            if len(f) >= 4:
                info["sum"] = f[3]
        elif len(f) >= 2 and f[0] == "build" and f[1].startswith(("-ldflags", "CGO_ENABLED")):
            info.setdefault("flags", []).append(f[1])
    return info


def make_tool(name: str, binary: Path, work: Path, args) -> Tool:
    if name == "restic":
        return Restic(binary, work)
    if name == "kopia":
        return Kopia(binary, work, args.kopia_compression)
    return Ferry(binary, work)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO_ROOT / "target" / "bench" / "volume"),
                    help="where results.json, results.md and plot.svg go (default target/bench/volume)")
    ap.add_argument("--work", default="/tmp/ferry-volbench",
                    help="datasets, repositories and restores (default /tmp/ferry-volbench; removed at the end)")
    ap.add_argument("--small", action="store_true", help="datasets a tenth of the size: a quick check")
    ap.add_argument("--tools", default=",".join(ALL_TOOLS), help="comma-separated subset of ferry,restic,kopia")
    ap.add_argument("--datasets", default="small-files,large-files", help="comma-separated subset")
    ap.add_argument("--ferry", help="ferry binary (default: target/release/ferry, built first)")
    ap.add_argument("--no-build", action="store_true", help="use target/release/ferry as it is")
    ap.add_argument("--restic", help="restic binary (default: built by scripts/bench-tools.sh)")
    ap.add_argument("--kopia", help="kopia binary (default: built by scripts/bench-tools.sh)")
    ap.add_argument("--kopia-compression", default="zstd-fastest",
                    help="kopia's global compression policy (default zstd-fastest, so that all three "
                         "compress; 'none' is kopia's own default)")
    ap.add_argument("--in-cluster", help="JSON file with the in-cluster mover's mibPerSec and standaloneMibPerSec")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--render", metavar="RESULTS_JSON",
                    help="run nothing: write results.md and plot.svg again from a results.json "
                         "(into --out if given, else beside it)")
    args = ap.parse_args()

    if args.render:
        src = Path(args.render)
        results = json.loads(src.read_text())
        dest = Path(args.out) if "--out" in sys.argv else src.parent
        dest.mkdir(parents=True, exist_ok=True)
        results["targets"] = evaluate_targets(results)
        (dest / "results.md").write_text(markdown(results))
        (dest / "plot.svg").write_text(svg(results))
        log(f"wrote {dest}/results.md and plot.svg from {src}")
        return 0

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [t for t in tools if t not in ALL_TOOLS]
    if bad or not tools:
        ap.error(f"unknown tools: {bad}")
    dataset_names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if any(d not in ("small-files", "large-files") for d in dataset_names):
        ap.error("datasets are small-files and large-files")
    scale = 0.1 if args.small else 1.0
    work = Path(args.work).resolve()
    out = Path(args.out)
    if not out.is_absolute():
        out = Path.cwd() / out
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)

    if not os.access(TIME, os.X_OK):
        raise BenchError(f"{TIME} (GNU time) is needed to measure CPU and peak RSS: apt-get install time")
    bins = tool_binaries(tools, args)
    versions = {}
    for t in tools:
        probe = make_tool(t, bins[t], work / "probe", args)
        versions[t] = probe.version()
        if isinstance(probe, Ferry):
            probe.check()
    log("tools: " + "; ".join(f"{t} {versions[t]} ({bins[t]})" for t in tools))

    command = "scripts/bench --volumes" + "".join(f" {a}" for a in sys.argv[1:])
    results: dict = {
        "machine": machine_info(),
        "command": command,
        "small": args.small,
        "tools": {t: {"binary": str(bins[t]), "version": versions[t],
                      "build": go_build_info(bins[t]) if t != "ferry" else None,
                      "settings": make_tool(t, bins[t], work / "probe", args).settings()} for t in tools},
        "method": {
            "page_cache": "warm: not dropped; the source is read (checksummed) just before each tool's first "
                          "backup; restores and repositories go to the same file system; before the restore "
                          "the repository's files are evicted from the page cache (posix_fadvise DONTNEED)",
            "sync": "sync(2) after every step, untimed (recorded as sync_s)",
            "mib_per_s": "dataset apparent bytes / wall seconds, for every step",
            "files_per_s": "dataset files / wall seconds, for every step",
            "cpu_s": "user + system CPU of the tool process and its children (GNU time, wait4)",
            "peak_rss_mib": "ru_maxrss of the tool process (GNU time, wait4; GNU time starts the tool so that "
                            "the harness's own memory does not count)",
            "repo_bytes": "du -sb of the repository after the step",
            "password": "restic RESTIC_PASSWORD, kopia KOPIA_PASSWORD, ferry FERRY_PASSWORD",
        },
        "datasets": {},
        "pipeline_limit": {},
        "in_cluster": None,
        "errors": [],
    }
    if args.in_cluster and Path(args.in_cluster).is_file():
        results["in_cluster"] = json.loads(Path(args.in_cluster).read_text())

    failed = False
    try:
        for name in dataset_names:
            root = work / "data" / name
            ds = small_files_dataset(root, scale) if name == "small-files" else large_files_dataset(root, scale)
            free = shutil.disk_usage(work).free
            if free < ds.data_bytes * 3.5:
                raise BenchError(f"{work}: {free / GIB:.1f} GiB free, {ds.data_bytes * 3.5 / GIB:.1f} GiB needed")
            log(f"{name}: generating ({ds.description})")
            gen_s = generate(ds)
            original = tree_digest(ds.root)
            dsr = results["datasets"][name] = {
                "description": ds.description, "files": len(ds.files), "dirs": len(ds.dirs),
                "bytes": ds.total_bytes, "data_bytes": ds.data_bytes,
                "disk_bytes": du_bytes(ds.root, apparent=False),
                "text_bytes": sum(f.size for f in ds.files if f.kind == "text"),
                "generate_s": round(gen_s, 2), "checksum": combined(original), "tools": {},
            }
            log(f"{name}: {len(ds.files)} files, {ds.total_bytes / MIB:.0f} MiB in {gen_s:.1f} s")
            if "ferry" in tools:
                ferry = Ferry(bins["ferry"], work / f"ferry-{name}")
                ferry.work.mkdir(parents=True, exist_ok=True)
                try:
                    tree_digest(ds.root)  # the same warm cache as the tools get
                    lim = ferry.pipeline_limit(ds.root, ds.total_bytes, "0-limit")
                except BenchError as e:
                    lim = {"measured": False, "why": str(e)}
                finally:
                    shutil.rmtree(ferry.work, ignore_errors=True)
                results["pipeline_limit"][name] = lim
                log(f"{name}: pipeline limit: " + (f"{lim['mib_per_s']:.1f} MiB/s" if lim.get("measured")
                                                   else f"not measured ({lim['why']})"))
            changed = None
            # ext4 does not reuse an inode for minutes after it is deleted: a restore of many files right
            # after another tool's restore was deleted searches past all of its inodes (several times
            # slower). Work directories of datasets of many files are removed after every tool is done.
            postponed = []
            for t in tools:
                tool = make_tool(t, bins[t], work / f"{t}-{name}", args)
                try:
                    changed = measure_tool(tool, ds, original, changed, results)
                except BenchError as e:
                    failed = True
                    msg = f"{t} on {name}: {e}"
                    log("FAILED: " + msg)
                    dsr["tools"].setdefault(t, {"steps": {}, "errors": []})["errors"].append(str(e))
                    results["errors"].append(msg)
                finally:
                    if not args.keep:
                        if len(ds.files) >= 10_000:
                            postponed.append(tool.work)
                        else:
                            shutil.rmtree(tool.work, ignore_errors=True)
            for d in postponed:
                shutil.rmtree(d, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(ds.root, ignore_errors=True)
    except (BenchError, subprocess.CalledProcessError) as e:
        failed = True
        results["errors"].append(str(e))
        log(f"FAILED: {e}")
    finally:
        if not args.keep:
            # Only what this run made: --work may be a directory with other things in it.
            for d in ["data", "probe"] + [f"{t}-{n}" for t in tools for n in dataset_names]:
                shutil.rmtree(work / d, ignore_errors=True)
            try:
                work.rmdir()
            except OSError:
                pass

    results["machine"]["loadavg_at_end"] = loadavg()
    results["targets"] = evaluate_targets(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    (out / "plot.svg").write_text(svg(results))
    log(f"results in {out}/results.md, results.json, plot.svg")
    if results["errors"]:
        log("ERRORS:\n  " + "\n  ".join(results["errors"]))
    return 1 if failed else 0


# ---------------------------------------------------------------- targets and reports


def step_of(results: dict, ds: str, tool: str, step: str) -> dict | None:
    return results["datasets"].get(ds, {}).get("tools", {}).get(tool, {}).get("steps", {}).get(step)


def evaluate_targets(results: dict) -> list[dict]:
    targets = []

    def ratio_target(title, ds, step, other, factor):
        f, o = step_of(results, ds, "ferry", step), step_of(results, ds, other, step)
        t = {"target": title, "dataset": ds}
        if f and o:
            r = f["mib_per_s"] / o["mib_per_s"]
            t.update(value=round(r, 2), text=f"{r:.2f}× ({f['mib_per_s']:.1f} vs {o['mib_per_s']:.1f} MiB/s)",
                     met=r >= factor)
        else:
            t.update(value=None, text="not measured", met=None)
        targets.append(t)

    for ds in results["datasets"]:
        ratio_target("first backup: ferry ≥ 3× restic MiB/s", ds, "first", "restic", 3)
        ratio_target("first backup: ferry ≥ 2× kopia MiB/s", ds, "first", "kopia", 2)
        ratio_target("unchanged re-backup: ferry ≥ 10× restic MiB/s", ds, "unchanged", "restic", 10)
        ratio_target("restore: ferry ≥ 3× restic MiB/s", ds, "restore", "restic", 3)
        steps = [s for s in (step_of(results, ds, "ferry", st) for st in STEPS) if s]
        t = {"target": "ferry peak RSS ≤ 256 MiB (largest step)", "dataset": ds}
        if steps:
            worst = max(steps, key=lambda s: s["peak_rss_mib"])
            t.update(value=round(worst["peak_rss_mib"], 1),
                     text=f"{worst['peak_rss_mib']:.0f} MiB ({STEP_TITLES[worst['step']]})",
                     met=worst["peak_rss_mib"] <= 256)
        else:
            t.update(value=None, text="not measured", met=None)
        targets.append(t)
        lim = results["pipeline_limit"].get(ds)
        f = step_of(results, ds, "ferry", "first")
        t = {"target": "ferry first backup ≥ 80% of the pipeline limit", "dataset": ds}
        if lim and lim.get("measured") and f:
            r = f["mib_per_s"] / lim["mib_per_s"]
            t.update(value=round(r, 3), text=f"{r:.0%} ({f['mib_per_s']:.1f} of {lim['mib_per_s']:.1f} MiB/s)",
                     met=r >= 0.8)
        else:
            t.update(value=None, text="not measured" + (f" ({lim['why']})" if lim and lim.get("why") else ""),
                     met=None)
        targets.append(t)
    return targets


def verdict(met) -> str:
    return "met" if met else ("**missed**" if met is False else "–")


def tool_line(name: str, v: dict) -> str:
    text = f"{name} `{v['version'].splitlines()[0] if v['version'] else '?'}`"
    extra = [f"{k}: {x}" for k, x in v["settings"].items()]
    b = v.get("build")
    if b and b.get("module"):
        extra.insert(0, f"built from the Go module {b['module']} with {b['go']}")
    return text + (f" ({'; '.join(extra)})" if extra else "")


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Volume data mover: ferry, restic and kopia",
        "",
        f"`{results['command']}` on {m['cpus']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, "
        f"kernel {m['kernel']}, {m['date']}, benchmark commit {m['bench_commit']}; load average "
        f"{m['loadavg_at_start'][0]} at the start, {m.get('loadavg_at_end', ['?'])[0]} at the end.",
        "",
        "Tools: " + "; ".join(tool_line(t, v) for t, v in results["tools"].items()) + ".",
        "",
        "All tools run one at a time on the same machine in the same run, each with a fresh local repository "
        "on the same file system as the data, with the page cache warm (it is not dropped; the source is read "
        "just before each tool's first backup) and `sync` run untimed after every step; before the restore, the "
        "repository's files (not the tools' own caches) are evicted from the page cache, as for a restore of a "
        "repository written long before. MiB/s and files/s are "
        "the whole dataset's bytes and files over the step's wall time, for every step; CPU s is user + system "
        "time and peak RSS the largest resident set of the tool's process (both from GNU time); repo MiB is `du -sb` "
        "of the repository after the step. Every restore is checked file by file (size and SHA-256) against "
        "the source. A dataset of many files has every tool's work directory removed only after all tools ran: "
        "ext4 does not reuse an inode for minutes after it is deleted, and a restore creating 60,000 files "
        "just after another tool's restore was deleted is several times slower. The restore I/O floor is what "
        "the disk allows a restore: the ferry repository read and the data's size written at once, both with "
        "`O_DIRECT`, no CPU work.",
        "",
        f"One run of each step, except the unchanged re-backup: on a shared 2-core machine (see the load average "
        f"above) a step's wall time varies from run to run, most for the sub-second unchanged re-backups, whose "
        f"time is mostly process start-up and reading the previous snapshot's metadata. Each tool's unchanged "
        f"re-backup therefore runs {UNCHANGED_RUNS} times in a row (each run the parent of the next), and the "
        f"run with the median wall time is the one reported; all {UNCHANGED_RUNS} wall times are in results.json "
        f"(`runs_wall_s`). CPU s is the steadier measure of work done.",
        "",
    ]
    for ds, d in results["datasets"].items():
        lines += [f"## {ds}", "", d["description"] + f" (generated in {d['generate_s']} s).", "",
                  "| tool | step | wall s | MiB/s | files/s | CPU s | peak RSS MiB | repo MiB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        notes = []
        for tool, te in d["tools"].items():
            for step in STEPS:
                s = te["steps"].get(step)
                if not s:
                    continue
                fps = s["files_per_s"]
                fps_text = f"{fps:.0f}" if fps >= 100 else f"{fps:.1f}" if fps >= 10 else f"{fps:.2f}"
                lines.append(f"| {tool} | {STEP_TITLES[step]} | {s['wall_s']:.2f} | {s['mib_per_s']:.1f} | "
                             f"{fps_text} | {s['cpu_s']:.2f} | {s['peak_rss_mib']:.0f} | "
                             f"{s['repo_bytes'] / MIB:.1f} |")
            r = te["steps"].get("restore")
            if r:
                notes.append(f"{tool}: restored tree {r['details']['restored_disk_bytes'] / MIB:.0f} MiB on disk "
                             f"({r['details']['restored_apparent_bytes'] / MIB:.0f} MiB apparent), "
                             + ("verified" if r["details"]["verified"] else "**differs from the source**"))
            for e in te.get("errors", []):
                lines.append(f"| {tool} | **failed** | {e.splitlines()[0]} | | | | | |")
        c = next((te["steps"]["changed"]["details"] for te in d["tools"].values() if "changed" in te["steps"]), None)
        lines.append("")
        if c:
            lines.append(f"The change: {c['changed_files']} files, {c['changed_bytes'] / MIB:.1f} MiB rewritten in place. "
                         f"Source: {d['disk_bytes'] / MIB:.0f} MiB on disk.")
        if notes:
            lines.append("Restores: " + "; ".join(notes) + ".")
        lines.append("")
    refs = []
    for ds, lim in results["pipeline_limit"].items():
        refs.append(f"| pipeline limit ({ds}) | " + (f"{lim['mib_per_s']:.1f} | `{lim['command']}`" if lim.get("measured")
                                                    else f"not measured | {lim.get('why', '')}") + " |")
    for ds, d in results["datasets"].items():
        r = d["tools"].get("ferry", {}).get("steps", {}).get("restore")
        floor = r and r["details"].get("io_floor")
        if floor:
            refs.append(f"| restore I/O floor ({ds}) | {floor['mib_per_s']:.1f} | the ferry repository "
                        f"({floor['read_bytes'] / MIB:.0f} MiB) read and {floor['write_bytes'] / MIB:.0f} MiB "
                        f"written at once, both `O_DIRECT`, in {floor['wall_s']:.2f} s: ferry's restore "
                        f"({r['mib_per_s']:.1f} MiB/s) is {r['mib_per_s'] / floor['mib_per_s']:.0%} of it |")
    ic = results.get("in_cluster")
    if ic:
        refs.append(f"| in-cluster mover | {ic.get('mibPerSec', '–')} | standalone: {ic.get('standaloneMibPerSec', '–')} MiB/s |")
    if refs:
        lines += ["## Reference throughputs", "", "| what | MiB/s | |", "|---|---:|---|", *refs, ""]
    lines += ["## Targets", "", "| target | dataset | value | |", "|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {t['dataset']} | {t['text']} | {verdict(t['met'])} |")
    lines.append("")
    if results["errors"]:
        lines += ["## Errors", ""] + [f"- {e.splitlines()[0]}" for e in results["errors"]] + [""]
    return "\n".join(lines)


COLORS = {"ferry": "#e6550d", "restic": "#3182bd", "kopia": "#31a354"}


def esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg(results: dict) -> str:
    """Grouped bars of MiB/s (log scale): one panel per dataset, one group per step, one bar per tool."""
    datasets = list(results["datasets"])
    tools = list(results["tools"])
    values = [s["mib_per_s"] for d in results["datasets"].values() for te in d["tools"].values()
              for s in te["steps"].values()]
    lo_exp = math.floor(math.log10(min(values))) if values else 0
    hi_exp = math.ceil(math.log10(max(values))) if values else 1
    if hi_exp <= lo_exp:
        hi_exp = lo_exp + 1
    pw, ph = 560, 360  # panel
    ml, mt, mb = 70, 70, 90
    width = ml + len(datasets) * (pw + 80) + 20
    height = mt + ph + mb
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
         f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
         f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="17">'
         f'{esc("Volume data mover: MiB/s (dataset bytes / wall time), log scale; same machine, same run")}</text>']

    def y_of(v: float) -> float:
        return mt + ph - (math.log10(v) - lo_exp) / (hi_exp - lo_exp) * ph

    for i, ds in enumerate(datasets):
        x0 = ml + i * (pw + 80)
        o.append(f'<text x="{x0 + pw / 2}" y="{mt - 16}" text-anchor="middle" font-size="15">{esc(ds)}</text>')
        for e in range(lo_exp, hi_exp + 1):
            y = y_of(10 ** e)
            o.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + pw}" y2="{y:.1f}" stroke="#dddddd"/>')
            o.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{10 ** e:g}</text>')
            if e < hi_exp:
                for k in range(2, 10):
                    yk = y_of(k * 10 ** e)
                    o.append(f'<line x1="{x0}" y1="{yk:.1f}" x2="{x0 + pw}" y2="{yk:.1f}" stroke="#f2f2f2"/>')
        o.append(f'<line x1="{x0}" y1="{mt}" x2="{x0}" y2="{mt + ph}" stroke="#000000"/>')
        o.append(f'<line x1="{x0}" y1="{mt + ph}" x2="{x0 + pw}" y2="{mt + ph}" stroke="#000000"/>')
        if i == 0:
            o.append(f'<text x="18" y="{mt + ph / 2}" text-anchor="middle" font-size="12" '
                     f'transform="rotate(-90 18 {mt + ph / 2})">MiB/s</text>')
        gw = pw / len(STEPS)
        bw = (gw - 20) / max(1, len(tools))
        for j, step in enumerate(STEPS):
            gx = x0 + j * gw + 10
            o.append(f'<text x="{gx + (gw - 20) / 2:.1f}" y="{mt + ph + 18}" text-anchor="middle" '
                     f'font-size="12">{esc(PLOT_TITLES[step])}</text>')
            for k, tool in enumerate(tools):
                s = step_of(results, ds, tool, step)
                bx = gx + k * bw
                if not s:
                    o.append(f'<text x="{bx + bw / 2:.1f}" y="{mt + ph - 4}" text-anchor="middle" font-size="10" '
                             f'fill="#999999">n/a</text>')
                    continue
                v = s["mib_per_s"]
                y = y_of(max(v, 10 ** lo_exp))
                o.append(f'<rect x="{bx + 1:.1f}" y="{y:.1f}" width="{bw - 2:.1f}" height="{mt + ph - y:.1f}" '
                         f'fill="{COLORS[tool]}"><title>{esc(f"{tool}, {ds}, {STEP_TITLES[step]}: {v:.1f} MiB/s")}'
                         f'</title></rect>')
                o.append(f'<text x="{bx + bw / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle" font-size="10">'
                         f'{v:.0f}</text>' if v >= 10 else
                         f'<text x="{bx + bw / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle" font-size="10">'
                         f'{v:.1f}</text>')
    lx = ml
    ly = height - 30
    for k, tool in enumerate(tools):
        o.append(f'<rect x="{lx + k * 120}" y="{ly - 11}" width="14" height="14" fill="{COLORS[tool]}"/>')
        o.append(f'<text x="{lx + k * 120 + 20}" y="{ly}" font-size="13">{esc(tool)}</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        log(f"FAILED: {e}")
        sys.exit(1)
